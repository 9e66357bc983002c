"""Backward Triton kernels (``groupmoe.kernels.grouped_bwd`` and ``backend="triton"``'s
expert-MLP backward) against the fp64 per-expert oracle, shared by the interpreter tests
(subprocess with ``TRITON_INTERPRET=1``, see ``test_kernels_bwd.py``) and the GPU tests.

``python tests/kernel_bwd_cases.py [names]`` prints ``{name: rel_err or "error: ..."}`` as JSON.
Nothing here imports Triton at module import.
"""

from __future__ import annotations

import sys

import torch

from groupmoe.ops import build_routing, expert_mlp, get_activation
from groupmoe.ops.reference import expert_mlp_reference
from interp_runner import print_case_results
from moe_cases import make_ids, rel_err

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}
F32, BF16, F64 = torch.float32, torch.bfloat16, torch.float64
GRADS = ("x", "gates", "w1", "w2", "b1", "b2")


def _problem(t, h, inter, e, k, load, bias, scale, seed=0):
    """fp64 leaves of one expert-MLP problem; gates signed (no division by g anywhere)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*size, std=1.0):
        return torch.randn(*size, generator=gen, dtype=F64) * std

    vals = {"x": rnd(t, h, std=scale), "gates": rnd(t, k),
            "w1": rnd(e, h, 2 * inter, std=h ** -0.5), "w2": rnd(e, inter, h, std=inter ** -0.5),
            "b1": rnd(e, 2 * inter, std=0.5) if bias else None,
            "b2": rnd(e, h, std=0.5) if bias else None}
    ids = make_ids(t, k, e, load)
    return vals, ids, rnd(t, h)


def _leaves(vals, dtype, device, layout):
    """Leaves in ``dtype``; ``layout="transposed"`` keeps the weights as nn.Linear-layout
    ``[E, out, in]`` parameters and passes ``[E, in, out]`` views of them."""
    leaves = {n: None if v is None else v.to(device, dtype, copy=True).requires_grad_(True)
              for n, v in vals.items()}
    if layout == "transposed":
        for n in ("w1", "w2"):
            w = vals[n].transpose(-1, -2).contiguous()
            leaves[n] = w.to(device, dtype, copy=True).requires_grad_(True)
    return leaves


def _weights(leaves, layout):
    if layout == "transposed":
        return leaves["w1"].transpose(-1, -2), leaves["w2"].transpose(-1, -2)
    return leaves["w1"], leaves["w2"]


def _grads(leaves, layout):
    out = {}
    for n, leaf in leaves.items():
        if leaf is None:
            continue
        g = leaf.grad
        out[n] = g.transpose(-1, -2) if layout == "transposed" and n in ("w1", "w2") else g
    return out


class _count_calls:
    """Count calls of functions of :mod:`groupmoe.kernels.experts` (proof that the fused
    backward ran, not the torch one)."""

    def __init__(self, names):
        from groupmoe.kernels import experts

        self.module, self.counts, self.saved = experts, dict.fromkeys(names, 0), {}
        for name in names:
            fn = self.saved[name] = getattr(experts, name)
            setattr(experts, name, self._wrap(name, fn))

    def _wrap(self, name, fn):
        def wrapped(*args, **kwargs):
            self.counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    def restore(self):
        for name, fn in self.saved.items():
            setattr(self.module, name, fn)


def case_expert_bwd(t, h, inter, e, k, load, dtype, activation, bias, save, layout="in_out",
                    device="cpu", scale=1.0, store=False, weight_grad=True, gate_grad=True,
                    input_grad=True):
    """expert_mlp(backend="triton") forward + backward vs the fp64 loop: max rel err over the
    output and every gradient (x, gates, w1, w2, b1, b2). ``store=True`` defers dW to a
    WeightGradStore and pops it; ``weight_grad=False`` / ``gate_grad=False``: frozen experts
    (their grads must stay None) / router weights without grad; ``input_grad=False``: no dx."""
    vals, ids, up = _problem(t, h, inter, e, k, load, bias, scale)
    ref = _leaves(vals, F64, "cpu", "in_out")
    out_ref = expert_mlp_reference(ref["x"], ids, ref["gates"], ref["w1"], ref["w2"], ref["b1"],
                                   ref["b2"], activation)
    out_ref.backward(up)
    ref_grads = _grads(ref, "in_out")

    leaves = _leaves(vals, dtype, device, layout)
    if not gate_grad:
        leaves["gates"].requires_grad_(False)
    w1, w2 = _weights(leaves, layout)
    routing = build_routing(ids.to(device), e)

    def step():
        out = expert_mlp(leaves["x"], routing, leaves["gates"], w1, w2, leaves["b1"],
                         leaves["b2"], activation, save=save, backend="triton",
                         weight_grad=weight_grad, input_grad=input_grad)
        out.backward(up.to(device, dtype))
        return out

    calls = _count_calls(("down_backward", "grouped_wgrad"))
    if store:
        from groupmoe.parallel import WeightGradStore

        with WeightGradStore() as st:
            out = step()
            assert leaves["w1"].grad is None and leaves["w2"].grad is None, "dW not deferred"
            st.flush()
        st.pop()
    else:
        out = step()
    calls.restore()
    assert calls.counts == {"down_backward": 1, "grouped_wgrad": 2 * weight_grad}, calls.counts
    got = _grads(leaves, layout)
    frozen = ({"gates"} if not gate_grad else set()) | ({"x"} if not input_grad else set())
    if not weight_grad:
        frozen |= {"w1", "w2", "b1", "b2"}
    for n in frozen:
        assert got.pop(n, None) is None, f"{n} got a gradient"
        ref_grads.pop(n, None)
    errs = [rel_err(out.cpu(), out_ref)] + [rel_err(got[n].cpu(), ref_grads[n])
                                            for n in ref_grads]
    return max(errs)


def case_wgrad(t, kdim, ndim, e, k, load, dtype, layout="in_out", a_index=True,
               dy_index=False, device="cpu", config=SMALL):
    """grouped_wgrad (rows read through indices, result in the weight's layout) vs the fp64
    per-expert product; empty experts must come out exactly zero."""
    from groupmoe.kernels.grouped_bwd import grouped_wgrad

    ids = make_ids(t, k, e, load)
    r = build_routing(ids.to(device), e)
    n = r.num_rows
    a = torch.randn(t if a_index else n, kdim, dtype=F64)
    dy = torch.randn(t if dy_index else n, ndim, dtype=F64)
    w = torch.empty(e, kdim, ndim, dtype=dtype, device=device)
    if layout == "transposed":
        w = torch.empty(e, ndim, kdim, dtype=dtype, device=device).transpose(-1, -2)
    ti = r.token_index
    out = grouped_wgrad(a.to(device, dtype), ti if a_index else None, dy.to(device, dtype),
                        ti if dy_index else None, r.offsets, transposed=layout == "transposed",
                        config=config)
    assert out.dtype == dtype and out.shape == w.shape and out.stride() == w.stride(), \
        (out.stride(), w.stride())
    aa = a[ti.cpu()] if a_index else a
    dd = dy[ti.cpu()] if dy_index else dy
    aa, dd = aa.to(dtype).double(), dd.to(dtype).double()  # the inputs as the kernel sees them
    ref = torch.zeros(e, kdim, ndim, dtype=F64)
    ends = r.offsets.tolist()
    for g, (s, end) in enumerate(zip([0] + ends[:-1], ends)):
        ref[g] = aa[s:end].T @ dd[s:end]
        if end == s:
            assert torch.count_nonzero(out[g]) == 0, "empty expert got a nonzero gradient"
    return rel_err(out.cpu(), ref)


def case_down_dx_act(t, h, inter, e, k, load, dtype, activation, want_a=True, device="cpu",
                     config=SMALL):
    """down_dx_act vs the fp64 formula: max rel err over dh, g * act(h) and dg."""
    from groupmoe.kernels.grouped_bwd import down_dx_act

    act = get_activation(activation)
    r = build_routing(make_ids(t, k, e, load).to(device), e)
    n = r.num_rows
    hh = torch.randn(n, 2 * inter, dtype=F64) * 4
    if n:
        hh[0, :4] = 7.0  # gpt-oss's clamp limit exactly
    g = torch.randn(n, dtype=F64)
    dy = torch.randn(t, h, dtype=F64)
    w2 = torch.randn(e, inter, h, dtype=F64) / inter ** 0.5
    dh, a_s, dg = down_dx_act(dy.to(device, dtype), r.token_index, w2.to(device, dtype),
                              r.offsets, hh.to(device, dtype), g.to(device, F32), act,
                              want_a_scaled=want_a, want_dg=True, config=config)
    hq, dyq, w2q = (v.to(dtype).double() for v in (hh, dy, w2))
    da = torch.zeros(n, inter, dtype=F64)
    ends = r.offsets.tolist()
    ti = r.token_index.cpu()
    for ex, (s, end) in enumerate(zip([0] + ends[:-1], ends)):
        da[s:end] = dyq[ti[s:end]] @ w2q[ex].T
    hq.requires_grad_(True)
    a = act(hq)
    (a * (g[:, None] * da)).sum().backward()
    errs = [rel_err(dh.cpu(), hq.grad), rel_err(dg.cpu(), (da * a.detach()).sum(1))]
    if want_a:
        errs.append(rel_err(a_s.cpu(), a.detach() * g[:, None]))
    else:
        assert a_s is None
    return max(errs) if n else float(dh.numel() + dg.numel())


# name: (function, kwargs, tolerance). Sizes tiny: the interpreter emulates every program.
# H=40/I=24 with 16-wide tiles: several row/column/K tiles, K not a multiple of the tile.
E5 = dict(e=5, k=2)
CASES = {
    "wgrad-f32-gather-a": (case_wgrad, dict(t=40, kdim=40, ndim=24, load="skewed", dtype=F32,
                                            **E5), 1e-6),
    "wgrad-f32-gather-dy-transposed": (case_wgrad, dict(t=40, kdim=24, ndim=40, load="random",
                                                        dtype=F32, layout="transposed",
                                                        a_index=False, dy_index=True, **E5),
                                       1e-6),
    "wgrad-f32-single-expert-default-config": (case_wgrad, dict(
        t=70, kdim=130, ndim=36, load="single", dtype=F32, config=None, **E5), 1e-6),
    "wgrad-bf16": (case_wgrad, dict(t=40, kdim=40, ndim=24, load="random", dtype=BF16, **E5),
                   1e-2),
    "wgrad-empty": (case_wgrad, dict(t=0, kdim=8, ndim=8, load="random", dtype=F32, **E5), 0.0),
    "dx_act-swiglu-f32": (case_down_dx_act, dict(t=40, h=40, inter=24, load="skewed",
                                                 dtype=F32, activation="swiglu", **E5), 1e-6),
    "dx_act-gptoss-f32-no-a": (case_down_dx_act, dict(t=40, h=40, inter=24, load="random",
                                                      dtype=F32, activation="gptoss",
                                                      want_a=False, **E5), 1e-6),
    "dx_act-gptoss-f32-default-config": (case_down_dx_act, dict(
        t=70, h=130, inter=70, load="single", dtype=F32, activation="gptoss", config=None,
        **E5), 1e-6),
    "dx_act-swiglu-bf16": (case_down_dx_act, dict(t=40, h=40, inter=24, load="random",
                                                  dtype=BF16, activation="swiglu", **E5), 3e-2),
    "dx_act-empty": (case_down_dx_act, dict(t=0, h=8, inter=8, load="random", dtype=F32,
                                            activation="swiglu", **E5), 0.0),
    # whole expert MLP, default tiles (128 rows, 64 act columns): T*k > 128 rows, I > 64
    "mlp-swiglu-f32-h": (case_expert_bwd, dict(t=70, h=36, inter=70, load="skewed", dtype=F32,
                                               activation="swiglu", bias=False, save="h", **E5),
                         1e-5),
    "mlp-swiglu-f32-bias-none-transposed": (case_expert_bwd, dict(
        t=13, h=20, inter=12, load="random", dtype=F32, activation="swiglu", bias=True,
        save="none", layout="transposed", **E5), 1e-5),
    "mlp-gptoss-f32-bias-h-single": (case_expert_bwd, dict(
        t=70, h=36, inter=70, load="single", dtype=F32, activation="gptoss", bias=True,
        save="h", scale=3.0, **E5), 1e-5),
    "mlp-gptoss-f32-none-transposed": (case_expert_bwd, dict(
        t=13, h=20, inter=12, load="skewed", dtype=F32, activation="gptoss", bias=False,
        save="none", layout="transposed", scale=3.0, **E5), 1e-5),
    "mlp-one-expert-k1": (case_expert_bwd, dict(t=9, h=20, inter=12, e=1, k=1, load="random",
                                                dtype=F32, activation="swiglu", bias=True,
                                                save="h"), 1e-5),
    "mlp-bf16-gptoss-bias": (case_expert_bwd, dict(t=13, h=20, inter=12, load="random",
                                                   dtype=BF16, activation="gptoss", bias=True,
                                                   save="h", scale=3.0, **E5), 3e-2),
    "mlp-frozen-experts-no-gate-grad": (case_expert_bwd, dict(
        t=13, h=20, inter=12, load="random", dtype=F32, activation="gptoss", bias=True,
        save="h", weight_grad=False, gate_grad=False, **E5), 1e-5),
    "mlp-frozen-experts": (case_expert_bwd, dict(t=13, h=20, inter=12, load="random", dtype=F32,
                                                 activation="swiglu", bias=False, save="none",
                                                 weight_grad=False, **E5), 1e-5),
    "mlp-no-input-grad-none": (case_expert_bwd, dict(t=13, h=20, inter=12, load="skewed",
                                                     dtype=F32, activation="gptoss", bias=True,
                                                     save="none", input_grad=False, **E5), 1e-5),
    "mlp-deferred-dw": (case_expert_bwd, dict(t=13, h=20, inter=12, load="skewed", dtype=F32,
                                              activation="swiglu", bias=True, save="h",
                                              layout="transposed", store=True, **E5), 1e-5),
}


if __name__ == "__main__":
    print_case_results(CASES, sys.argv[1:] or None)
