"""ops.library.differentiable: custom ops with autograd through a plain autograd.Function."""

from collections.abc import Sequence

import torch

from groupmoe.ops.library import differentiable, needs_input_grad

Tensor = torch.Tensor


@torch.library.custom_op("groupmoe_test::weighted_sum", mutates_args=())
def _weighted_sum(x: Tensor, ws: Sequence[Tensor], meta: Sequence[int], scale: float) -> Tensor:
    """``scale * sum_i x * ws[i]`` (``meta`` unused: a list of ints passes through)."""
    return sum(x * w for w in ws) * scale


@_weighted_sum.register_fake
def _(x, ws, meta, scale):
    return torch.empty_like(x)


SEEN = []


def _setup(ctx, inputs, output):
    x, ws, meta, scale = inputs
    ctx.scale, ctx.n = scale, len(ws)
    ctx.save_for_backward(x, *ws)


def _backward(ctx, dout):
    x, *ws = ctx.saved_tensors
    need_x, needs_w, need_meta, need_scale = needs_input_grad(ctx)
    if not torch.compiler.is_compiling():  # a side effect dynamo would refuse
        SEEN.append((need_x, needs_w))
    dx = sum(dout * w for w in ws) * ctx.scale if need_x else None
    dws = [dout * x * ctx.scale if n else None for n in needs_w]
    return dx, dws, [], None  # a list for the int list: turned into None


weighted_sum = differentiable(_weighted_sum, _backward, _setup)


def test_gradients_reach_list_elements_and_follow_requires_grad():
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(5, dtype=torch.float64, requires_grad=r) for r in (True, False, True)]
    SEEN.clear()
    weighted_sum(x, ws, [1, 2], 0.5).square().sum().backward()
    assert SEEN == [(True, [True, False, True])]
    xr, wr = x.detach().requires_grad_(), [w.detach().requires_grad_() for w in ws]
    (sum(xr * w for w in wr) * 0.5).square().sum().backward()
    assert torch.allclose(x.grad, xr.grad)
    assert torch.allclose(ws[0].grad, wr[0].grad) and torch.allclose(ws[2].grad, wr[2].grad)
    assert ws[1].grad is None


def test_no_grad_inputs_give_a_plain_tensor():
    out = weighted_sum(torch.randn(3), [torch.randn(3)], [], 2.0)
    assert out.grad_fn is None and not out.requires_grad


def test_compiles_fullgraph_as_one_op():
    x = torch.randn(6, requires_grad=True)
    ws = [torch.randn(6, requires_grad=True) for _ in range(2)]
    compiled = torch.compile(lambda a, b: weighted_sum(a, b, [3], 1.5).sum(), fullgraph=True,
                             backend="aot_eager")
    compiled(x, ws).backward()
    want = [t.grad.clone() for t in (x, *ws)]
    for t in (x, *ws):
        t.grad = None
    weighted_sum(x, ws, [3], 1.5).sum().backward()
    assert all(torch.allclose(a, t.grad) for a, t in zip(want, (x, *ws)))


@torch.library.custom_op("groupmoe_test::with_intermediate", mutates_args=())
def _with_intermediate(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(2 x, x^2)``: a result and an intermediate kept for backward (as expert_mlp's h)."""
    return 2 * x, x * x


@_with_intermediate.register_fake
def _(x):
    return torch.empty_like(x), torch.empty_like(x)


def _keep_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _keep_backward(ctx, dout, dkept):
    SEEN.append(dkept)
    return (2 * dout,)


with_intermediate = differentiable(_with_intermediate, _keep_backward, _keep_setup)


def test_unused_outputs_get_no_materialised_gradient():
    """An op's extra outputs (intermediates for backward, absent placeholders) are never used:
    backward gets None for them, not a zero tensor as large as each (expert_mlp's h would be
    one more h alive through the whole backward); an unused result gives no gradients."""
    x = torch.randn(6, requires_grad=True)
    SEEN.clear()
    out, _ = with_intermediate(x)
    out.sum().backward()
    assert SEEN == [None] and torch.equal(x.grad, torch.full((6,), 2.0))
    x.grad = None
    out, kept = with_intermediate(x)
    kept.sum().backward()  # only the intermediate used: the op's backward is not run
    assert x.grad is None and len(SEEN) == 1
