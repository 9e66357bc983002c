"""WeightGradStore: deferred weight gradients equal eager ones; errors; pipeline schedule."""

import pytest
import torch

from dist_helpers import free_port
from groupmoe import MoEBlock
from groupmoe.ops import build_routing, expert_mlp, grouped_linear
from groupmoe.parallel import WEIGHT_GRAD_STORE, WeightGradStore, linear
from moe_cases import make_case, rel_err


def _expert_grads(case, store_on, micro_batches=2):
    routing = build_routing(case.ids, case.num_experts)
    for leaf in case.leaves():
        leaf.grad = None
    outs = []
    for mb in range(micro_batches):
        if store_on:
            WEIGHT_GRAD_STORE.enable()
        out = expert_mlp(case.x, routing, case.gates, case.w1, case.w2, case.b1, case.b2,
                         "gptoss")
        out.backward(torch.full_like(out, 0.5 + mb))
        outs.append(out.detach())
        if store_on:
            WEIGHT_GRAD_STORE.flush()
            WEIGHT_GRAD_STORE.disable()
            assert case.w1.grad is None or mb > 0  # deferred until pop
            assert case.b1.grad is not None  # bias grads stay eager
    if store_on:
        assert WEIGHT_GRAD_STORE.pending() == micro_batches
        while WEIGHT_GRAD_STORE.pending():
            WEIGHT_GRAD_STORE.pop()
    return outs, {n: t.grad.clone() for n, t in zip(case.names(), case.leaves())}


def test_expert_mlp_store_on_vs_off():
    case = make_case(20, 16, 8, 4, 2, torch.float64, bias=True, activation="gptoss", scale=3)
    ref_out, ref = _expert_grads(case, False)
    out, got = _expert_grads(case, True)
    for a, b in zip(out, ref_out):
        assert torch.equal(a, b)
    for n in ref:
        assert rel_err(got[n], ref[n]) < 1e-13, n


def test_weight_grads_absent_before_pop_present_after():
    case = make_case(12, 16, 8, 4, 2, torch.float64, bias=True)
    routing = build_routing(case.ids, 4)
    with WeightGradStore() as store:
        pass  # a fresh store works as a context manager too
    with WEIGHT_GRAD_STORE:
        expert_mlp(case.x, routing, case.gates, case.w1, case.w2, case.b1, case.b2).sum() \
            .backward()
        WEIGHT_GRAD_STORE.flush()
    assert case.w1.grad is None and case.w2.grad is None
    assert case.b1.grad is not None and case.b2.grad is not None and case.x.grad is not None
    WEIGHT_GRAD_STORE.pop()
    assert case.w1.grad is not None and case.w2.grad is not None
    assert store.pending() == 0


def test_views_hooks_and_existing_grad():
    """A transposed view of a parameter, an existing .grad and a post-accumulate hook."""
    w = torch.nn.Parameter(torch.randn(3, 8, 4, dtype=torch.float64))  # [E, out, in]
    w.grad = torch.ones_like(w)
    seen = []
    w.register_post_accumulate_grad_hook(lambda p: seen.append(None if p.grad is None
                                                               else p.grad.clone()))
    r = build_routing(torch.tensor([[0], [2], [2], [1], [0]]), 3)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    ref = torch.ones_like(w) + torch.autograd.grad(
        grouped_linear(x, w.transpose(1, 2), r.offsets).sum(), w)[0]
    with WEIGHT_GRAD_STORE:
        grouped_linear(x, w.transpose(1, 2), r.offsets).sum().backward()
        WEIGHT_GRAD_STORE.flush()
    assert torch.equal(w.grad, torch.ones_like(w))
    WEIGHT_GRAD_STORE.pop()
    assert torch.allclose(w.grad, ref)
    assert seen[-1] is not None and torch.allclose(seen[-1], ref)


def test_dense_linear_defers_weight_not_bias():
    lin = torch.nn.Linear(6, 5).double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    ref_w, ref_b, ref_x = torch.autograd.grad(lin(x).pow(2).sum(), (lin.weight, lin.bias, x))
    with WEIGHT_GRAD_STORE:
        linear(x, lin.weight, lin.bias).pow(2).sum().backward()
        WEIGHT_GRAD_STORE.flush()
    assert lin.weight.grad is None and torch.allclose(lin.bias.grad, ref_b)
    assert torch.allclose(x.grad, ref_x)
    WEIGHT_GRAD_STORE.pop()
    assert torch.allclose(lin.weight.grad, ref_w)


def test_errors():
    store = WeightGradStore()
    with pytest.raises(RuntimeError, match="empty queue"):
        store.pop()
    store.enable()
    store.defer(torch.zeros(1, requires_grad=True), lambda: torch.zeros(1))
    with pytest.raises(RuntimeError, match="not flushed"):
        store.disable()
    with pytest.raises(RuntimeError, match="not flushed"), store:
        store.defer(torch.zeros(1, requires_grad=True), lambda: torch.zeros(1))

    class Enabler(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            WeightGradStore().enable()
            return g

    with pytest.raises(RuntimeError, match="while a backward pass is running"):
        Enabler.apply(torch.ones(2, requires_grad=True)).sum().backward()


def test_block_disabled_is_unchanged():
    torch.manual_seed(0)
    block = MoEBlock(16, 8, 4, 2, dtype=torch.float64)
    x = torch.randn(6, 16, dtype=torch.float64)
    out, _ = block(x)
    out.sum().backward()
    assert all(p.grad is not None for p in block.parameters())
    assert not WEIGHT_GRAD_STORE.enabled and WEIGHT_GRAD_STORE.pending() == 0


def test_two_stage_pipeline_zero_bubble_schedule_matches_plain_backward():
    """Two gloo processes, one stage each: F F F, B B B (dX only), W W W (pop) gives the
    gradients of plain single-process backward."""
    _run_two("pipeline_zb_worker.py")


def _run_two(worker: str) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

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


def test_torch_pipelining_interleaved_zero_bubble_with_store():
    """torch.distributed.pipelining's ScheduleInterleavedZeroBubble (2 gloo ranks, 2 stages
    each) with stages built with ``dw_builder=WEIGHT_GRAD_STORE.dw_builder``: the weight steps
    run groupmoe's deferred dW, and every gradient equals plain backward."""
    _run_two("pipeline_torch_zb_worker.py")
