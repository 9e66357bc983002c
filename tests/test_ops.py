"""Parity of the grouped paths with the per-expert oracle, forward and every gradient."""

import pytest
import torch

from groupmoe.ops import (
    Activation,
    activation_from_spec,
    build_routing,
    combine,
    expert_mlp,
    get_activation,
    grouped_linear,
    grouped_mm,
    grouped_mm_wgrad,
    route,
    scatter_for_grouped_gemm,
)
from moe_cases import make_case, make_ids, rel_err, run

SHAPES = [  # (T, H, I, E, k, load)
    pytest.param(37, 24, 20, 6, 2, "random", id="uneven-random"),
    pytest.param(29, 13, 7, 5, 3, "skewed", id="odd-sizes-empty-experts"),
    pytest.param(16, 16, 8, 1, 1, "random", id="one-expert"),
    pytest.param(21, 16, 12, 8, 1, "single", id="all-tokens-one-expert"),
    pytest.param(1, 12, 8, 4, 2, "random", id="T=1"),
    pytest.param(64, 32, 16, 16, 4, "skewed", id="16-experts-top4"),
]


@pytest.mark.parametrize("impl", ["groupmoe", "naive"])
@pytest.mark.parametrize("save", ["h", "none"])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gptoss", True),
                                             ("swiglu", True)])
@pytest.mark.parametrize("t,h,i,e,k,load", SHAPES)
def test_matches_oracle_fp64(t, h, i, e, k, load, activation, bias, save, impl):
    if impl == "naive" and save == "none":
        pytest.skip("save applies to the groupmoe path only")
    case = make_case(t, h, i, e, k, torch.float64, bias, activation, load,
                     scale=4.0 if activation == "gptoss" else 1.0)
    ref, ref_grads, up = run(case, "loop")
    out, grads, _ = run(case, impl, save, upstream=up)
    assert rel_err(out, ref) < 1e-12
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-11, name


@pytest.mark.parametrize("save", ["h", "none"])
@pytest.mark.parametrize("t,h,i,e,k,load", [(48, 32, 16, 8, 2, "random"),
                                            (40, 16, 12, 6, 3, "skewed")])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gptoss", True)])
def test_matches_oracle_fp32_native(t, h, i, e, k, load, activation, bias, save):
    """Aligned fp32 sizes run torch's grouped_mm kernels (not the loop fallback)."""
    case = make_case(t, h, i, e, k, torch.float32, bias, activation, load)
    ref, ref_grads, up = run(case, "loop")
    out, grads, _ = run(case, "groupmoe", save, upstream=up)
    assert rel_err(out, ref) < 1e-5
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 1e-5, name


# every form the parameterised activation takes (transformers' MoE families use each)
ACTIVATION_FORMS = {
    "geglu": Activation("gelu_tanh"),
    "gelu-erf-interleaved": Activation("gelu", layout="interleaved"),
    "clamped-swiglu": Activation(gate_limit=0.5, up_limit=0.7),
    "sigmoid-alpha-concat": Activation("sigmoid_alpha", gate_limit=1.0, up_limit=1.0,
                                       up_plus_one=True, alpha=1.702),
    "relu-fp32": Activation("relu", fp32=True),
    "relu2-no-gate": Activation("relu2", gated=False),
    "silu-no-gate-clamped": Activation(gated=False, gate_limit=0.3),
}


@pytest.mark.parametrize("form", list(ACTIVATION_FORMS))
def test_activation_form_backward_matches_autograd(form):
    """The hand-written backward against autograd through the forward (fp64; fp32 forms
    compute in fp32 as the models do), clamps hit on both sides."""
    act = ACTIVATION_FORMS[form]
    h = (torch.randn(23, 2 * 10 if act.gated else 10, dtype=torch.float64) * 2).requires_grad_()
    a = act(h)
    assert a.shape == (23, 10) and a.dtype == h.dtype
    da = torch.randn_like(a)
    (ref,) = torch.autograd.grad(a, h, da)
    tol = 1e-6 if act.fp32 else 1e-13
    assert rel_err(act.backward(h.detach(), da), ref) < tol
    assert activation_from_spec(act.spec) == act


def test_fp32_activation_rounds_like_the_model():
    """``fp32=True``: bf16 inputs computed in fp32 and rounded once, as ``(act(gate.float()) *
    up.float()).to(bf16)``."""
    h = torch.randn(64, 32).bfloat16()
    gate, up = h.float().chunk(2, dim=-1)
    want = (torch.nn.functional.gelu(gate, approximate="tanh") * up).bfloat16()
    assert torch.equal(Activation("gelu_tanh", fp32=True)(h), want)


