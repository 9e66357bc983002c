"""GPU tests (skipped without CUDA): bf16 parity with the fp32 oracle at the benchmark shapes."""

import dataclasses

import pytest
import torch

from groupmoe.bench.shapes import SHAPES
from groupmoe.ops import (
    build_routing,
    expert_mlp,
    expert_mlp_naive,
    expert_mlp_reference,
    grouped_mm_wgrad,
    native_available,
    route,
)
from moe_cases import rel_err

pytestmark = pytest.mark.gpu


def _problem(shape, tokens, dtype, skew=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    h, i, e = shape.hidden, shape.intermediate, shape.experts
    x = torch.randn(tokens, h, device=dev, generator=g)
    logits = torch.randn(tokens, e, device=dev, generator=g)
    if skew:  # starve half the experts
        logits[:, e // 2:] -= 100
    gates, ids = route(logits, shape.top_k, shape.router)
    w1 = torch.randn(e, h, 2 * i, device=dev, generator=g) * h ** -0.5
    w2 = torch.randn(e, i, h, device=dev, generator=g) * i ** -0.5
    b1 = torch.randn(e, 2 * i, device=dev, generator=g) * 0.1 if shape.bias else None
    b2 = torch.randn(e, h, device=dev, generator=g) * 0.1 if shape.bias else None
    leaves = [t for t in (x, gates, w1, w2, b1, b2) if t is not None]
    return [t.to(dtype).requires_grad_(True) for t in leaves], ids


def _fwd_bwd(fn, leaves, ids, shape, dout):
    for t in leaves:
        t.grad = None
    x, gates, w1, w2, *biases = leaves
    b1, b2 = biases if biases else (None, None)
    args = (w1, w2, b1, b2, shape.activation)
    if fn is expert_mlp_reference:
        out = fn(x, ids, gates, *args)
    else:
        out = fn(x, build_routing(ids, shape.experts), gates, *args)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("skew", [False, True])
@pytest.mark.parametrize("name", list(SHAPES))
def test_bf16_matches_fp32_oracle(name, skew):
    shape = SHAPES[name]
    # the fp32 oracle holds every stack, its gradient and the loop's copies: keep the layer's
    # dims and top-k but at most 64 experts (deepseek-v4's 256 need ~100 GiB)
    shape = dataclasses.replace(shape, experts=min(shape.experts, 64))
    tokens = 256 if name != "mixtral-8x7b" else 128
    ref_leaves, ids = _problem(shape, tokens, torch.float32, skew)
    dout = torch.randn(tokens, shape.hidden, device="cuda")
    ref_out, ref_grads = _fwd_bwd(expert_mlp_reference, ref_leaves, ids, shape, dout)
    bf_leaves = [t.detach().bfloat16().requires_grad_(True) for t in ref_leaves]
    for fn in (expert_mlp, expert_mlp_naive):
        out, grads = _fwd_bwd(fn, bf_leaves, ids, shape, dout)
        assert out.dtype == torch.bfloat16
        assert rel_err(out, ref_out) < 1e-2, fn.__name__
        for k, (a, b) in enumerate(zip(grads, ref_grads)):
            assert rel_err(a, b) < 1e-2, (fn.__name__, k)


def test_native_grouped_mm_is_used_for_bf16():
    a = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    assert native_available(a, b)


def test_wgrad_empty_groups_are_zero_on_cuda():
    a = torch.randn(64, 128, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    offs = torch.tensor([0, 20, 20, 64, 64], device="cuda", dtype=torch.int32)
    dw = grouped_mm_wgrad(a, dy, offs)
    assert torch.count_nonzero(dw[0]) == 0 and torch.count_nonzero(dw[2]) == 0
    assert torch.count_nonzero(dw[4]) == 0
    assert rel_err(dw[1], a[:20].float().t() @ dy[:20].float()) < 1e-2


def test_save_none_matches_save_h_on_cuda():
    shape = SHAPES["qwen3-30b-a3b"]
    leaves, ids = _problem(shape, 512, torch.bfloat16)
    dout = torch.randn(512, shape.hidden, device="cuda")
    out_h, g_h = _fwd_bwd(expert_mlp, leaves, ids, shape, dout)
    x, gates, w1, w2 = leaves
    for t in leaves:
        t.grad = None
    out = expert_mlp(x, build_routing(ids, shape.experts), gates, w1, w2, save="none")
    out.backward(dout.bfloat16())
    assert torch.equal(out.detach(), out_h)
    for a, b in zip([t.grad for t in leaves], g_h):
        assert torch.equal(a, b)  # recompute is bit-identical


def test_logits_check_costs_no_sync_and_raises_late():
    """Validation on (the default): the NaN/Inf check of router logits runs on the device and
    reads its result back without a host sync; the failure surfaces at flush_checks naming the
    layer and token. GROUPMOE_VALIDATE=sync raises inside the call."""
    from groupmoe.ops import flush_checks, set_validation

    logits = torch.randn(64, 16, device="cuda")
    logits[5, 7] = float("nan")
    flush_checks()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        route(logits, 2, where="layer 4 router")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(FloatingPointError, match="layer 4 router.*token 5, expert 7.*after"):
        flush_checks()
    set_validation("sync")
    try:
        with pytest.raises(FloatingPointError, match=r"token 5, expert 7\); check"):
            route(logits, 2)
    finally:
        set_validation(True)
