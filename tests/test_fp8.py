"""precision="fp8": e4m3 operands with rowwise power-of-two scales for the forward and dX
grouped GEMMs (groupmoe.ops.fp8). On CPU the numerics are emulated; the call into
torch._scaled_grouped_mm is checked against torch's own meta checks; CUDA cases are marked."""

import pytest
import torch

import groupmoe
from groupmoe.ops import build_routing, expert_mlp
from groupmoe.ops.fp8 import E4M3_MAX, fp8_grouped_mm, quantize_rowwise
from groupmoe.ops.grouped_gemm import grouped_mm
from moe_cases import make_case, rel_err, run

# relative norm vs full precision: e4m3 rounding of both operands of a GEMM gives ~0.06, a
# chain of two ~0.1 at these small sizes; a wrong scale or layout gives ~1
FP8_TOL = 0.15


def test_quantize_rowwise_bounds_and_scales():
    x = torch.randn(6, 40) * torch.tensor([1e-30, 1e-3, 1.0, 1e3, 1e30, 0.0]).unsqueeze(1)
    data, inv = quantize_rowwise(x)
    assert data.dtype == torch.float8_e4m3fn and inv.shape == (6,)
    scaled = data.float()
    assert torch.isfinite(scaled).all() and scaled.abs().max() <= E4M3_MAX
    assert torch.equal(torch.exp2(torch.round(torch.log2(inv))), inv)  # powers of two
    deq = scaled * inv.unsqueeze(1)
    amax = x.abs().amax(1, keepdim=True)
    assert ((deq - x).abs() <= x.abs() * 2 ** -4 + amax * 2 ** -16).all()
    assert (deq[5] == 0).all()
    # each row uses the range: its largest value lands in the top binade of e4m3
    assert (scaled[:5].abs().amax(1) > E4M3_MAX / 2).all()
    # bf16 input scales in bf16 (power-of-two scales are exact there): the same bytes as fp32
    xb = x[1:4].bfloat16()
    got, want = quantize_rowwise(xb), quantize_rowwise(xb.float())
    assert torch.equal(got[0].float(), want[0].float()) and torch.equal(got[1], want[1])


def test_compiled_quantization_is_bit_identical():
    """CUDA quantizes through torch.compile (Inductor fuses amax, scale and cast): no graph
    break, the same bytes as the eager ops (checked here with Inductor's CPU code)."""
    from groupmoe.ops.fp8 import _compiled_quantize

    torch.manual_seed(0)
    x = torch.randn(37, 48).bfloat16() * 5
    assert torch._dynamo.explain(quantize_rowwise)(x).graph_break_count == 0
    for t in (x, torch.randn(3, 32, 16).transpose(-1, -2)):  # rows, and a weight's columns
        got, want = _compiled_quantize()(t), quantize_rowwise(t)
        assert torch.equal(got[0].float(), want[0].float()) and torch.equal(got[1], want[1])
        assert got[0].is_contiguous()


@pytest.mark.parametrize("m,k,n,groups", [(50, 24, 10, 4), (7, 33, 5, 3), (0, 16, 16, 2)])
def test_fp8_grouped_mm_emulation(m, k, n, groups):
    torch.manual_seed(0)
    a, b = torch.randn(m, k), torch.randn(groups, k, n)
    ends = torch.sort(torch.randint(0, m + 1, (groups,))).values
    ends[0] = 0  # an empty first group
    offs = ends.to(torch.int32)
    got = fp8_grouped_mm(a, b, offs, torch.float32)
    a_q, a_inv = quantize_rowwise(a)
    b_q, b_inv = quantize_rowwise(b.transpose(-1, -2))
    a_deq = (a_q.double() * a_inv.double().unsqueeze(-1))
    b_deq = (b_q.double() * b_inv.double().unsqueeze(-1)).transpose(-1, -2)
    exact = torch.zeros(m, n, dtype=torch.float64)
    start = 0
    for g, end in enumerate(ends.tolist()):
        exact[start:end] = a_deq[start:end] @ b_deq[g]
        start = end
    rows = int(ends[-1])
    assert torch.allclose(got[:rows].double(), exact[:rows], rtol=1e-5, atol=1e-5)
    if rows:
        full = grouped_mm(a, b, offs)[:rows]
        assert 1e-3 < rel_err(got[:rows], full) < FP8_TOL  # quantized, and close


def test_scaled_grouped_mm_call_passes_torch_checks():
    """The CUDA branch's operands (layouts, scale shapes, dtypes) through torch's own checks of
    torch._scaled_grouped_mm, on the meta device."""
    a = torch.empty(64, 32, device="meta", dtype=torch.bfloat16)
    b = torch.empty(4, 32, 48, device="meta", dtype=torch.bfloat16)
    offs = torch.empty(4, device="meta", dtype=torch.int32)
    for w in (b, b.transpose(-1, -2).contiguous().transpose(-1, -2)):  # either weight layout
        out = fp8_grouped_mm(a, w, offs, torch.float32)
        assert out.shape == (64, 48) and out.dtype == torch.float32