@pytest.mark.parametrize("save", ["h", "none"])
@pytest.mark.parametrize("form", list(ACTIVATION_FORMS))
@pytest.mark.parametrize("t,h,i,e,k,load", SHAPES[:3])
def test_activation_forms_match_oracle(t, h, i, e, k, load, form, save):
    act = ACTIVATION_FORMS[form]
    case = make_case(t, h, i, e, k, torch.float64, True, act, load, scale=2.0)
    ref, ref_grads, up = run(case, "loop")
    out, grads, _ = run(case, "groupmoe", save, upstream=up)
    tol = 1e-6 if act.fp32 else 1e-11
    assert rel_err(out, ref) < tol
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < tol, name


@pytest.mark.parametrize("activation,bias", [("swiglu", True), ("gptoss", True)])
def test_signed_tiny_and_zero_gates(activation, bias):
    """The gate gradient never divides by g: exact for negative, zero and tiny weights."""
    case = make_case(30, 16, 8, 4, 2, torch.float64, bias, activation, signed_gates=True,
                     zero_gate=True)
    ref, ref_grads, up = run(case, "loop")
    for save in ("h", "none"):
        out, grads, _ = run(case, "groupmoe", save, upstream=up)
        assert rel_err(out, ref) < 1e-12
        for name in ref_grads:
            assert rel_err(grads[name], ref_grads[name]) < 1e-11, (save, name)
        assert torch.isfinite(grads["gates"]).all()


def test_frozen_weights_and_partial_grads():
    """Only what requires grad gets one; frozen weights skip the weight GEMMs."""
    case = make_case(20, 16, 8, 4, 2, torch.float64, bias=True)
    for w in (case.w1, case.w2, case.b1, case.b2):
        w.requires_grad_(False)
    routing = build_routing(case.ids, 4)
    out = expert_mlp(case.x, routing, case.gates, case.w1, case.w2, case.b1, case.b2)
    out.sum().backward()
    assert case.x.grad is not None and case.gates.grad is not None
    assert all(w.grad is None for w in (case.w1, case.w2, case.b1, case.b2))
    ref = make_case(20, 16, 8, 4, 2, torch.float64, bias=True)
    # same values through the oracle
    for a, b in zip(ref.leaves(), case.leaves()):
        a.data.copy_(b.data)
    ref.ids = case.ids
    _, ref_grads, _ = run(ref, "loop", upstream=torch.ones_like(out))
    assert rel_err(case.x.grad, ref_grads["x"]) < 1e-12
    assert rel_err(case.gates.grad, ref_grads["gates"]) < 1e-12


def test_gradients_with_none_incoming_and_noncontiguous_inputs():
    case = make_case(24, 16, 8, 4, 2, torch.float64)
    routing = build_routing(case.ids, 4)
    xt = case.x.detach().t().contiguous().t().requires_grad_(True)  # column-major x
    w1 = case.w1.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    gates = case.gates.detach().t().contiguous().t().requires_grad_(True)
    out = expert_mlp(xt, routing, gates, w1, case.w2)
    # an output that only partly feeds the loss: autograd passes zeros, not None, here
    (out[:5].sum() + 0 * out.sum()).backward()
    assert xt.grad is not None and w1.grad is not None and gates.grad is not None
    # a branch that does not use the output at all: backward is never called
    out2 = expert_mlp(case.x, routing, case.gates, case.w1, case.w2)
    (case.x.sum() + 0 * out2.detach().sum()).backward()


def test_gradcheck_small():
    case = make_case(7, 4, 3, 3, 2, torch.float64, bias=True, activation="gptoss", scale=3.0)
    routing = build_routing(case.ids, 3)
    for save in ("h", "none"):
        torch.autograd.gradcheck(
            lambda x, g, w1, w2, b1, b2, s=save: expert_mlp(x, routing, g, w1, w2, b1, b2,
                                                            "gptoss", s),
            tuple(case.leaves()),
        )


@pytest.mark.parametrize("name", ["swiglu", "gptoss"])
def test_activation_backward_matches_autograd(name):
    act = get_activation(name)
    h = (torch.randn(50, 16, dtype=torch.float64) * 5).requires_grad_(True)
    h.data[0, :] = 7.0  # exactly at the clamp limit: torch passes the gradient there
    da = torch.randn(50, 8, dtype=torch.float64)
    act(h).backward(da)
    assert rel_err(act.backward(h.detach(), da), h.grad) < 1e-13


