"""QLoRA on transformers 5 MoE models: 4-bit (NF4) experts from groupmoe.quantize_experts or
bitsandbytes, peft LoRA on experts and attention, run grouped by groupmoe.patch, against an
unpatched reference model holding the dequantized weights (tiny configs, no downloads)."""

import copy
import weakref

import pytest
import torch

import groupmoe
from groupmoe.integrations import expert_lora_targets
from groupmoe.integrations.quantized import (
    STACKS,
    _quantize_stack,
    quantized_stack,
)
from groupmoe.quant import QuantizedGroupedExperts, dequantize_nf4, quantize_nf4
from moe_cases import rel_err
from test_transformers import build, step, tokens

EXPERTS = ("Qwen3MoeExperts", "GptOssExperts")


def _experts(model):
    return [m for m in model.modules() if type(m).__name__.removeprefix("Parametrized")
            in EXPERTS]


def _quantize(model, form, nested):
    if form == "groupmoe":
        report = groupmoe.quantize_experts(model, nested=nested)
        assert len(report.quantized) == len(_experts(model)) and not report.skipped
        return
    bnb = pytest.importorskip("bitsandbytes")
    for mod in _experts(model):
        for name in STACKS:
            if form == "bnb":
                from bitsandbytes.nn.parametrize import replace_parameter_4bit

                replace_parameter_4bit(mod, name, compress_statistics=nested, quant_type="nf4",
                                       blocksize=64)
            else:  # a Params4bit stack, as some training frameworks store experts
                w = getattr(mod, name).data
                setattr(mod, name, bnb.nn.Params4bit(
                    w, requires_grad=False, quant_type="nf4", compress_statistics=nested,
                    blocksize=64).to(w.device))


def _dequantized_reference(model, qmodel):
    """A copy of the unquantized model whose expert stacks hold the dequantized weights."""
    for ref, q in zip(_experts(model), _experts(qmodel)):
        for name in STACKS:
            w = getattr(ref, name)
            w.data.copy_(dequantize_nf4(quantized_stack(q, name), w.dtype))
            w.requires_grad_(False)


def _peft(model, targets, seed):
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          target_parameters=targets, init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    for n, p in model.named_parameters():  # gpt-oss expert biases train too
        if "experts" in n and n.endswith("_bias"):
            p.requires_grad_(True)
    return model


def _wrappers(model):
    """peft's expert wrappers by (experts module, parameter name): peft nests them in a different
    order for parametrized (4-bit) stacks, so names differ between the two models."""
    out = {}
    for name, mod in model.named_modules():
        if type(mod).__name__ == "ParamWrapper":
            out[(name.split(".experts")[0], mod.parameter_name)] = mod
    return out


def _canonical(model, grads):
    rename = {}
    for (where, param), w in _wrappers(model).items():
        for ab in ("lora_A", "lora_B"):
            rename[id(getattr(w, ab)["default"].weight)] = f"{where}.experts.{param}.{ab}"
    params = dict(model.named_parameters())
    return {rename.get(id(params[n]), n): g for n, g in grads.items()}


def _copy_adapters(src, dst):
    """The same adapters in both models."""
    dst_w = _wrappers(dst)
    for key, w in _wrappers(src).items():
        dst_w[key].load_state_dict({k: v for k, v in w.state_dict().items()
                                    if k.startswith("lora_")}, strict=False)
    dst.load_state_dict({k: v for k, v in src.state_dict().items()
                         if "lora_" in k and "experts" not in k}, strict=False)


@pytest.mark.parametrize("name,form,nested", [
    ("qwen3_moe", "groupmoe", False), ("gpt_oss", "groupmoe", True),
    ("qwen3_moe", "bnb", True), ("gpt_oss", "bnb", False), ("qwen3_moe", "params4bit", False)])
