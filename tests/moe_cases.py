"""Random expert-MLP problems and a gradient comparison shared by the tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from groupmoe.ops import (
    build_routing,
    expert_mlp,
    expert_mlp_naive,
    expert_mlp_reference,
    get_activation,
)


@dataclass
class Case:
    x: torch.Tensor
    ids: torch.Tensor
    gates: torch.Tensor
    w1: torch.Tensor
    w2: torch.Tensor
    b1: torch.Tensor | None
    b2: torch.Tensor | None
    activation: str

    @property
    def num_experts(self):
        return self.w1.shape[0]

    def leaves(self):
        all_ = (self.x, self.gates, self.w1, self.w2, self.b1, self.b2)
        return [t for t in all_ if t is not None]

    def names(self):
        return [n for n, t in zip(("x", "gates", "w1", "w2", "b1", "b2"),
                                  (self.x, self.gates, self.w1, self.w2, self.b1, self.b2))
                if t is not None]


def make_ids(t, k, e, load="random"):
    """``[t, k]`` distinct expert ids per token; ``skewed`` leaves half the experts empty,
    ``single`` sends every token's slots to the lowest expert ids (expert 0 gets all tokens)."""
    if t == 0:
        return torch.empty(0, k, dtype=torch.long)
    if load == "random":
        return torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    if load == "skewed":
        live = max(k, e // 2)
        return torch.stack([torch.randperm(live)[:k] for _ in range(t)])
    if load == "single":
        return torch.arange(k).repeat(t, 1)
    raise ValueError(load)


def make_case(t=37, h=24, i=20, e=6, k=2, dtype=torch.float64, bias=False,
              activation="swiglu", load="random", signed_gates=False, zero_gate=False,
              device="cpu", scale=1.0):
    x = torch.randn(t, h, dtype=dtype) * scale
    ids = make_ids(t, k, e, load)
    gates = torch.rand(t, k, dtype=dtype) + 0.1
    if signed_gates:
        gates = torch.randn(t, k, dtype=dtype)
    if zero_gate and t:
        gates[0, 0] = 0.0
        gates[-1, -1] = 1e-30 if dtype == torch.float64 else 1e-20
    width = 2 * i if get_activation(activation).gated else i  # gate_up, or up alone
    w1 = torch.randn(e, h, width, dtype=dtype) / h ** 0.5
    w2 = torch.randn(e, i, h, dtype=dtype) / i ** 0.5
    b1 = torch.randn(e, width, dtype=dtype) * 0.1 if bias else None
    b2 = torch.randn(e, h, dtype=dtype) * 0.1 if bias else None
    tensors = [x, gates, w1, w2, b1, b2]
    x, gates, w1, w2, b1, b2 = [
        None if v is None else v.to(device).requires_grad_(True) for v in tensors
    ]
    return Case(x, ids.to(device), gates, w1, w2, b1, b2, activation)


def run(case: Case, impl: str, save="h", upstream=None, precision="default"):
    """Forward + backward of one implementation; returns (out, {name: grad})."""
    for leaf in case.leaves():
        leaf.grad = None
    args = (case.w1, case.w2, case.b1, case.b2, case.activation)
    if impl == "loop":
        out = expert_mlp_reference(case.x, case.ids, case.gates, *args)
    else:
        routing = build_routing(case.ids, case.num_experts)
        if impl == "naive":
            out = expert_mlp_naive(case.x, routing, case.gates, *args)
        else:
            out = expert_mlp(case.x, routing, case.gates, *args, save=save,
                             precision=precision)
    if upstream is None:
        upstream = torch.randn_like(out)
    out.backward(upstream)
    grads = {n: leaf.grad.clone() for n, leaf in zip(case.names(), case.leaves())}
    return out.detach(), grads, upstream


def compiled_and_eager(compiled, module, x, loss):
    """Forward + backward of ``compiled`` and then of ``module`` on copies of ``x``; for each,
    the output (its first element when a tuple) and every gradient (the module's parameters and
    ``"input"``)."""
    results = []
    for fn in (compiled, module):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        result = fn(xi)
        loss(result).backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        grads["input"] = xi.grad.clone()
        out = result[0] if isinstance(result, tuple) else result
        results.append((out.detach(), grads))
    return results


def rel_err(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so every call appends to the returned list: which path ran."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def spy_check_ids(monkeypatch, module) -> list:
    """Wrap ``module.build_routing``: the returned list gets each call's ``check_ids``."""
    seen, real = [], module.build_routing

    def spy(ids, num_experts, *, check_ids=True):
        seen.append(check_ids)
        return real(ids, num_experts, check_ids=check_ids)

    monkeypatch.setattr(module, "build_routing", spy)
    return seen