def test_gptoss_activation_formula():
    h = torch.tensor([[1.0, 2.0, 9.0, -9.0]], dtype=torch.float64)
    gate = torch.tensor([1.0, 7.0], dtype=torch.float64)  # 9 clamped to 7
    up = torch.tensor([2.0, -7.0], dtype=torch.float64)  # -9 clamped to -7
    want = (up + 1) * gate * torch.sigmoid(1.702 * gate)
    assert torch.allclose(get_activation("gptoss")(h)[0], want)


def test_routing_metadata():
    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])
    r = build_routing(ids, 4)
    assert r.counts.tolist() == [2, 1, 3, 0]
    assert r.offsets.dtype == torch.int32 and r.offsets.tolist() == [2, 3, 6, 6]
    assert r.expert_index.tolist() == [0, 0, 1, 2, 2, 2]
    assert r.order.tolist() == [1, 4, 3, 0, 2, 5]  # stable within an expert
    assert r.token_index.tolist() == [0, 2, 1, 0, 1, 2]
    flat = torch.arange(6)
    assert torch.equal(flat[r.order][r.inverse], flat)


@pytest.mark.parametrize("alignment", [1, 8, 128])
def test_scatter_for_grouped_gemm_tail_is_zero_and_aligned(alignment):
    x = torch.randn(13, 8)
    r = build_routing(make_ids(13, 3, 5), 5)
    buf = scatter_for_grouped_gemm(x, r, alignment)
    n = 13 * 3
    assert buf.shape[0] >= int(r.offsets[-1]) == n
    assert buf.shape[0] % alignment == 0 and buf.shape[0] - n < alignment
    assert torch.equal(buf[:n], x[r.token_index])
    assert torch.count_nonzero(buf[n:]) == 0


def test_scatter_tail_zero_even_in_dirty_memory():
    x = torch.randn(5, 8)
    r = build_routing(make_ids(5, 1, 3), 3)
    for _ in range(3):  # reuse of freed blocks must not leak into the tail
        buf = scatter_for_grouped_gemm(x, r, 64)
        assert torch.count_nonzero(buf[5:]) == 0
        buf.fill_(float("nan"))
        del buf


def test_combine_fp32_accumulation_and_weights():
    ids = make_ids(10, 3, 4)
    r = build_routing(ids, 4)
    y = torch.randn(30, 6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(10, 3, dtype=torch.float64, requires_grad=True)
    out = combine(y, r, w)
    want = (y[r.inverse].view(10, 3, 6) * w.unsqueeze(-1)).sum(1)
    assert torch.allclose(out, want)
    gy, gw = torch.autograd.grad(out.sum(), (y, w))
    gy2, gw2 = torch.autograd.grad(want.sum(), (y, w))
    assert torch.allclose(gy, gy2) and torch.allclose(gw, gw2)
    yb = torch.full((30, 6), 1.0 + 2 ** -8, dtype=torch.bfloat16)  # bf16 sums would round
    assert combine(yb, r).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype,rows", [(torch.float32, 16), (torch.float32, 13),
                                        (torch.float64, 16), (torch.bfloat16, 16)])
def test_grouped_mm_and_wgrad_match_loop(dtype, rows):
    offs = torch.tensor([0, 5, 5, 11, 20], dtype=torch.int32)  # empty groups first and inside
    a = torch.randn(20, rows).to(dtype)
    b = torch.randn(5, rows, 8).to(dtype)
    out = grouped_mm(a, b, offs)
    dy = torch.randn(20, 8).to(dtype)
    dw = grouped_mm_wgrad(a, dy, offs)
    starts = [0, 0, 5, 5, 11]
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for g in range(5):
        s, e = starts[g], int(offs[g])
        ref = a[s:e].double() @ b[g].double()
        assert rel_err(out[s:e], ref) < tol if e > s else True
        ref_w = a[s:e].double().t() @ dy[s:e].double()
        if e > s:
            assert rel_err(dw[g], ref_w) < tol
        else:
            assert torch.count_nonzero(dw[g]) == 0


