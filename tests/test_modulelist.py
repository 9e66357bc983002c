"""transformers 4.x-style ModuleList MoE blocks (synthetic stand-ins with the 4.x class names
and per-expert loop), patched to the grouped path. The real 4.x models: test_transformers4.py."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import groupmoe
from groupmoe.integrations import modulelist
from moe_cases import count_calls, rel_err, spy_check_ids


class _MLP(nn.Module):
    def __init__(self, h, i, names=("gate_proj", "up_proj", "down_proj")):
        super().__init__()
        self.names = names
        setattr(self, names[0], nn.Linear(h, i, bias=False))
        setattr(self, names[1], nn.Linear(h, i, bias=False))
        setattr(self, names[2], nn.Linear(i, h, bias=False))
        self.act_fn = nn.SiLU()

    def forward(self, x):
        g, u, d = (getattr(self, n) for n in self.names)
        return d(self.act_fn(g(x)) * u(x))


class _LoopBlock(nn.Module):
    """The 4.x per-expert loop: softmax fp32 -> top-k -> (renorm) -> cast -> loop."""

    renorm_always = False
    returns_logits = True

    def __init__(self, h=16, i=8, e=6, k=2, norm=True, jitter=0.0, names=None, shared=0):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob, self.jitter_noise = e, k, norm, jitter
        self.gate = nn.Linear(h, e, bias=False)
        kw = {"names": names} if names else {}
        self.experts = nn.ModuleList(_MLP(h, i, **kw) for _ in range(e))
        if shared:
            self.shared_expert = _MLP(h, shared)
            self.shared_expert_gate = nn.Linear(h, 1, bias=False)

    def forward(self, hidden_states):
        b, s, h = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        x = hidden_states.view(-1, h)
        router_logits = self.gate(x)
        w = F.softmax(router_logits, dim=1, dtype=torch.float)
        w, sel = torch.topk(w, self.top_k, dim=-1)
        if self.renorm_always or self.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        w = w.to(x.dtype)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            tok, slot = torch.where(sel == e)
            if tok.numel():
                out.index_add_(0, tok, expert(x[tok]) * w[tok, slot, None])
        if getattr(self, "shared_expert", None) is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        out = out.view(b, s, h)
        if self.returns_logits:
            return out, router_logits
        return out


class Qwen3MoeSparseMoeBlock(_LoopBlock):
    pass


class Qwen2MoeSparseMoeBlock(_LoopBlock):
    pass


class MixtralSparseMoeBlock(_LoopBlock):
    renorm_always = True

    def __init__(self, **kw):
        super().__init__(names=("w1", "w3", "w2"), **kw)


class OlmoeSparseMoeBlock(_LoopBlock):
    def forward(self, hidden_states):
        out = super().forward(hidden_states)
        return out[0]


BLOCKS = {
    "qwen3": lambda: Qwen3MoeSparseMoeBlock(norm=True),
    "qwen2-shared": lambda: Qwen2MoeSparseMoeBlock(norm=False, shared=12),
    "mixtral-jitter": lambda: MixtralSparseMoeBlock(jitter=0.1),
    "olmoe-tensor-return": lambda: OlmoeSparseMoeBlock(norm=False),
}


class Model(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def _run(model, x, seed=3):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # same jitter draw in both runs
    out = model(x)
    hidden = out[0] if isinstance(out, tuple) else out
    loss = hidden.pow(2).sum() + (out[1].sum() if isinstance(out, tuple) else 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, x.grad, grads


@pytest.mark.parametrize("name", list(BLOCKS))
def test_modulelist_block_matches_loop(name, monkeypatch):
    torch.manual_seed(0)
    model = Model(BLOCKS[name]()).double().train()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    ref, ref_dx, ref_grads = _run(model, x)
    report = groupmoe.patch(model)
    assert report.patched == ["block"], str(report)
    seen = spy_check_ids(monkeypatch, modulelist)
    out, dx, grads = _run(model, x)
    assert seen == [False]  # topk ids: no range check, no device sync
    assert type(out) is type(ref)  # the model's return contract
    if isinstance(ref, tuple):
        assert rel_err(out[0], ref[0]) < 1e-12 and torch.equal(out[1], ref[1])
    else:
        assert rel_err(out, ref) < 1e-12
    assert rel_err(dx, ref_dx) < 1e-11
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-11, n
    groupmoe.unpatch(model)
    assert "forward" not in model.block.__dict__
    again, _, _ = _run(model, x)
    assert torch.equal(again[0] if isinstance(again, tuple) else again,
                       ref[0] if isinstance(ref, tuple) else ref)


def test_modulelist_skips_lora_and_falls_back_at_runtime():
    torch.manual_seed(0)
    model = Model(Qwen3MoeSparseMoeBlock())
    model.block.experts[3].up_proj.lora_A = nn.Linear(16, 2)  # what peft leaves behind
    report = groupmoe.patch(model)
    assert "LoRA" in report.skipped["block"] and not report.patched
    del model.block.experts[3].up_proj.lora_A
    assert groupmoe.patch(model).patched == ["block"]
    x = torch.randn(2, 5, 16)
    ref = model.block.__dict__["_groupmoe_original_forward"](x)[0]
    model.block.experts[5].down_proj.base_layer = nn.Identity()  # adapter attached later
    assert torch.equal(model(x)[0], ref)  # ran the original loop, unchanged numerics


def test_weight_stacks_are_not_kept():
    """The experts' weights reach the op as a list and are stacked inside it (in forward and
    again in backward): nothing stacked is saved for backward, the weights saved are the
    experts' own parameters, and gradients still reach every expert's Linear."""
    torch.manual_seed(0)
    model = Model(Qwen3MoeSparseMoeBlock(h=16, i=8, e=6))
    groupmoe.patch(model)
    params = {p.data_ptr() for p in model.parameters()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(torch.randn(2, 5, 16))[0]
    assert not any(t.dim() == 3 and t.shape[0] == 6 for t in saved)  # no [E, ., .] stack
    weights = [t for t in saved if t.dim() == 2 and tuple(t.shape) in ((8, 16), (16, 8))]
    assert len(weights) == 3 * 6 and all(t.data_ptr() in params for t in weights)
    out.sum().backward()
    assert all(e.gate_proj.weight.grad is not None and e.down_proj.weight.grad is not None
               for e in model.block.experts)


# ----- peft LoRA on the experts' Linears, run grouped -----

def _peft_block(name, seed=0, **lora_kw):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    model = Model(BLOCKS[name]()).double().train()
    mixtral = name.startswith("mixtral")
    targets = lora_kw.pop("targets", ["w1", "w3", "w2"] if mixtral else
                          ["gate_proj", "up_proj", "down_proj"])
    cfg = peft.LoraConfig(**{"r": 3, "lora_alpha": 5, "target_modules": targets,
                             "init_lora_weights": False, **lora_kw})
    model = peft.get_peft_model(model, cfg).double()
    return peft, model


def _lora_run(model, x, seed=3):
    out, dx, grads = _run(model, x, seed)
    return (out[0] if isinstance(out, tuple) else out), dx, grads


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("targets", ["all", "up", "gate_down"])
def test_peft_lora_on_expert_linears_runs_grouped(name, targets, monkeypatch):
    names = ("w1", "w3", "w2") if name.startswith("mixtral") else \
        ("gate_proj", "up_proj", "down_proj")
    pick = {"all": names, "up": names[1:2], "gate_down": names[0::2]}[targets]
    # one expert with its own alpha: per-expert scales are folded into B
    _, model = _peft_block(name, targets=list(pick), alpha_pattern={f"experts.2.{pick[0]}": 11})
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    ref, ref_dx, ref_grads = _lora_run(model, x)
    assert sum("lora_" in n for n in ref_grads) > 0
    calls = count_calls(monkeypatch, modulelist, "expert_mlp_lora")
    report = groupmoe.patch(model)
    assert len(report.patched) == 1 and not report.skipped, str(report)
    out, dx, grads = _lora_run(model, x)
    assert calls  # the grouped LoRA path ran, not the loop
    assert rel_err(out, ref) < 1e-12 and rel_err(dx, ref_dx) < 1e-11
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-11, n


def _fallback(model, x, caplog, monkeypatch):
    monkeypatch.setattr(modulelist, "_warned", set())
    with caplog.at_level("WARNING", logger="groupmoe"):
        out = _lora_run(model, x)
    return out, " ".join(r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("case", ["two_adapters", "dora", "some_experts", "ranks", "merged"])
def test_peft_lora_unsupported_falls_back_with_reason(case, caplog, monkeypatch):
    kw = {"dora": {"use_dora": True},
          "some_experts": {"targets": r".*experts\.[01]\.up_proj"},
          "ranks": {"rank_pattern": {"experts.1.up_proj": 2}}}.get(case, {})
    peft, model = _peft_block("qwen3", **kw)
    if case == "two_adapters":
        model.add_adapter("second", peft.LoraConfig(r=2, target_modules=["up_proj"],
                                                    init_lora_weights=False))
        model.base_model.set_adapter(["default", "second"])
        model.double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    if case == "merged":
        report = groupmoe.patch(model)  # patched while unmerged, merged afterwards
        assert report.patched
        model.merge_adapter()
        ref = _lora_run(model.base_model.model.block.__dict__["_groupmoe_original_forward"]
                        .__self__, x)
    else:
        ref = _lora_run(model, x)
        report = groupmoe.patch(model)
        why = {"two_adapters": "2 active LoRA adapters", "dora": "variant",
               "some_experts": "some experts only", "ranks": "ranks differ"}[case]
        assert not report.patched and why in report.skipped["base_model.model.block"]
        return
    (out, _, _), log = _fallback(model, x, caplog, monkeypatch)
    assert "merged" in log
    assert torch.equal(out, ref[0])


def test_peft_lora_dropout_falls_back_in_training_only(caplog, monkeypatch):
    _, model = _peft_block("qwen3", lora_dropout=0.3)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = _lora_run(model, x)[0]
    assert groupmoe.patch(model).patched  # dropout is a per-call (training) matter
    (out, _, _), log = _fallback(model, x, caplog, monkeypatch)
    assert "lora_dropout" in log and torch.equal(out, ref)  # the loop, same dropout draws
    model.eval()
    with torch.no_grad():
        got = model(x)[0]
        groupmoe.unpatch(model)
        want = model(x)[0]
    assert rel_err(got, want) < 1e-12


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["qwen2-shared", "olmoe-tensor-return"])
def test_peft_lora_on_expert_linears_bf16_cuda(name):
    """Grouped bf16 LoRA on CUDA against the model's bf16 loop (same router, so the same
    routing; rank 8 for grouped_mm's alignment)."""
    import copy

    _, model = _peft_block(name, r=8)
    model = model.bfloat16().cuda()
    ref_model = copy.deepcopy(model)
    assert groupmoe.patch(model).patched
    x = torch.randn(4, 64, 16, device="cuda", dtype=torch.bfloat16)
    ref, ref_dx, ref_grads = _lora_run(ref_model, x)
    out, dx, grads = _lora_run(model, x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 2e-2 and rel_err(dx, ref_dx) < 2e-2
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert rel_err(grads[n], ref_grads[n]) < 3e-2, n
