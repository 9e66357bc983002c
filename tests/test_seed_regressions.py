"""Regression tests for review findings in the seed documents (seed 003's ModuleList patch)
that the other test files did not pin down: runtime checks on every expert, Mixtral's jitter
in eval, patching twice, and unpatching only groupmoe's own forward."""

import pytest
import torch
from torch import nn

import groupmoe
from moe_cases import rel_err
from test_modulelist import MixtralSparseMoeBlock, Model, Qwen3MoeSparseMoeBlock, _run

NAMES = ("gate_proj", "up_proj", "down_proj")


def _loop_sentinel(block):
    """Make the block's saved original forward return a marker, so a test sees which path
    ran without running bitsandbytes' loop."""
    block._groupmoe_original_forward = lambda hidden_states: "original-forward"


def _quantized_block():
    pytest.importorskip("bitsandbytes")
    from bnb4 import quantize_expert_linears

    torch.manual_seed(0)
    model = Model(Qwen3MoeSparseMoeBlock(h=64, i=64)).train()
    quantize_expert_linears(model, NAMES)
    return model


def _to_meta(lin: nn.Module) -> None:
    """Put one Linear's weight on another device (``meta``: the only other one on CPU)."""
    w = lin.weight
    if type(w).__name__ == "Params4bit":
        lin.weight = type(w)(w.data.to("meta"), requires_grad=False, quant_state=w.quant_state,
                             quant_type="nf4", module=lin, bnb_quantized=True)
    else:
        lin.weight = nn.Parameter(w.detach().to("meta"))


@pytest.mark.parametrize("kind", ["dense", "4bit"])
def test_runtime_device_check_covers_every_expert(kind, caplog, monkeypatch):
    """A device_map / offload that leaves a later expert's projection elsewhere: the block
    runs its original forward (which moves data as its hooks do) instead of stacking tensors
    of two devices (seed 003: check every expert projection's device, not experts[0]'s)."""
    from groupmoe.integrations import modulelist

    if kind == "4bit":
        model = _quantized_block()
    else:
        torch.manual_seed(0)
        model = Model(Qwen3MoeSparseMoeBlock())
    x = torch.randn(2, 5, model.block.gate.in_features)
    assert groupmoe.patch(model).patched == ["block"]
    _loop_sentinel(model.block)
    _to_meta(model.block.experts[4].down_proj)
    monkeypatch.setattr(modulelist, "_warned", set())
    with caplog.at_level("WARNING", logger="groupmoe"):
        assert model(x) == "original-forward"
    assert "meta" in caplog.text


def test_4bit_compute_dtype_checked_on_every_projection(caplog, monkeypatch):
    """One later expert's Linear4bit computing in another dtype than the input: bitsandbytes
    would round that expert differently, so the block runs its own loop (seed 003: validate
    the compute dtype of all projections, not one)."""
    from groupmoe.integrations import modulelist

    model = _quantized_block()
    assert groupmoe.patch(model).patched == ["block"]
    _loop_sentinel(model.block)
    lin = model.block.experts[5].up_proj
    lin.compute_dtype, lin.compute_type_is_set = torch.bfloat16, True
    monkeypatch.setattr(modulelist, "_warned", set())
    with caplog.at_level("WARNING", logger="groupmoe"):
        assert model(torch.randn(2, 5, 64)) == "original-forward"
    assert "computed in torch.bfloat16" in caplog.text


def test_mixtral_jitter_only_in_training_when_patched():
    """Mixtral's router jitter is a training-time draw: in eval the patched block matches the
    loop whatever the RNG state, and draws nothing (seed 003: preserve the jitter exactly)."""
    torch.manual_seed(0)
    model = Model(MixtralSparseMoeBlock(jitter=0.3)).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = model(x)[0]
    assert groupmoe.patch(model).patched == ["block"]
    torch.manual_seed(1)
    got = model(x)[0]
    assert rel_err(got, ref) < 1e-12
    state = torch.get_rng_state()
    model(x)
    assert torch.equal(torch.get_rng_state(), state)
    model.train()  # and in training the jitter does change the result
    assert rel_err(model(x)[0], ref) > 1e-3