def test_grouped_linear_bias_grads_eager():
    r = build_routing(make_ids(12, 2, 3), 3)
    x = torch.randn(24, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 8, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    out = grouped_linear(x, w, r.offsets, b, r.expert_index)
    out.backward(torch.ones_like(out))
    assert torch.allclose(b.grad, r.counts.double().unsqueeze(1).expand(3, 4))
    ref = torch.cat([x[s:e] @ w[g] for g, (s, e) in enumerate(
        zip([0] + r.offsets[:-1].tolist(), r.offsets.tolist()))]) + b[r.expert_index]
    assert torch.allclose(out, ref)


def test_routers():
    logits = torch.randn(9, 6)
    w, ids = route(logits, 2, "softmax_topk", normalize=True)
    assert torch.allclose(w.sum(-1), torch.ones(9))
    p = torch.softmax(logits, -1)
    assert torch.allclose(w, p.gather(1, ids) / p.gather(1, ids).sum(-1, keepdim=True))
    w2, ids2 = route(logits, 2, "softmax_topk", normalize=False)
    assert torch.allclose(w2, p.gather(1, ids2))
    w3, ids3 = route(logits.bfloat16(), 2, "topk_softmax")
    assert w3.dtype == torch.bfloat16 and torch.equal(ids3, logits.bfloat16().topk(2).indices)
    wb, _ = route(logits.bfloat16(), 2)
    assert wb.dtype == torch.bfloat16  # weights come back in the logits' dtype


def test_bf16_relative_norm_error():
    case = make_case(64, 32, 16, 8, 2, torch.float32, bias=True, activation="gptoss")
    ref, ref_grads, up = run(case, "loop")
    bf = make_case(64, 32, 16, 8, 2, torch.bfloat16, bias=True, activation="gptoss")
    for a, b in zip(bf.leaves(), case.leaves()):
        a.data.copy_(b.data.to(torch.bfloat16))
    bf.ids = case.ids
    out, grads, _ = run(bf, "groupmoe", upstream=up.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < 2e-2, name


@pytest.mark.parametrize("save", ["h", "none"])
def test_input_and_weight_grad_options(save):
    case = make_case(24, 16, 8, 4, 2, torch.float64, bias=True, signed_gates=True,
                     zero_gate=True)
    ref, ref_grads, up = run(case, "loop")
    routing = build_routing(case.ids, 4)
    for leaf in case.leaves():
        leaf.grad = None
    out = expert_mlp(case.x, routing, case.gates, case.w1, case.w2, case.b1, case.b2,
                     save=save, input_grad=False, weight_grad=False)
    out.backward(up)
    assert rel_err(out, ref) < 1e-12
    assert case.x.grad is None and all(w.grad is None for w in (case.w1, case.w2, case.b1,
                                                                  case.b2))
    assert rel_err(case.gates.grad, ref_grads["gates"]) < 1e-11
    case.gates.grad = None
    out = expert_mlp(case.x, routing, case.gates, case.w1, case.w2, case.b1, case.b2,
                     save=save, weight_grad=False)
    out.backward(up)
    assert rel_err(case.x.grad, ref_grads["x"]) < 1e-11 and case.w1.grad is None


def test_save_default_from_environment(monkeypatch):
    from groupmoe.ops import experts

    monkeypatch.setattr(experts, "DEFAULT_SAVE", "bogus")
    case = make_case(4, 8, 4, 2, 1, torch.float64)
    with pytest.raises(ValueError, match="GROUPMOE_SAVE"):
        expert_mlp(case.x, build_routing(case.ids, 2), case.gates, case.w1, case.w2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gather_sum_is_differentiable(device):
    """Composed paths (LoRA on experts) rely on gather_sum's autograd, also where a Triton
    kernel computes it."""
    from groupmoe.ops import gather_sum

    r = build_routing(make_ids(9, 3, 5).to(device), 5)
    rows = torch.randn(27, 16, device=device, dtype=torch.float32, requires_grad=True)
    out = gather_sum(rows, r, torch.float32)
    assert out.requires_grad
    g = torch.randn_like(out)
    out.backward(g)
    ref_rows = rows.detach().clone().requires_grad_(True)
    combine(ref_rows, r).backward(g)
    assert rel_err(out, combine(ref_rows, r)) < 1e-6
    assert rel_err(rows.grad, ref_rows.grad) < 1e-6


def test_weight_grads_land_in_the_parameter_layout():
    """nn.Linear-layout stacks passed as transposed views get gradients laid out like the
    parameter (no strided copy when autograd accumulates them), with the same values."""
    case = make_case(20, 16, 8, 4, 2, torch.float32)
    w1p = torch.nn.Parameter(case.w1.detach().transpose(1, 2).contiguous())  # [E, 2I, H]
    w2p = torch.nn.Parameter(case.w2.detach().transpose(1, 2).contiguous())  # [E, H, I]
    ref, ref_grads, up = run(case, "loop")
    out = expert_mlp(case.x, build_routing(case.ids, 4), case.gates, w1p.transpose(1, 2),
                     w2p.transpose(1, 2))
    out.backward(up)
    assert w1p.grad.stride() == w1p.stride() and w2p.grad.stride() == w2p.stride()
    assert rel_err(w1p.grad.transpose(1, 2), ref_grads["w1"]) < 1e-5
    assert rel_err(w2p.grad.transpose(1, 2), ref_grads["w2"]) < 1e-5
