"""Activation checkpointing over groupmoe: transformers' ``gradient_checkpointing_enable()``
(reentrant and not) and ``torch.utils.checkpoint``, dense and QLoRA paths, Mixtral's router
jitter in training: gradients equal to no checkpointing, and the recomputed forward does not
repeat the data checks (their custom ops skip them inside a backward pass)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import groupmoe
from groupmoe.ops import checks
from moe_cases import count_calls, rel_err


def _assert_same(got, want, tol=1e-6):
    assert got.keys() == want.keys()
    for n in want:
        assert rel_err(got[n], want[n]) < tol, n


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _transformers5():
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("stacked experts need transformers 5")


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("name,qlora", [("qwen3_moe", False), ("mixtral", False),
                                        ("gpt_oss", True)])
def test_transformers_gradient_checkpointing(name, qlora, reentrant, monkeypatch):
    _transformers5()
    from groupmoe.integrations import expert_lora_targets
    from test_transformers import build, tokens
    from test_transformers_4bit import _peft, _quantize

    kw = {"router_jitter_noise": 0.2} if name == "mixtral" else {}
    model = build(name, **kw)
    if qlora:
        _quantize(model, "groupmoe", False)
        model = _peft(model, expert_lora_targets(model), 0)
    assert groupmoe.patch(model).patched
    model.train()
    ids = tokens()
    from groupmoe.ops import routing

    routings = count_calls(monkeypatch, routing, "_build_routing_op")

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the same jitter draw in both runs
        model(ids, labels=ids, use_cache=False).loss.backward()
        return _grads(model)

    want = step()
    layers = len(routings)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": reentrant})
    if qlora and reentrant:  # peft's frozen embeddings: reentrant checkpoints need an input
        model.enable_input_require_grads()  # that requires grad (peft's documented recipe)
    got = step()
    assert len(routings) == 3 * layers  # then forward and recompute: checkpointing is on
    _assert_same(got, want, 1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_torch_checkpoint_over_moe_blocks_with_jitter(reentrant, monkeypatch):
    """torch.utils.checkpoint over MoEBlocks with router jitter in training (restored RNG: the
    recompute draws the same noise) gives the same gradients; the NaN check of the logits and
    the ids' range check run once per forward, not again in the recompute."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(groupmoe.MoEBlock(16, 8, 6, 2, jitter=0.1, dtype=torch.float64)
                                 for _ in range(2)).train()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    nan_checks = count_calls(monkeypatch, checks, "_raise_if_not_finite")

    def run(ckpt):
        blocks.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(1)
        h = x
        for block in blocks:
            h = h + (checkpoint(block, h, use_reentrant=reentrant)[0] if ckpt else block(h)[0])
        h.square().sum().backward()
        return {**_grads(blocks), "x": x.grad.clone()}

    want = run(False)
    assert len(nan_checks) == 2
    got = run(True)
    assert len(nan_checks) == 4  # the recompute did not check again
    _assert_same(got, want, 1e-12)


def test_id_check_runs_once_under_checkpoint(monkeypatch):
    from groupmoe.ops import routing

    torch.manual_seed(0)
    experts = groupmoe.GroupedExperts(16, 8, 4, dtype=torch.float64)
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(7)])
    gates = torch.rand(7, 2, dtype=torch.float64, requires_grad=True)
    id_checks = count_calls(monkeypatch, routing, "check_id_values")
    checkpoint(experts, x, ids, gates, use_reentrant=False).sum().backward()
    assert len(id_checks) == 1


def test_modulelist_mixtral_jitter_under_checkpoint():
    """transformers 4.x-style ModuleList block (Mixtral, jitter in training) under
    torch.utils.checkpoint: the same gradients as without."""
    from test_modulelist import MixtralSparseMoeBlock, Model

    torch.manual_seed(0)
    model = Model(MixtralSparseMoeBlock(h=16, i=8, e=6, jitter=0.1)).double().train()
    groupmoe.patch(model)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)

    def run(ckpt):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        out = checkpoint(model, x, use_reentrant=False)[0] if ckpt else model(x)[0]
        out.square().sum().backward()
        return _grads(model)

    _assert_same(run(True), run(False), 1e-12)


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the groupmoe ops that reach the dispatcher (an op whose output selective
    checkpointing replays from the forward does not reach it again)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "groupmoe":
            self.counts[func._opname] = self.counts.get(func._opname, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("keep,once", [((), ()), (("routing",), ("build_routing",)),
                                       (("routing", "experts"),
                                        ("build_routing", "expert_mlp"))])
def test_selective_checkpoint_keeps_chosen_ops(keep, once):
    """checkpoint_context(keep): the kept ops run once per block (forward only), the others
    twice (forward and recompute); gradients equal to no checkpointing."""
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(groupmoe.MoEBlock(16, 8, 6, 2, dtype=torch.float64)
                                 for _ in range(2)).train()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    context = groupmoe.ops.checkpoint_context(keep)

    def run(ckpt):
        blocks.zero_grad(set_to_none=True)
        x.grad = None
        with _OpCounter() as counter:
            h = x
            for block in blocks:
                h = h + (checkpoint(block, h, use_reentrant=False, context_fn=context)[0]
                         if ckpt else block(h)[0])
            h.square().sum().backward()
        return {**_grads(blocks), "x": x.grad.clone()}, counter.counts

    want, plain = run(False)
    got, counts = run(True)
    _assert_same(got, want, 1e-12)
    for op in ("build_routing", "expert_mlp"):
        assert counts[op] == plain[op] * (1 if op in once else 2), (op, counts)


def test_selective_checkpoint_qlora_transformers():
    """The QLoRA experts' chunked op kept through transformers' gradient checkpointing kwargs:
    run once per layer, the same gradients as plain checkpointing."""
    _transformers5()
    from groupmoe.integrations import expert_lora_targets
    from test_transformers import build, tokens
    from test_transformers_4bit import _peft, _quantize

    model = build("gpt_oss")
    _quantize(model, "groupmoe", False)
    model = _peft(model, expert_lora_targets(model), 0)
    assert groupmoe.patch(model).patched
    model.train()
    ids = tokens()

    def step(**kwargs):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
            "use_reentrant": False, **kwargs})
        model.zero_grad(set_to_none=True)
        with _OpCounter() as counter:
            model(ids, labels=ids, use_cache=False).loss.backward()
        return _grads(model), counter.counts

    want, plain = step()
    got, counts = step(context_fn=groupmoe.ops.checkpoint_context(("routing", "experts")))
    _assert_same(got, want, 1e-6)
    layers = plain["chunked_expert_mlp"] // 2
    assert layers >= 1 and counts["chunked_expert_mlp"] == layers
    assert counts["build_routing"] == layers and plain["build_routing"] == 2 * layers


def test_checkpoint_context_rejects_unknown_names():
    with pytest.raises(ValueError, match="cannot keep 'weights'"):
        groupmoe.ops.checkpoint_context(("weights",))
