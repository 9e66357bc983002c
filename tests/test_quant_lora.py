"""NF4 layout/dequant parity (with bitsandbytes where installed), frozen quantized experts,
grouped LoRA on experts against the merged-weight oracle, peft interop."""

import pytest
import torch

from groupmoe.lora import (
    ExpertLoRA,
    LoRAFactors,
    expert_mlp_lora,
    lora_from_peft_param_wrapper,
    unwrap_param_wrappers,
)
from groupmoe.lora.chunked import plan_chunks
from groupmoe.ops import build_routing, expert_mlp_reference
from groupmoe.quant import (
    NF4Tensor,
    QuantizedGroupedExperts,
    absmax_fp32,
    dequantize_nf4,
    dequantize_nf4_experts,
    quantize_nf4,
    stack_nf4,
)
from groupmoe.quant.nf4 import NF4_CODE
from interp_runner import assert_case, run_interpreted
from moe_cases import make_ids, rel_err
from nf4_interp_cases import CASES as NF4_INTERP_CASES

SHAPES = [(4, 64, 130), (3, 7, 5), (2, 128, 64), (1, 1, 33)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _weights(shape):
    return torch.randn(*shape) * (torch.rand(shape[0], 1, 1) * 3 + 0.1)


def _reference_dequant(t: NF4Tensor) -> torch.Tensor:
    """Element by element from the layout's definition (fp64, then rounded like bnb)."""
    b = t.packed.reshape(-1).long()
    codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)[: t.numel]
    scale = absmax_fp32(t).repeat_interleave(t.blocksize)[: t.numel]
    return (torch.tensor(NF4_CODE)[codes] * scale).view(t.shape)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_nf4_roundtrip_and_reference(shape, nested):
    w = _weights(shape)
    t = quantize_nf4(w, nested=nested)
    assert t.packed.shape == ((w.numel() + 1) // 2, 1) and t.packed.dtype == torch.uint8
    ref = _reference_dequant(t)
    for dtype in DTYPES:
        assert torch.equal(dequantize_nf4(t, dtype, backend="torch"), ref.to(dtype))
    # 4-bit NF4: error bounded by half the widest code gap times the block scale
    assert (dequantize_nf4(t) - w).abs().max() <= 0.17 * w.abs().max()


def test_high_nibble_first():
    w = torch.zeros(64)
    w[0], w[1] = -1.0, 1.0  # codes 0 and 15
    t = quantize_nf4(w)
    assert t.packed[0, 0].item() == 0x0F and t.absmax[0].item() == 1.0


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_bitsandbytes_parity(shape, nested):
    """Bit-exact with bitsandbytes' dequantize_4bit on its own QuantState (loaded, no
    conversion); our quantize gives bnb's bytes and absmax."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = _weights(shape)
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                  compress_statistics=nested)
    ours = quantize_nf4(w, nested=nested)
    assert torch.equal(ours.packed, q)
    if nested:  # second-level scales match; rare ties in the 8-bit codes may round differently
        assert torch.equal(ours.absmax2, state.state2.absmax)
        assert torch.equal(ours.offset, state.offset)
        assert (ours.absmax != state.absmax).float().mean() < 0.01
    else:
        assert torch.equal(ours.absmax, state.absmax)
    loaded = NF4Tensor.from_bnb(q, state)
    assert loaded.packed.data_ptr() == q.data_ptr()
    for dtype in DTYPES:
        state.dtype = dtype
        ref = bnbf.dequantize_4bit(q, state)
        assert torch.equal(dequantize_nf4(loaded, dtype, backend="torch"), ref)
        assert torch.equal(dequantize_nf4(loaded, dtype, backend="bnb"), ref)
    packed, st = ours.to_bnb()
    assert torch.equal(bnbf.dequantize_4bit(packed, st), dequantize_nf4(ours))


@pytest.fixture(scope="module")
def nf4_interp_results():
    pytest.importorskip("triton")
    return run_interpreted("nf4_interp_cases.py")


@pytest.mark.parametrize("name", list(NF4_INTERP_CASES))
def test_triton_kernel_interpreter(name, nf4_interp_results):
    """The Triton dequantize kernel (plain and nested scales, whole stacks and expert ranges)
    under Triton's CPU interpreter against the torch backend."""
    assert_case(nf4_interp_results, NF4_INTERP_CASES, name)


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
def test_triton_matches_bitsandbytes_gpu(nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = _weights((8, 256, 192)).cuda()
    q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
    loaded = NF4Tensor.from_bnb(q, state)
    for dtype in DTYPES:
        state.dtype = dtype
        ref = bnbf.dequantize_4bit(q, state)
        assert torch.equal(dequantize_nf4(loaded, dtype, backend="triton"), ref)
        assert torch.equal(dequantize_nf4(loaded, dtype, backend="torch"), ref)
        for backend in ("triton", "bnb", "torch"):
            assert torch.equal(dequantize_nf4_experts(loaded, 3, 6, dtype, backend), ref[3:6])


@pytest.mark.gpu
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gptoss", True)])
def test_chunked_qlora_bf16_gpu(activation, bias):
    """bf16 on CUDA (Triton dequantize and elementwise kernels): chunked vs whole-stack vs the
    fp64 oracle, and a smaller peak than the whole-stack path."""
    e, h, i, t, k, r = 16, 256, 192, 512, 4, 8
    torch.manual_seed(0)
    wg = torch.randn(e, 2 * i, h, device="cuda") / h ** 0.5
    wd = torch.randn(e, h, i, device="cuda") / i ** 0.5
    b1 = torch.randn(e, 2 * i, device="cuda", dtype=torch.bfloat16) * 0.1 if bias else None
    b2 = torch.randn(e, h, device="cuda", dtype=torch.bfloat16) * 0.1 if bias else None
    qg, qd = quantize_nf4(wg), quantize_nf4(wd)
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.stack([torch.randperm(e // 2, device="cuda")[:k] for _ in range(t)])  # half empty
    gates = torch.rand(t, k, device="cuda", dtype=torch.bfloat16).requires_grad_()
    mods = {d: QuantizedGroupedExperts(qg, qd, activation, b1, b2, dequant=d, lora_rank=r,
                                       dequant_chunk_bytes=3 * 2 * i * h * 2)
            for d in ("chunked", "recompute")}
    lora = mods["chunked"].lora.cuda().to(torch.bfloat16)
    torch.nn.init.normal_(lora.gate_up_b, std=0.1)
    torch.nn.init.normal_(lora.down_b, std=0.1)
    mods["recompute"].lora = lora
    leaves = [x, gates, *lora.parameters()]
    up = torch.randn(t, h, device="cuda", dtype=torch.bfloat16)
    res = {}
    for d, mod in mods.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = mod(x, ids, gates)
        res[d] = (out, torch.autograd.grad(out, leaves, up),
                  torch.cuda.max_memory_allocated() - base)
    d1, d2 = (dequantize_nf4(q, torch.float64, "torch").transpose(-1, -2) for q in (qg, qd))
    f = lora.factors()
    d1, d2 = d1 + f.gate_up.delta().double(), d2 + f.down.delta().double()
    bd = [None if b is None else b.double() for b in (b1, b2)]
    xd, gd = x.detach().double().requires_grad_(), gates.detach().double().requires_grad_()
    ref = expert_mlp_reference(xd, ids, gd, d1, d2, *bd, activation)
    ref_grads = torch.autograd.grad(ref, [xd, gd, *lora.parameters()], up.double())
    out, grads, peak = res["chunked"]
    assert rel_err(out, ref) < 1e-2
    for g, rg, wg_ in zip(grads, ref_grads, res["recompute"][1]):
        assert rel_err(g, rg) < 2e-2 and rel_err(g, wg_) < 2e-2
    assert peak < res["recompute"][2]


def test_stack_nf4_is_exact():
    parts = [quantize_nf4(_weights((1, 16, 64))[0], nested=i % 2 == 1) for i in range(4)]
    stacked = stack_nf4(parts)
    assert stacked.shape == (4, 16, 64)
    ref = torch.stack([dequantize_nf4(p) for p in parts])
    assert torch.equal(dequantize_nf4(stacked), ref)


def test_bad_input_errors():
    t = quantize_nf4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="absmax must hold"):
        NF4Tensor(t.packed, t.absmax[:-1], t.shape, t.dtype)
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(ValueError, match="backend"):
        dequantize_nf4(t, backend="cuda")
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        quantize_nf4(torch.randn(64).double())


# ----- LoRA on experts -----

def _lora_case(t=37, h=24, i=20, e=6, k=2, r=3, load="random", bias=False, dtype=torch.float64,
               activation="swiglu"):
    x = torch.randn(t, h, dtype=dtype, requires_grad=True)
    ids = make_ids(t, k, e, load)
    gates = (torch.rand(t, k, dtype=dtype) + 0.1).requires_grad_()
    w1 = torch.randn(e, h, 2 * i, dtype=dtype) / h ** 0.5
    w2 = torch.randn(e, i, h, dtype=dtype) / i ** 0.5
    b1 = torch.randn(e, 2 * i, dtype=dtype) * 0.1 if bias else None
    b2 = torch.randn(e, h, dtype=dtype) * 0.1 if bias else None
    facs = [torch.randn(e, d, r, dtype=dtype, requires_grad=True) for d in (h, i)]
    outs = [torch.randn(e, r, d, dtype=dtype, requires_grad=True) for d in (2 * i, h)]
    lora = ExpertLoRA(LoRAFactors(facs[0], outs[0], 0.5), LoRAFactors(facs[1], outs[1], 2.0))
    return x, ids, gates, w1, w2, b1, b2, lora


@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gptoss", True)])
@pytest.mark.parametrize("t,h,i,e,k,load", [(37, 24, 20, 6, 2, "random"),
                                            (29, 13, 7, 5, 3, "skewed"),
                                            (21, 16, 12, 8, 1, "single"),
                                            (1, 12, 8, 4, 2, "random")])
@pytest.mark.parametrize("base", ["frozen", "trainable"])
def test_lora_matches_merged_oracle_fp64(t, h, i, e, k, load, activation, bias, base):
    """Frozen stacks run the fused chunked op, trainable ones grouped linears under autograd:
    both equal to the merged oracle, every gradient."""
    x, ids, gates, w1, w2, b1, b2, lora = _lora_case(t, h, i, e, k, 3, load, bias,
                                                     activation=activation)
    names = ["x", "gates", "A1", "B1", "A2", "B2"]
    leaves = [x, gates, lora.gate_up.a, lora.gate_up.b, lora.down.a, lora.down.b]
    if base == "trainable":
        extra = {n: t.requires_grad_() for n, t in
                 zip(("W1", "W2", "b1", "b2"), (w1, w2, b1, b2)) if t is not None}
        names, leaves = names + list(extra), leaves + list(extra.values())
    ref = expert_mlp_reference(x, ids, gates, w1 + lora.gate_up.delta(),
                               w2 + lora.down.delta(), b1, b2, activation)
    up = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves, up)
    out = expert_mlp_lora(x, build_routing(ids, e), gates, w1, w2, lora, b1, b2, activation)
    grads = torch.autograd.grad(out, leaves, up)
    assert rel_err(out, ref) < 1e-12
    for name, g, rg in zip(names, grads, ref_grads):
        assert rel_err(g, rg) < 1e-11, name


def test_lora_one_projection_and_none():
    x, ids, gates, w1, w2, _, _, lora = _lora_case()
    routing = build_routing(ids, 6)
    only_down = ExpertLoRA(down=lora.down)
    ref = expert_mlp_reference(x, ids, gates, w1, w2 + lora.down.delta())
    assert rel_err(expert_mlp_lora(x, routing, gates, w1, w2, only_down), ref) < 1e-12
    ref0 = expert_mlp_reference(x, ids, gates, w1, w2)
    assert rel_err(expert_mlp_lora(x, routing, gates, w1, w2, None), ref0) < 1e-12
    with pytest.raises(ValueError, match="LoRA factors"):
        bad = ExpertLoRA(gate_up=LoRAFactors(lora.down.a, lora.down.b))
        expert_mlp_lora(x, routing, gates, w1, w2, bad)


# ----- quantized experts -----

@pytest.mark.parametrize("dequant", ["chunked", "recompute", "cache"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_quantized_experts_match_dequantized_oracle(dequant, nested, lora_rank):
    e, h, i, t, k = 6, 32, 16, 40, 2
    w1 = torch.randn(e, 2 * i, h) / h ** 0.5  # nn.Linear layout, as bitsandbytes stores it
    w2 = torch.randn(e, h, i) / i ** 0.5
    mod = QuantizedGroupedExperts(quantize_nf4(w1, nested=nested), quantize_nf4(w2, nested=nested),
                                  dequant=dequant, compute_dtype=torch.float32,
                                  lora_rank=lora_rank, lora_alpha=8,
                                  dequant_chunk_bytes=2 * 2 * i * h * 4)  # 2 experts (of 6)
    if mod.lora is not None:
        torch.nn.init.normal_(mod.lora.gate_up_b)
        torch.nn.init.normal_(mod.lora.down_b)
    x = torch.randn(t, h, requires_grad=True)
    ids = make_ids(t, k, e, "skewed")
    gates = (torch.rand(t, k) + 0.1).requires_grad_()
    out = mod(x, ids, gates)
    params = [x, gates] + list(mod.lora.parameters() if mod.lora else [])
    up = torch.randn_like(out)
    grads = torch.autograd.grad(out, params, up)

    d1, d2 = (dequantize_nf4(q).double().transpose(-1, -2) for q in (mod.gate_up_q, mod.down_q))
    if mod.lora is not None:
        lf = mod.lora.factors()
        d1 = d1 + lf.gate_up.delta().double()
        d2 = d2 + lf.down.delta().double()
    ref = expert_mlp_reference(x.double(), ids, gates.double(), d1, d2)
    ref_grads = torch.autograd.grad(ref, params, up.double())
    assert rel_err(out, ref) < 1e-5
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) < 1e-5


def test_recompute_keeps_no_dense_stack_on_tape():
    """With recompute, the dense stacks are rebuilt in backward: dequantize runs again."""
    e, h, i = 4, 32, 16
    calls = []
    mod = QuantizedGroupedExperts.from_dense(torch.randn(e, h, 2 * i), torch.randn(e, i, h),
                                             compute_dtype=torch.float32, lora_rank=2,
                                             dequant="recompute")
    orig = mod.dense_weights

    def counted():
        calls.append(1)
        return orig()

    mod.dense_weights = counted
    x = torch.randn(16, h, requires_grad=True)
    ids = make_ids(16, 2, e)
    gates = torch.rand(16, 2)
    import groupmoe.quant.experts as qe

    real = qe.dequantize_nf4
    n = []
    qe.dequantize_nf4 = lambda *a, **kw: (n.append(1), real(*a, **kw))[1]
    try:
        out = mod(x, ids, gates)
        forward_calls = len(n)
        out.sum().backward()
    finally:
        qe.dequantize_nf4 = real
    assert forward_calls == 2 and len(n) == 4  # gate_up and down rebuilt once each
    assert x.grad is not None and mod.lora.gate_up_a.grad is not None


def test_dequantize_experts_is_a_bit_exact_slice():
    """Any expert range, expert sizes that are and are not whole blocks, nested scales."""
    for shape in [(5, 7, 9), (4, 64, 130), (3, 128, 64), (1, 1, 33)]:
        for nested in (False, True):
            t = quantize_nf4(_weights(shape), nested=nested)
            full = dequantize_nf4(t, torch.float32, backend="torch")
            for a in range(shape[0] + 1):
                for b in range(a, shape[0] + 1):
                    got = dequantize_nf4_experts(t, a, b, torch.float32, backend="torch")
                    assert torch.equal(got, full[a:b]), (shape, nested, a, b)
    with pytest.raises(ValueError, match="bad range"):
        dequantize_nf4_experts(t, 0, 2)


def test_plan_chunks_cover_rows_and_skip_empty():
    ids = torch.tensor([[0, 3], [3, 6], [0, 6], [6, 3]])  # experts 1, 2, 4, 5 empty
    routing = build_routing(ids, 7)
    for per in range(1, 9):
        chunks = plan_chunks(routing, per)
        assert all(c.e1 - c.e0 <= per and c.r1 > c.r0 for c in chunks)
        assert [c.r0 for c in chunks[1:]] == [c.r1 for c in chunks[:-1]]
        assert chunks[0].r0 == 0 and chunks[-1].r1 == 8
        for c in chunks:
            assert c.offs.tolist() == [o - c.r0 for o in routing.offsets[c.e0:c.e1].tolist()]
    assert [(c.e0, c.e1) for c in plan_chunks(routing, 1)] == [(0, 1), (3, 4), (6, 7)]
    assert len(plan_chunks(routing, 3)) == 3  # [0, 3) [3, 6) [6, 7)
    with pytest.raises(ValueError, match="experts_per_chunk"):
        plan_chunks(routing, 0)


def _chunked_case(activation, bias, layout, t=29, h=24, i=20, e=7, k=3, load="skewed", r=3):
    gen = torch.Generator().manual_seed(e * 100 + t)
    wg = torch.randn(e, 2 * i, h, generator=gen) / h ** 0.5
    wd = torch.randn(e, h, i, generator=gen) / i ** 0.5
    if layout == "in_out":
        wg, wd = wg.transpose(-1, -2).contiguous(), wd.transpose(-1, -2).contiguous()
    b1 = (torch.randn(e, 2 * i, generator=gen) * 0.1).requires_grad_() if bias else None
    b2 = (torch.randn(e, h, generator=gen) * 0.1).requires_grad_() if bias else None
    x = torch.randn(t, h, generator=gen, requires_grad=True)
    ids = make_ids(t, k, e, load)
    gates = (torch.rand(t, k, generator=gen) + 0.1).requires_grad_()
    lora = ExpertLoRA(
        LoRAFactors(torch.randn(e, h, r, generator=gen).requires_grad_(),
                    torch.randn(e, r, 2 * i, generator=gen).requires_grad_(), 0.5),
        LoRAFactors(torch.randn(e, i, r, generator=gen).requires_grad_(),
                    torch.randn(e, r, h, generator=gen).requires_grad_(), 2.0))
    return wg, wd, b1, b2, x, ids, gates, lora


@pytest.mark.parametrize("activation,bias,layout", [("swiglu", False, "out_in"),
                                                    ("gptoss", True, "in_out")])
@pytest.mark.parametrize("per_chunk", [1, 3, 7, 100])  # one expert, not dividing E, all
@pytest.mark.parametrize("save", ["h", "none"])
@pytest.mark.parametrize("load", ["skewed", "single"])
def test_chunked_matches_oracle_and_unchunked(activation, bias, layout, per_chunk, save, load):
    """Chunked dequantize vs the fp64 oracle on the same NF4 weights and vs the whole-stack
    path (fp32): output and gradients of x, router weights, biases and LoRA factors.
    Sizes are not multiples of 8; "skewed" leaves experts empty, "single" uses k of 7."""
    wg, wd, b1, b2, x, ids, gates, lora = _chunked_case(activation, bias, layout, load=load)
    i, h = 20, 24
    qg, qd = quantize_nf4(wg), quantize_nf4(wd)

    def run(dequant):
        mod = QuantizedGroupedExperts(qg, qd, activation, b1, b2, layout=layout, dequant=dequant,
                                      compute_dtype=torch.float32, save=save,
                                      dequant_chunk_bytes=per_chunk * 2 * i * h * 4)
        assert dequant != "chunked" or mod.experts_per_chunk() == per_chunk
        return mod(x, ids, gates, lora=lora)

    leaves = [x, gates, lora.gate_up.a, lora.gate_up.b, lora.down.a, lora.down.b]
    leaves += [b1, b2] if bias else []
    names = ["x", "gates", "A1", "B1", "A2", "B2", "b1", "b2"]
    out = run("chunked")
    up = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, up)
    whole = run("recompute")
    whole_grads = torch.autograd.grad(whole, leaves, up)

    d1, d2 = (dequantize_nf4(q).double() for q in (qg, qd))
    if layout == "out_in":
        d1, d2 = d1.transpose(-1, -2), d2.transpose(-1, -2)
    d1 = d1 + lora.gate_up.delta().double()
    d2 = d2 + lora.down.delta().double()
    dbl = [None if b is None else b.double() for b in (b1, b2)]
    ref = expert_mlp_reference(x.double(), ids, gates.double(), d1, d2, *dbl, activation)
    ref_grads = torch.autograd.grad(ref, leaves, up.double())
    assert rel_err(out, ref) < 1e-5 and rel_err(out, whole) < 1e-5
    for name, g, rg, wg_ in zip(names, grads, ref_grads, whole_grads):
        assert rel_err(g, rg) < 1e-5, name
        assert rel_err(g, wg_) < 1e-5, name


def test_chunked_without_lora_or_grads():
    """No LoRA; and only some inputs requiring grad (skipped gradients stay None)."""
    wg, wd, _, _, x, ids, gates, _ = _chunked_case("swiglu", False, "out_in")
    mod = QuantizedGroupedExperts(quantize_nf4(wg), quantize_nf4(wd), compute_dtype=torch.float32,
                                  dequant_chunk_bytes=2 * 40 * 24 * 4)
    d1, d2 = (dequantize_nf4(q).double().transpose(-1, -2) for q in (mod.gate_up_q, mod.down_q))
    out = mod(x, ids, gates.detach())
    ref = expert_mlp_reference(x.double(), ids, gates.double(), d1, d2)
    assert rel_err(out, ref) < 1e-5
    (dx,) = torch.autograd.grad(out, [x], out.detach())
    (rdx,) = torch.autograd.grad(ref, [x], out.detach().double())
    assert rel_err(dx, rdx) < 1e-5
    out = mod(x.detach(), ids, gates)
    (dg,) = torch.autograd.grad(out, [gates], out.detach())
    (rdg,) = torch.autograd.grad(expert_mlp_reference(x.double(), ids, gates.double(), d1, d2),
                                 [gates], out.detach().double())
    assert rel_err(dg, rdg) < 1e-5


@pytest.mark.parametrize("dequant", ["chunked", "recompute"])
def test_chunked_never_allocates_a_whole_stack(dequant, monkeypatch):
    """Every float tensor made during a training step (forward and backward) is at most two
    experts' gate_up weights with a two-expert budget; the whole-stack path makes a full one.
    A dispatch mode sees the ops outside the custom ops, a spy on the NF4 weight source the
    dequantized weights inside the chunked ones."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from groupmoe.lora import chunked

    e, h, i, t, k = 8, 64, 32, 16, 2
    per_expert = 2 * i * h
    mod = QuantizedGroupedExperts.from_dense(torch.randn(e, h, 2 * i), torch.randn(e, i, h),
                                             compute_dtype=torch.float32, lora_rank=4,
                                             dequant=dequant,
                                             dequant_chunk_bytes=2 * per_expert * 4)
    x = torch.randn(t, h, requires_grad=True)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    gates = torch.rand(t, k, requires_grad=True)
    biggest = [0]
    nf4_source = chunked._SOURCES["nf4"]

    def spy(*args):
        w = nf4_source(*args)
        biggest[0] = max(biggest[0], w.numel())
        return w

    monkeypatch.setitem(chunked._SOURCES, "nf4", spy)

    class Largest(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(o, torch.Tensor) and o.is_floating_point():  # not the codes
                    biggest[0] = max(biggest[0], o.numel())
            return out

    with Largest():
        mod(x, ids, gates).sum().backward()
    assert x.grad is not None and mod.lora.gate_up_b.grad is not None
    if dequant == "chunked":
        assert biggest[0] <= 2 * per_expert + 2 * 64  # two experts and at most two extra blocks
    else:
        assert biggest[0] >= e * per_expert


def test_chunked_saves_only_x_h_and_rank_r_intermediates():
    """What the step keeps for backward (all through save_for_backward): x, the sorted router
    weights, h [rows, 2I], x A and a A [rows, r], the small LoRA factors, the routing's
    indices and the NF4 stacks themselves; no permuted copy of x, no dense weights."""
    wg, wd, _, _, x, ids, gates, lora = _chunked_case("swiglu", False, "out_in", r=2)
    mod = QuantizedGroupedExperts(quantize_nf4(wg), quantize_nf4(wd), compute_dtype=torch.float32,
                                  dequant_chunk_bytes=3 * 40 * 24 * 4)
    out = mod(x, ids, gates, lora=lora)
    node = out.grad_fn
    rows, r = ids.numel(), 2
    nf4 = {id(t) for q in (mod.gate_up_q, mod.down_q) for t in (q.packed, q.absmax)}
    kept = [t for t in node.saved_tensors if t is not None and t.is_floating_point()
            and id(t) not in nf4]
    assert sum(id(t) in nf4 for t in node.saved_tensors) == 4
    factors = sum(t.numel() for t in (lora.gate_up.a, lora.gate_up.b, lora.down.a, lora.down.b))
    assert sum(t.numel() for t in kept) == (x.numel() + rows + rows * 40 + 2 * rows * r
                                            + factors)
    assert any(t is x for t in node.saved_tensors)  # the caller's x, not a copy


@pytest.mark.parametrize("t,e,k", [(0, 4, 2), (5, 1, 1)])
def test_chunked_no_tokens_and_one_expert(t, e, k):
    h, i = 16, 8
    mod = QuantizedGroupedExperts.from_dense(torch.randn(e, h, 2 * i), torch.randn(e, i, h),
                                             compute_dtype=torch.float32, lora_rank=2,
                                             dequant_chunk_bytes=1)
    x = torch.randn(t, h, requires_grad=True)
    ids = make_ids(t, k, e)
    gates = torch.rand(t, k, requires_grad=True)
    out = mod(x, ids, gates)
    d1, d2 = (dequantize_nf4(q).double() for q in (mod.gate_up_q, mod.down_q))
    ref = expert_mlp_reference(x.double(), ids, gates.double(), d1, d2)
    assert out.shape == (t, h) and (t == 0 or rel_err(out, ref) < 1e-5)
    out.sum().backward()
    assert x.grad.shape == x.shape and mod.lora.gate_up_a.grad is not None


# ----- peft interop -----

def _tiny_qwen3_moe_with_peft(adapters=("default",), dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("LoRA on stacked expert parameters needs transformers 5")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    model = transformers.Qwen3MoeForCausalLM(cfg).to(dtype)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                           target_parameters=["mlp.experts.gate_up_proj",
                                              "mlp.experts.down_proj"])
    model = peft.get_peft_model(model, lcfg, adapter_name=adapters[0])
    for extra in adapters[1:]:
        model.add_adapter(extra, peft.LoraConfig(
            r=2, lora_alpha=6, target_modules=[], init_lora_weights=False,
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
    return model


def _experts_wrapper(model):
    return model.base_model.model.model.layers[0].mlp.experts


@pytest.mark.parametrize("multi", [False, True])
def test_peft_param_wrapper_factors_match_peft_delta(multi):
    model = _tiny_qwen3_moe_with_peft(("default", "second") if multi else ("default",))
    if multi:
        model.base_model.set_adapter(["default", "second"])
    wrapper = _experts_wrapper(model)
    base, wrappers = unwrap_param_wrappers(wrapper)
    assert set(wrappers) == {"gate_up_proj", "down_proj"}
    lora = lora_from_peft_param_wrapper(wrapper)
    for name, fac in (("gate_up_proj", lora.gate_up), ("down_proj", lora.down)):
        w = wrappers[name]
        peft_delta = sum(w.get_delta_weight(a) for a in w.active_adapters)
        # Qwen3-MoE stacks are [E, out, in]; ours are [E, in, out]
        assert torch.allclose(fac.delta(), peft_delta.transpose(-1, -2), atol=1e-12)
        assert getattr(base, name).shape[0] == fac.a.shape[0]


def test_peft_forward_matches_grouped_lora():
    """The peft-wrapped experts' own forward equals the grouped LoRA path on its factors,
    and gradients reach peft's lora_A/lora_B."""
    model = _tiny_qwen3_moe_with_peft(dtype=torch.float32)  # transformers' experts: no fp64
    wrapper = _experts_wrapper(model)
    base, _ = unwrap_param_wrappers(wrapper)
    t, k = 10, 2
    x = torch.randn(t, 32)
    ids = make_ids(t, k, 4)
    gates = torch.rand(t, k)
    ref = wrapper(x, ids, gates)
    lora = lora_from_peft_param_wrapper(wrapper)
    out = expert_mlp_lora(x, build_routing(ids, 4), gates, base.gate_up_proj.transpose(-1, -2),
                          base.down_proj.transpose(-1, -2), lora)
    assert rel_err(out, ref) < 1e-5
    out.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads)


def test_peft_disabled_adapters_give_none():
    model = _tiny_qwen3_moe_with_peft()
    with model.disable_adapter():
        assert lora_from_peft_param_wrapper(_experts_wrapper(model)) is None


def test_qlora_bench_smoke(tmp_path):
    from groupmoe.bench.qlora import main

    out = tmp_path / "qlora.json"
    rows = main(["--smoke", "--out", str(out), "--variants", "chunked:0.01", "recompute"])
    assert out.exists() and len(rows) == 4
    assert [r["variant"] for r in rows[:2]] == ["chunked:0.01", "recompute"]
    assert all(r["rel_diff_vs_loop"] < 1e-4 for r in rows)
    with pytest.raises(ValueError, match="bad variant"):
        main(["--smoke", "--out", str(out), "--variants", "chunked"])


@pytest.mark.parametrize("backend", ["torch", "triton", "bnb"])
def test_dequantize_rejects_non_float_dtype(backend):
    """The output dtype is checked before any backend runs, for whole stacks and ranges."""
    t = quantize_nf4(_weights((2, 8, 16)))
    with pytest.raises(ValueError, match="must be a float type"):
        dequantize_nf4(t, torch.int32, backend)
    with pytest.raises(ValueError, match="must be a float type"):
        dequantize_nf4_experts(t, 0, 1, torch.int32, backend)
