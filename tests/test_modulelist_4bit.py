"""bitsandbytes 4-bit (``Linear4bit``) experts of transformers 4.x-style ModuleList MoE blocks
(the stand-ins of test_modulelist.py) run grouped as NF4 stacks: against the block's own loop
over its Linear4bit experts (bitsandbytes' dequantize and matmul), frozen and with peft LoRA
on the experts. Real 4.x models: test_transformers4.py."""

import pytest
import torch

import groupmoe
from bnb4 import quantize_expert_linears
from groupmoe.quant import experts as qexperts
from moe_cases import rel_err, spy_check_ids
from test_modulelist import (
    MixtralSparseMoeBlock,
    Model,
    Qwen2MoeSparseMoeBlock,
    Qwen3MoeSparseMoeBlock,
    _run,
)

pytest.importorskip("bitsandbytes")

# in_features multiples of 64: bitsandbytes' CPU (AVX512) dequantize misplaces the scales of
# rows that are not whole blocks (checked with bitsandbytes 0.50.2), so its loop would be wrong
BLOCKS4 = {
    "qwen3": lambda **kw: Qwen3MoeSparseMoeBlock(h=64, i=64, norm=True, **kw),
    "qwen2-shared": lambda **kw: Qwen2MoeSparseMoeBlock(h=64, i=64, norm=False, shared=12, **kw),
    "mixtral-jitter": lambda **kw: MixtralSparseMoeBlock(h=64, i=64, jitter=0.1, **kw),
}
NAMES = {"mixtral-jitter": ("w1", "w3", "w2")}
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _names(name):
    return NAMES.get(name, ("gate_proj", "up_proj", "down_proj"))


def _model(name, dtype, nested=False, seed=0, **kw):
    torch.manual_seed(seed)
    model = Model(BLOCKS4[name](**kw)).train().to(dtype)
    quantize_expert_linears(model, _names(name), nested=nested)
    return model


def _spy(monkeypatch):
    calls = []
    real = qexperts.chunked_expert_mlp
    monkeypatch.setattr(qexperts, "chunked_expert_mlp",
                        lambda *a, **k: calls.append(a[-4]) or real(*a, **k))
    return calls  # the LoRA argument of each grouped call


def _compare(got, ref, tol):
    out, dx, grads = got
    ref_out, ref_dx, ref_grads = ref
    out, ref_out = (out[0], ref_out[0]) if isinstance(out, tuple) else (out, ref_out)
    assert rel_err(out, ref_out) < tol and rel_err(dx, ref_dx) < tol
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        # bf16: peft runs the (fp32) adapters in fp32, groupmoe in bf16; a single expert's few
        # tokens make its adapter gradient noisier than the whole set's
        assert rel_err(grads[n], ref_grads[n]) < (tol if tol < 1e-2 else 3e-2), n
    both = [(grads[n].flatten(), ref_grads[n].flatten()) for n in ref_grads]
    assert rel_err(torch.cat([g for g, _ in both]), torch.cat([r for _, r in both])) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("name", list(BLOCKS4))
def test_4bit_experts_match_loop(name, nested, dtype, monkeypatch):
    model = _model(name, dtype, nested)
    x = torch.randn(3, 7, 64, dtype=dtype)
    ref = _run(model, x)
    assert ref[2] and not any(".experts." in n for n in ref[2])  # frozen 4-bit experts
    calls = _spy(monkeypatch)
    report = groupmoe.patch(model)
    assert report.patched == ["block"] and not report.skipped, str(report)
    assert "NF4" in report.quantized["block"]
    assert ("double-quantized" in report.quantized["block"]) == nested
    seen = spy_check_ids(monkeypatch, qexperts)
    _compare(_run(model, x), ref, TOL[dtype])
    assert calls == [None] and seen == [False]  # topk ids: no range check
    groupmoe.unpatch(model)
    again = _run(model, x)  # the experts (now views of the stack) still run bitsandbytes' loop
    assert torch.equal(again[0][0], ref[0][0]) and torch.equal(again[1], ref[1])


@pytest.mark.parametrize("e,k,tokens", [(1, 1, 5), (16, 2, 3)])
def test_4bit_one_expert_and_empty_experts(e, k, tokens, monkeypatch):
    model = _model("qwen3", torch.float32, nested=True, e=e, k=k)
    x = torch.randn(1, tokens, 64)
    ref = _run(model, x)
    calls = _spy(monkeypatch)
    assert groupmoe.patch(model).quantized
    _compare(_run(model, x), ref, 1e-5)
    assert calls == [None]