@pytest.mark.parametrize("bias,activation,load", [(False, "swiglu", "random"),
                                                  (True, "gptoss", "skewed"),
                                                  (False, "geglu", "single")])
def test_expert_mlp_fp8_matches_oracle_within_fp8_rounding(bias, activation, load):
    torch.manual_seed(0)
    case = make_case(t=29, h=24, i=20, e=6, k=2, dtype=torch.float32, bias=bias,
                     activation=activation, load=load, signed_gates=True)
    out, grads, up = run(case, "loop")
    out8, grads8, _ = run(case, "groupmoe", upstream=up, precision="fp8")
    assert 1e-3 < rel_err(out8, out) < FP8_TOL
    for name in grads:
        assert rel_err(grads8[name], grads[name]) < FP8_TOL, name


@pytest.mark.parametrize("save,calls", [("h", 4), ("none", 5)])
def test_fp8_runs_every_forward_and_dx_gemm(save, calls, monkeypatch):
    """Two forward GEMMs, two dX GEMMs (and the recomputed gate_up with save="none") in FP8;
    the weight gradients in the input precision."""
    from groupmoe.ops import experts

    seen = []

    def counting(a, b, offs, out_dtype):
        seen.append(tuple(b.shape))
        return fp8_grouped_mm(a, b, offs, out_dtype)

    monkeypatch.setattr(experts, "fp8_grouped_mm", counting)
    case = make_case(t=9, h=16, i=8, e=3, dtype=torch.float32)
    run(case, "groupmoe", save=save, precision="fp8")
    assert len(seen) == calls
    assert {(3, 16, 16), (3, 8, 16), (3, 16, 8)} == set(seen)  # W1, W2, W2^T, W1^T


def test_fp8_modules_and_errors():
    torch.manual_seed(0)
    block = groupmoe.MoEBlock(32, 16, 4, 2, precision="fp8")
    ref = groupmoe.MoEBlock(32, 16, 4, 2)
    ref.load_state_dict(block.state_dict())
    x = torch.randn(10, 32)
    assert 1e-3 < rel_err(block(x)[0], ref(x)[0]) < FP8_TOL
    with pytest.raises(ValueError, match="needs impl='groupmoe'"):
        groupmoe.GroupedExperts(8, 4, 2, impl="naive", precision="fp8")
    with pytest.raises(ValueError, match="precision must be one of"):
        groupmoe.GroupedExperts(8, 4, 2, precision="fp4")
    case = make_case(t=5, dtype=torch.float32)
    routing = build_routing(case.ids, case.num_experts)
    with pytest.raises(ValueError, match="backend='triton' has no FP8"):
        expert_mlp(case.x, routing, case.gates, case.w1, case.w2, precision="fp8",
                   backend="triton")


@pytest.mark.gpu
def test_fp8_on_cuda_matches_bf16_within_fp8_rounding():
    torch.manual_seed(0)
    dev = "cuda"
    t, h, i, e, k = 512, 256, 128, 8, 2
    x = torch.randn(t, h, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w1 = (torch.randn(e, h, 2 * i, device=dev) / h ** 0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(e, i, h, device=dev) / i ** 0.5).bfloat16().requires_grad_()
    g = torch.rand(t, k, device=dev, dtype=torch.bfloat16).requires_grad_()
    routing = build_routing(torch.randn(t, e, device=dev).topk(k).indices, e)
    up = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
    results = []
    for precision in ("default", "fp8"):
        for leaf in (x, w1, w2, g):
            leaf.grad = None
        out = expert_mlp(x, routing, g, w1, w2, precision=precision)
        out.backward(up)
        results.append([out.detach()] + [leaf.grad.clone() for leaf in (x, w1, w2, g)])
    for got, want in zip(results[1], results[0]):
        assert rel_err(got, want) < FP8_TOL
    # the GPU kernel and the CPU emulation agree on the same quantized operands
    a, b = x.detach()[:100], w1.detach()
    offs = torch.tensor([10, 10, 40, 50, 60, 70, 90, 100], device=dev, dtype=torch.int32)
    on_gpu = fp8_grouped_mm(a, b, offs, torch.float32)
    on_cpu = fp8_grouped_mm(a.cpu(), b.cpu(), offs.cpu(), torch.float32)
    assert rel_err(on_gpu.cpu(), on_cpu) < 1e-2


def test_fp8_block_compiles_without_graph_breaks():
    from moe_cases import compiled_and_eager
    from test_compile import compile_counting

    torch.manual_seed(0)
    block = groupmoe.MoEBlock(24, 12, 4, 2, precision="fp8")
    compiled, graphs = compile_counting(block, "aot_eager")
    for t in (11, 16):
        got, want = compiled_and_eager(compiled, block, torch.randn(t, 24),
                                       lambda r: r[0].square().sum())
        assert rel_err(got[0], want[0]) < 1e-6
        for name in want[1]:
            assert rel_err(got[1][name], want[1][name]) < 1e-5, name
    assert len(graphs) == 1