def test_qlora_matches_dequantized_reference_fp32(name, form, nested, monkeypatch):
    base = build(name)
    qmodel, ref = base, copy.deepcopy(base)
    _quantize(qmodel, form, nested)
    _dequantized_reference(ref, qmodel)
    # peft cannot wrap a Params4bit stack (2-D packed bytes): attention LoRA only there
    targets = [] if form == "params4bit" else expert_lora_targets(qmodel)
    qmodel, ref = _peft(qmodel, targets, 0), _peft(ref, targets, 1)
    _copy_adapters(qmodel, ref)

    report = groupmoe.patch(qmodel)
    assert len(report.quantized) == len(report.patched) >= 1, str(report)
    assert "NF4" in str(report) and not report.skipped
    calls = []
    orig = QuantizedGroupedExperts.forward
    monkeypatch.setattr(QuantizedGroupedExperts, "forward",
                        lambda self, *a, lora=None, **k: calls.append((lora, k)) or
                        orig(self, *a, lora=lora, **k))
    ids = tokens()
    ref_logits, ref_loss, ref_grads = step(ref, ids)
    logits, loss, grads = step(qmodel, ids)
    ref_grads, grads = _canonical(ref, ref_grads), _canonical(qmodel, grads)
    assert len(calls) == len(report.patched)
    assert all((c is not None) == bool(targets) for c, _ in calls)  # LoRA on experts, grouped
    assert all(k == {"check_ids": False} for _, k in calls)  # topk ids: no range check
    assert rel_err(logits, ref_logits) < 1e-5
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    assert any("experts" in n and "lora_" in n for n in grads) == bool(targets)
    assert any(n.endswith("_bias") for n in grads) == (name == "gpt_oss")
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-4, n
    for mod in _experts(qmodel):  # the frozen 4-bit base gets no gradient
        for s in STACKS:
            q = quantized_stack(mod, s)
            assert q.packed.dtype == torch.uint8 and q.packed.grad is None
            held = (mod.parametrizations[s].original if form != "params4bit"
                    else getattr(mod, s).data)
            assert q.packed.data_ptr() == held.data_ptr()  # wrapped, not converted
    groupmoe.unpatch(qmodel)
    assert all("forward" not in m.__dict__ for m in qmodel.modules())


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_quantize_experts_in_place_and_unpatched_forward(name):
    model = build(name)
    ids = tokens()
    olds = [weakref.ref(getattr(m, s)) for m in _experts(model) for s in STACKS]
    dense = {(i, s): getattr(m, s).detach().clone() for i, m in enumerate(_experts(model))
             for s in STACKS}
    keys = set(model.state_dict())
    report = groupmoe.quantize_experts(model)
    assert report.bytes_after < report.bytes_before / 6  # fp32 -> 4 bits + fp32 scales
    assert all(r() is None for r in olds)  # the dense stacks are freed
    for i, m in enumerate(_experts(model)):
        for s in STACKS:
            want = dequantize_nf4(quantize_nf4(dense[i, s]))  # the same bytes as one call
            assert torch.equal(getattr(m, s), want)  # the model's own view: dequant on access
    assert not any(p.requires_grad and "experts" in n and "bias" not in n
                   for n, p in model.named_parameters())
    # state_dict: packed bytes and scales under the parametrization; it round-trips
    sd = model.state_dict()
    assert any(k.endswith("experts.parametrizations.gate_up_proj.original") for k in sd)
    assert any(k.endswith("experts.parametrizations.gate_up_proj.0.absmax") for k in sd)
    assert keys - set(sd) == {k for k in keys if k.endswith(STACKS)}
    again = build(name, seed=5)
    groupmoe.quantize_experts(again)
    again.load_state_dict(sd)
    ref_logits = step(model, ids)[0]  # the model's own forward over dequantized stacks
    assert torch.equal(step(again, ids)[0], ref_logits)
    with groupmoe.patched(model) as report:
        assert len(report.quantized) == len(report.patched) and not report.skipped
        logits = step(model, ids)[0]
    assert rel_err(logits, ref_logits) < 1e-5
    model.to(torch.bfloat16)  # the scales stay fp32, the packed bytes uint8
    assert all(m.parametrizations[s][0].absmax.dtype == torch.float32
               for m in _experts(model) for s in STACKS)
    assert groupmoe.quantize_experts(model).skipped  # already 4-bit


