"""WeightGradStore: deferred weight gradients equal eager ones (forward, dX, every grad, hooks,
existing .grad, views); errors; pipeline schedules on 2 gloo processes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_helpers import free_port
from groupmoe import MoEBlock
from groupmoe.nn import GroupedExperts
from groupmoe.ops import build_routing, grouped_linear
from groupmoe.ops.wgrad import defer
from groupmoe.parallel import (
    WEIGHT_GRAD_STORE,
    WeightGradStore,
    defer_linear_weight_grads,
    linear,
)
from moe_cases import make_ids, rel_err


def _grads(module):
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def _step(module, xs, store=None):
    """Forward+backward of each micro-batch; with a store, flush after each and pop at the end.
    Returns (outputs, grads before pop, input grads)."""
    outs, dxs = [], []
    for x in xs:
        x = x.clone().requires_grad_(True)
        with store if store is not None else torch.enable_grad():
            out = module(x)
            out = out[0] if isinstance(out, tuple) else out
            (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() \
                .backward()
            if store is not None:
                store.flush()
        outs.append(out.detach())
        dxs.append(x.grad)
    before = _grads(module)
    if store is not None:
        assert store.pending() == len(xs)
        store.pop_all()
    return outs, before, dxs


class _TwoMicroBatches(nn.Module):
    """Experts fed fixed routing per micro-batch (so eager and deferred runs route alike)."""

    def __init__(self, experts, ids, gates):
        super().__init__()
        self.experts, self.ids, self.gates, self.i = experts, ids, gates, 0

    def forward(self, x):
        i, self.i = self.i, (self.i + 1) % len(self.ids)
        return self.experts(x, self.ids[i], self.gates[i])


@pytest.mark.parametrize("impl", ["groupmoe", "naive"])
@pytest.mark.parametrize("save", ["h", "none"])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gptoss", True)])
def test_expert_block_store_on_vs_off(impl, save, activation, bias):
    """Outputs, dX, router-weight grads and every parameter grad match eager; weight grads
    are untouched before pop and bias grads eager; existing .grad is added to; a
    post-accumulate hook runs once per micro-batch, at pop, as in eager."""
    experts = GroupedExperts(16, 12, 6, activation, bias, impl, save, dtype=torch.float64)
    hooked = []
    experts.gate_up.register_post_accumulate_grad_hook(lambda p: hooked.append(p.grad.clone()))
    xs = [torch.randn(23, 16, dtype=torch.float64) for _ in range(2)]
    ids = [make_ids(23, 2, 6, "skewed"), make_ids(23, 2, 6)]
    gates = [torch.rand(23, 2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    model = _TwoMicroBatches(experts, ids, gates)
    ref_outs, ref, ref_dx = _step(model, xs)
    ref_gate = [g.grad.clone() for g in gates]
    n_eager_hooks = len(hooked)
    for p in experts.parameters():  # e.g. from an earlier accumulation step
        p.grad = torch.ones_like(p)
    for g in gates:
        g.grad = None
    hooked.clear()
    outs, before, dxs = _step(model, xs, WEIGHT_GRAD_STORE)
    after = _grads(model)
    for a, b in zip(outs + dxs, ref_outs + ref_dx):
        assert rel_err(a, b) < 1e-13
    for g, r in zip(gates, ref_gate):
        assert rel_err(g.grad, r) < 1e-13
    assert torch.equal(before["experts.gate_up"], torch.ones_like(experts.gate_up))
    assert torch.equal(before["experts.down"], torch.ones_like(experts.down))
    for name in after:
        expect = ref[name] + 1
        if "bias" in name:
            assert rel_err(before[name], expect) < 1e-13, name
        assert rel_err(after[name], expect) < 1e-13, name
    assert len(hooked) == n_eager_hooks == 2
    assert WEIGHT_GRAD_STORE.pending() == WEIGHT_GRAD_STORE.queued() == 0
    assert not WEIGHT_GRAD_STORE.enabled


def test_moe_block_with_shared_expert_and_dense_linears():
    """A whole block (router gate, shared expert, experts, an extra nn.Linear) defers every
    weight gradient and matches eager after pop."""
    class BlockThenProj(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = MoEBlock(16, 8, 4, 2, shared_intermediate_size=12, dtype=torch.float64)
            self.proj = nn.Linear(16, 16, bias=False, dtype=torch.float64)

        def forward(self, x):
            return self.proj(self.block(x)[0])

    model = defer_linear_weight_grads(BlockThenProj())
    xs = [torch.randn(2, 9, 16, dtype=torch.float64) for _ in range(3)]
    ref_outs, ref, ref_dx = _step(model, xs)
    model.zero_grad(set_to_none=True)
    outs, before, dxs = _step(model, xs, WeightGradStore())
    for a, b in zip(outs + dxs, ref_outs + ref_dx):
        assert rel_err(a, b) < 1e-13
    assert all(g is None for g in before.values())  # no biases here: every dW is deferred
    for name, g in _grads(model).items():
        assert rel_err(g, ref[name]) < 1e-13, name


@pytest.mark.parametrize("view", [False, True])
def test_grouped_linear_parameter_view_and_tensor_hook(view):
    """The op may get a transposed view of an ``[E, out, in]`` parameter: the deferred dW goes
    back through the view; a tensor hook that cannot take ``None`` (``g * 2``) sees only the
    real gradient, at pop."""
    w = nn.Parameter(torch.randn(4, 10, 6, dtype=torch.float64))
    bias = nn.Parameter(torch.randn(4, 10 if view else 6, dtype=torch.float64))
    routing = build_routing(make_ids(30, 1, 4), 4)
    x = torch.randn(30, 6 if view else 10, dtype=torch.float64)[routing.token_index]

    def run():
        wt = w.transpose(-1, -2) if view else w
        return grouped_linear(x, wt, routing.offsets, bias, routing.expert_index)

    out = run()
    up = torch.randn_like(out)
    out.backward(up)
    ref_w, ref_b = w.grad.clone(), bias.grad.clone()
    w.grad = bias.grad = None
    w.register_hook(lambda g: g * 2)
    with WEIGHT_GRAD_STORE:
        out2 = run()
        out2.backward(up)
        WEIGHT_GRAD_STORE.flush()
    assert w.grad is None and rel_err(bias.grad, ref_b) < 1e-14
    WEIGHT_GRAD_STORE.pop()
    assert torch.equal(out, out2)
    assert rel_err(w.grad, 2 * ref_w) < 1e-14


def test_dense_linear_defers_weight_not_bias_nd_input():
    lin = nn.Linear(8, 5, dtype=torch.float64)
    x = torch.randn(3, 4, 8, dtype=torch.float64, requires_grad=True)
    ref = torch.autograd.grad(lin(x).pow(2).sum(), (x, lin.weight, lin.bias))
    with WEIGHT_GRAD_STORE:
        linear(x, lin.weight, lin.bias).pow(2).sum().backward()
        WEIGHT_GRAD_STORE.flush()
    assert lin.weight.grad is None and lin.bias.grad is not None
    WEIGHT_GRAD_STORE.pop()
    for t, r in zip((x, lin.weight, lin.bias), ref):
        assert rel_err(t.grad, r) < 1e-14


def test_frozen_weights_no_grad_and_disabled_are_not_deferred():
    w = torch.randn(3, 4)
    with WeightGradStore():
        assert defer(w) == (w, None)  # frozen
        p = nn.Parameter(w)
        with torch.no_grad():
            assert defer(p)[1] is None
        assert defer(p)[1] is not None
    assert defer(p) == (p, None)  # disabled: the weight passes through untouched


def test_autograd_grad_for_inputs_queues_nothing():
    """``torch.autograd.grad(out, [x])`` never touches ``.grad`` in eager, so nothing is queued
    (pipelining runs such passes for metadata)."""
    w = nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with WeightGradStore() as store:
        (dx,) = torch.autograd.grad(linear(x, w).sum(), [x])
        assert store.queued() == 0 and w.grad is None
    assert torch.equal(dx, w.sum(0).expand(2, 3))


def test_errors():
    store = WeightGradStore()
    with pytest.raises(RuntimeError, match="empty queue"):
        store.pop()
    w = nn.Parameter(torch.randn(4, 3))
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match="not flushed"), store:
        linear(x, w).sum().backward()
    assert not store.enabled and store.queued() == 0
    store.enable()
    with pytest.raises(RuntimeError, match="already enabled"):
        store.enable()
    with pytest.raises(RuntimeError, match="another WeightGradStore"):
        WeightGradStore().enable()
    linear(x, w).sum().backward()
    with pytest.raises(RuntimeError, match="not flushed"):
        store.disable()
    with pytest.raises(RuntimeError, match="call flush"):
        store.pop()
    store.flush()
    store.disable()
    store.pop()  # flushed groups stay poppable after the scope
    with pytest.raises(RuntimeError, match="not enabled"):
        store.disable()

    x2 = torch.randn(2, 3, requires_grad=True)
    x2.register_hook(lambda g: store.enable())
    with pytest.raises(RuntimeError, match="while a backward pass is running"):
        linear(x2, w).sum().backward()
    assert not store.enabled

    with pytest.raises(KeyError), store:  # an error in the scope propagates unmasked
        linear(x, w).sum().backward()
        raise KeyError("boom")
    assert not store.enabled and store.queued() == 0

    with store:
        linear(x, w).sum().backward()
        runner = store.dw_builder()
    runner()
    with pytest.raises(RuntimeError, match="already been run"):
        runner()


def test_block_disabled_is_unchanged():
    torch.manual_seed(0)
    block = MoEBlock(16, 8, 4, 2, dtype=torch.float64)
    out, _ = block(torch.randn(6, 16, dtype=torch.float64))
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    assert not WEIGHT_GRAD_STORE.enabled and WEIGHT_GRAD_STORE.pending() == 0


def _run_two(worker: str) -> None:
    here = Path(__file__).parent
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), os.environ.get("PYTHONPATH",
                                                                                 "")]))
    procs = [subprocess.Popen([sys.executable, str(here / worker), str(r), str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} ok" in out, err[-3000:]


def test_two_stage_pipeline_zero_bubble_schedule_matches_plain_backward():
    """Two gloo processes, one stage each: F F F, B B B (dX only), W W W (pop) gives the
    gradients of plain single-process backward."""
    _run_two("pipeline_zb_worker.py")


def test_torch_pipelining_zero_bubble_schedules_with_store():
    """torch.distributed.pipelining's ScheduleInterleavedZeroBubble and ScheduleZBVZeroBubble
    (2 gloo ranks, 2 stages each) with stages built with ``dw_builder=WEIGHT_GRAD_STORE
    .dw_builder``: the weight steps run groupmoe's deferred dW, and every gradient equals
    plain backward."""
    _run_two("pipeline_torch_zb_worker.py")


@pytest.mark.gpu
def test_expert_block_store_on_vs_off_cuda_bf16():
    experts = GroupedExperts(256, 128, 8, "gptoss", True, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    ids = make_ids(512, 2, 8).cuda()
    gates = torch.rand(512, 2, device="cuda", dtype=torch.bfloat16)
    experts(x, ids, gates).float().square().sum().backward()
    ref = _grads(experts)
    experts.zero_grad(set_to_none=True)
    with WEIGHT_GRAD_STORE:
        experts(x, ids, gates).float().square().sum().backward()
        WEIGHT_GRAD_STORE.flush()
    assert experts.gate_up.grad is None and experts.gate_up_bias.grad is not None
    WEIGHT_GRAD_STORE.pop()
    for name, g in _grads(experts).items():
        assert rel_err(g, ref[name]) < 1e-2, name