def test_patch_twice_then_unpatch_restores_the_loop():
    """A second ``patch`` must not wrap the grouped forward again (unpatch would then restore
    the grouped forward, not the model's loop)."""
    torch.manual_seed(0)
    model = Model(Qwen3MoeSparseMoeBlock()).double().train()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    ref = _run(model, x)[0][0]
    assert groupmoe.patch(model).patched == ["block"]
    assert groupmoe.patch(model).patched == []
    assert rel_err(_run(model, x)[0][0], ref) < 1e-12
    groupmoe.unpatch(model)
    assert "forward" not in model.block.__dict__
    assert not hasattr(model.block, "_groupmoe_original_forward")


def test_unpatch_leaves_a_later_wrapper_in_place():
    """Someone wrapped the block's forward after groupmoe patched it: unpatch must not throw
    their wrapper away (seed 003: restore only our own patch)."""
    torch.manual_seed(0)
    model = Model(Qwen3MoeSparseMoeBlock())
    groupmoe.patch(model)
    inner = model.block.forward

    def wrapper(hidden_states):
        return inner(hidden_states)

    model.block.forward = wrapper
    groupmoe.unpatch(model)
    assert model.block.forward is wrapper


@pytest.mark.parametrize("case", ["activation", "bias"])
def test_static_checks_cover_every_expert(case):
    """An expert in the middle of the list that the grouped path cannot run as written (its
    own activation, a bias) keeps the block on its loop (seed 003: eligibility on every
    expert, not on one)."""
    torch.manual_seed(0)
    model = Model(Qwen3MoeSparseMoeBlock())
    expert = model.block.experts[2]
    if case == "activation":
        expert.act_fn = nn.GELU()
    else:
        expert.up_proj.bias = nn.Parameter(torch.randn(expert.up_proj.out_features))
    report = groupmoe.patch(model)
    assert not report.patched
    assert {"activation": "expert 2 activation is not SiLU",
            "bias": "expert 2 has quantized or biased weights"}[case] == report.skipped["block"]


@pytest.mark.parametrize("save", ["h", "none"])
def test_expert_mlp_keeps_no_down_output_or_permuted_input(save):
    """What the expert MLP node keeps for backward: x (the caller's tensor), the sorted router
    weights, the weights and biases, h [rows, 2I] only with save="h", and the routing's index
    tensors, all through save_for_backward (so saved-tensor hooks see them). The down output
    (seed 004: kept only to form the gate gradient) and a permuted copy of x are not kept."""
    from groupmoe.ops import build_routing, expert_mlp
    from moe_cases import make_case

    case = make_case(20, 16, 8, 4, 2, torch.float64, bias=True)
    routing = build_routing(case.ids, 4)
    out = expert_mlp(case.x, routing, case.gates, case.w1, case.w2, case.b1, case.b2, save=save)
    node = out.grad_fn
    saved = [t for t in node.saved_tensors if t is not None]
    kept = [t for t in saved if t.is_floating_point()]
    assert sorted(id(t) for t in saved if not t.is_floating_point()) == \
        sorted(id(t) for t in routing.tensors())
    rows = case.ids.numel()
    weights = sum(t.numel() for t in (case.w1, case.w2, case.b1, case.b2))
    assert sum(t.numel() for t in kept) == case.x.numel() + rows + weights + \
        (rows * 16 if save == "h" else 0)
    assert any(t is case.x for t in node.saved_tensors)


def test_patched_gpt_oss_experts_weight_grad_store_matches_direct():
    """Seed 000's integration check on groupmoe's patch of transformers' GptOssExperts: with a
    WeightGradStore the logits and every gradient match the direct run; before pop the expert
    weight stacks have no gradient yet while their biases already have theirs (eager)."""
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("stacked gpt-oss experts need transformers 5")
    from groupmoe.parallel import WeightGradStore
    from test_transformers import build, step, tokens

    model = build("gpt_oss", torch.float64)
    assert groupmoe.patch(model).patched
    tok = tokens()
    ref_logits, _, ref = step(model, tok)
    store = WeightGradStore()
    with store:
        got_logits, _, before = step(model, tok)
        store.flush()
    assert rel_err(got_logits, ref_logits) < 1e-12
    stacks = [n for n in ref if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    biases = [n for n in ref if n.endswith(("experts.gate_up_proj_bias",
                                            "experts.down_proj_bias"))]
    assert len(stacks) == len(biases) == 4
    assert not any(n in before for n in stacks)
    for n in biases:
        assert rel_err(before[n], ref[n]) < 1e-12, n
    store.pop()
    assert store.pending() == store.queued() == 0
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref[n]) < 1e-11, n