@pytest.mark.parametrize("nested", [False, True])
def test_chunked_quantize_is_exact(nested):
    w = torch.randn(5, 64, 96)
    a = _quantize_stack(w, 64, nested, chunk_elems=2 * 64 * 96)
    b = quantize_nf4(w, nested=nested)
    assert torch.equal(a.packed, b.packed) and torch.equal(a.absmax, b.absmax)
    assert torch.equal(dequantize_nf4(a), dequantize_nf4(b))


def test_unsupported_4bit_is_reported_and_runs_the_model_forward():
    pytest.importorskip("bitsandbytes")
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    model = build("qwen3_moe")
    for mod in _experts(model):
        for s in STACKS:
            replace_parameter_4bit(mod, s, quant_type="fp4", blocksize=64)
    ids = tokens()
    ref = step(model, ids)[0]
    report = groupmoe.patch(model)
    assert not report.patched and all("fp4" in why for why in report.skipped.values())
    assert torch.equal(step(model, ids)[0], ref)


def test_merged_lora_on_4bit_experts_fails_clearly():
    model = build("qwen3_moe")
    groupmoe.quantize_experts(model)
    model = _peft(model, expert_lora_targets(model), 0)
    groupmoe.patch(model)
    for m in model.modules():
        if type(m).__name__ == "ParamWrapper":
            m.merged_adapters = ["default"]  # what peft's merge records (leaving 4 bits as is)
    with pytest.raises(ValueError, match="merged into the 4-bit experts"):
        model(tokens())


def test_loaded_in_4bit_note():
    model = build("qwen3_moe")
    model.is_loaded_in_4bit = True  # as from_pretrained with BitsAndBytesConfig(load_in_4bit)
    assert any("quantize_experts" in n for n in groupmoe.patch(model).notes)
    groupmoe.unpatch(model)
    groupmoe.quantize_experts(model)
    assert not groupmoe.patch(model).notes


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_bitsandbytes_config(name, device, tmp_path):
    """A tiny model loaded with a real BitsAndBytesConfig (4-bit attention; transformers leaves
    the stacked experts bf16), experts quantized by groupmoe, LoRA on attention: patched against
    the unpatched quantized model (bf16). bitsandbytes 0.50 also runs 4-bit on CPU."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")  # transformers' bitsandbytes quantizer needs it
    transformers = pytest.importorskip("transformers")
    one = dict(num_hidden_layers=1, hidden_size=128, head_dim=32)
    if name == "gpt_oss":
        one["layer_types"] = ["full_attention"]
    tiny = build(name, **one)
    tiny.save_pretrained(tmp_path)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    model = type(tiny).from_pretrained(tmp_path, quantization_config=cfg, dtype=torch.bfloat16,
                                       device_map=device)
    assert any(type(p).__name__ == "Params4bit" for p in model.parameters())
    report = groupmoe.quantize_experts(model, nested=True)
    assert report.quantized, "transformers quantized the stacked experts itself: check the path"
    model = _peft(model, [], 0)
    ids = tokens().to(device)
    ref_logits, _, ref_grads = step(model, ids)
    report = groupmoe.patch(model)
    assert report.quantized and not report.notes, str(report)
    logits, _, grads = step(model, ids)
    assert rel_err(logits, ref_logits) < 2e-2
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) < 5e-2, n


def test_params4bit_without_a_grouped_run_fails_clearly():
    model = build("qwen3_moe")
    _quantize(model, "params4bit", False)
    groupmoe.patch(model)
    experts = _experts(model)[0]
    x = torch.randn(5, 32, dtype=torch.float64)  # a dtype the 4-bit path does not compute in
    ids, w = torch.randint(0, 8, (5, 2)), torch.rand(5, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="Params4bit.*float64"):
        experts(x, ids, w)