def test_stacks_are_cached_and_share_the_experts_bytes():
    model = _model("qwen3", torch.float32)
    block = model.block
    x = torch.randn(2, 5, 64)
    before = sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8)
    groupmoe.patch(model)
    ref = _run(model, x)
    from groupmoe.integrations import modulelist_4bit as q4

    gate_up, down = getattr(block, q4._CACHE)[1]
    assert gate_up.shape == (6, 128, 64) and down.shape == (6, 64, 64)
    _run(model, x)
    assert getattr(block, q4._CACHE)[1][0] is gate_up  # not rebuilt
    # every expert's packed bytes and absmax live in the stacks: no second copy
    for expert in block.experts:
        for lin, stack in ((expert.gate_proj, gate_up), (expert.up_proj, gate_up),
                           (expert.down_proj, down)):
            w = lin.weight
            assert w.untyped_storage().data_ptr() == stack.packed.untyped_storage().data_ptr()
            assert w.quant_state.absmax.untyped_storage().data_ptr() == \
                stack.absmax.untyped_storage().data_ptr()
    assert sum(p.numel() for p in model.parameters() if p.dtype == torch.uint8) == before
    # one expert's weight replaced (e.g. re-quantized): the stacks are rebuilt from it
    lin = block.experts[3].up_proj
    new = torch.randn(64, 64)
    bnb = pytest.importorskip("bitsandbytes")
    lin.weight = bnb.nn.Params4bit(new, requires_grad=False, quant_type="nf4").to("cpu")
    groupmoe.unpatch(model)
    ref2 = _run(model, x)
    groupmoe.patch(model)
    got2 = _run(model, x)
    assert rel_err(got2[0][0], ref2[0][0]) < 1e-5 and rel_err(ref2[0][0], ref[0][0]) > 1e-3
    assert getattr(block, q4._CACHE)[1][0] is not gate_up


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(BLOCKS4))
def test_peft_lora_on_4bit_expert_linears_runs_grouped(name, dtype, monkeypatch):
    """peft wraps each Linear4bit expert projection as ``lora.Linear4bit``; the adapters are
    stacked and run on the chunked NF4 path with the loop's outputs and LoRA gradients."""
    peft = pytest.importorskip("peft")
    model = _model(name, dtype, nested=True)
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=list(_names(name)),
                          init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    lin = model.base_model.model.block.experts[0]
    # peft's lora.Linear4bit with bitsandbytes' GPU backend, else its lora.Linear over it
    assert type(getattr(lin, _names(name)[0]).base_layer).__name__ == "Linear4bit"
    x = torch.randn(3, 7, 64, dtype=dtype)
    ref = _run(model, x)
    assert sum(".experts." in n and "lora_" in n for n in ref[2]) == 6 * 3 * 2
    calls = _spy(monkeypatch)
    report = groupmoe.patch(model)
    assert len(report.patched) == 1 and not report.skipped, str(report)
    _compare(_run(model, x), ref, TOL[dtype])
    assert len(calls) == 1 and calls[0] is not None and calls[0].down is not None


@pytest.mark.parametrize("case", ["fp4", "bias", "numel", "mixed"])
def test_unsupported_4bit_falls_back_with_reason(case):
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    i = 9 if case == "numel" else 64  # 9 * 64 weights: not whole pairs of 64-blocks
    model = Model(Qwen3MoeSparseMoeBlock(h=64, i=i)).train()
    names = ("gate_proj", "up_proj", "down_proj")
    if case == "mixed":  # the gate projections stay dense (the first one checked)
        names = names[1:]
    quantize_expert_linears(model, names, quant_type="fp4" if case == "fp4" else "nf4",
                            bias=case == "bias")
    del bnb
    x = torch.randn(2, 5, 64)
    ref = _run(model, x)
    report = groupmoe.patch(model)
    assert not report.patched
    want = {"fp4": "fp4", "bias": "bias", "numel": "multiple of 2*blocksize",
            "mixed": "some are not"}[case]
    assert want in report.skipped["block"], str(report)
    got = _run(model, x)
    assert torch.equal(got[0][0], ref[0][0])


def test_4bit_runtime_dtype_mismatch_falls_back(caplog, monkeypatch):
    """bf16-recorded weights computed in fp32 (bitsandbytes' compute dtype): the grouped path
    would round differently, so the block runs its own loop and says why."""
    from groupmoe.integrations import modulelist

    torch.manual_seed(0)
    model = Model(Qwen3MoeSparseMoeBlock(h=64, i=64)).train().to(torch.bfloat16)
    quantize_expert_linears(model, ("gate_proj", "up_proj", "down_proj"),
                            compute_dtype=torch.float32)
    for m in model.modules():
        if hasattr(m, "compute_type_is_set"):
            m.compute_type_is_set = True
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    ref = _run(model, x)
    assert groupmoe.patch(model).patched == ["block"]
    monkeypatch.setattr(modulelist, "_warned", set())
    with caplog.at_level("WARNING", logger="groupmoe"):
        got = _run(model, x)
    assert "computed in torch.float32" in caplog.text
    assert torch.equal(got[0][0], ref[0][0])


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("name", ["qwen3", "mixtral-jitter"])
def test_4bit_experts_bf16_cuda(name, lora, monkeypatch):
    """On CUDA: Triton dequantize and grouped GEMMs against bitsandbytes' CUDA Linear4bit loop
    (and peft's lora.Linear4bit)."""
    model = _model(name, torch.bfloat16, nested=True, e=16)
    model = model.cuda()
    if lora:
        peft = pytest.importorskip("peft")
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(_names(name)),
                              init_lora_weights=False)
        model = peft.get_peft_model(model, cfg)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.to(torch.bfloat16)
    x = torch.randn(4, 64, 64, dtype=torch.bfloat16, device="cuda")
    ref = _run(model, x)
    calls = _spy(monkeypatch)
    report = groupmoe.patch(model)
    assert len(report.quantized) == 1 and not report.skipped, str(report)
    got = _run(model, x)
    assert len(calls) == 1
    out, dx, grads = got
    assert rel_err(out[0], ref[0][0]) < 1e-2 and rel_err(dx, ref[1]) < 1e-2
    assert grads.keys() == ref[2].keys()
    g, r = (torch.cat([d[n].float().flatten() for n in sorted(ref[2])]) for d in (grads, ref[2]))
    assert rel_err(g, r) < 2e-2
