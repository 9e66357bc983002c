"""groupmoe.patch on tiny real transformers 4.x ModuleList MoE models (Qwen3-MoE, Qwen2-MoE with
its shared expert, Mixtral with router jitter, OLMoE), built from the 4.x config classes (no
downloads). ``bash scripts/test.sh`` runs this file against the transformers 4.x overlay that
scripts/setup.sh installs; under transformers 5 it skips."""

import importlib.metadata

import pytest
import torch

import groupmoe
from moe_cases import count_calls, rel_err
from test_modulelist import Model  # a model around one block


def _major():
    try:
        return int(importlib.metadata.version("transformers").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return None


pytestmark = [pytest.mark.transformers4,
              pytest.mark.skipif(_major() != 4, reason="needs a transformers 4.x install")]

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
BLOCK = {"qwen3_moe": "Qwen3MoeSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
         "mixtral": "MixtralSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock"}
NAMES = list(BLOCK)


def _configs():
    import transformers as t

    return {
        "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM, dict(
            intermediate_size=64, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)),
        "qwen2_moe": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM, dict(
            intermediate_size=64, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, shared_expert_intermediate_size=24)),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM, dict(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
            router_jitter_noise=0.1)),
        "olmoe": (t.OlmoeConfig, t.OlmoeForCausalLM, dict(
            intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    }


def build(name, seed=0, **overrides):
    cfg_cls, model_cls, extra = _configs()[name]
    cfg = cfg_cls(**{**COMMON, **extra, **overrides}, attn_implementation="eager")
    torch.manual_seed(seed)
    return model_cls(cfg)


def tokens(batch=2, seq=12, seed=1):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


def step(model, ids, seed=5):
    """Logits, loss (with the router aux loss, so router gradients are compared too) and
    every gradient; the same seed gives Mixtral's jitter the same draw in both runs."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, labels=ids, output_router_logits=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _blocks(model, name):
    return [n for n, m in model.named_modules() if type(m).__name__ == BLOCK[name]]


def _assert_close(got, want):
    logits, loss, grads = got
    ref_logits, ref_loss, ref_grads = want
    assert rel_err(logits, ref_logits) < 1e-5
    assert abs(float(loss - ref_loss)) < 1e-5 * max(1.0, abs(float(ref_loss)))
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-5, n


@pytest.mark.parametrize("name", NAMES)
def test_patched_matches_loop_and_unpatch_restores(name):
    model = build(name).train()
    ids = tokens()
    keys = list(model.state_dict())
    ref = step(model, ids)
    report = groupmoe.patch(model)
    assert report.patched == _blocks(model, name) and len(report.patched) == 2, str(report)
    assert not report.skipped, str(report)
    assert list(model.state_dict()) == keys
    got = step(model, ids)
    _assert_close(got, ref)
    assert any(".experts." in n for n in ref[2])  # every expert's own Linear got its grad
    groupmoe.unpatch(model)
    assert all("forward" not in model.get_submodule(n).__dict__ for n in report.patched)
    again = step(model, ids)
    assert torch.equal(again[0], ref[0]) and torch.equal(again[1], ref[1])


@pytest.mark.parametrize("name", NAMES)
def test_generate_and_save_load(name, tmp_path):
    model = build(name).eval()
    prompt = tokens(1, 5)
    want = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with groupmoe.patched(model) as report:
        assert len(report.patched) == 2
        got = model.generate(prompt, max_new_tokens=4, do_sample=False)
        model.save_pretrained(tmp_path)
    assert torch.equal(got, want)
    assert "groupmoe" not in (tmp_path / "config.json").read_text()
    loaded = type(model).from_pretrained(tmp_path, attn_implementation="eager").eval()
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert list(lsd) == list(sd)
    assert all(torch.equal(sd[k], lsd[k]) for k in sd)
    assert len(groupmoe.patch(loaded).patched) == 2
    ids = tokens()
    with torch.no_grad():
        assert rel_err(loaded(ids).logits, model(ids).logits) < 1e-5


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_frozen_experts(name):
    model = build(name).train()
    for n, p in model.named_parameters():
        p.requires_grad_(".experts." not in n)
    ids = tokens()
    ref = step(model, ids)
    assert ref[2] and not any(".experts." in n for n in ref[2])
    groupmoe.patch(model)
    got = step(model, ids)
    _assert_close(got, ref)


@pytest.mark.parametrize("name", ["qwen2_moe", "olmoe"])
def test_peft_lora_on_attention(name):
    peft = pytest.importorskip("peft")
    model = build(name).train()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    ids = tokens()
    ref = step(model, ids)
    assert any("lora_B" in n for n in ref[2])
    report = groupmoe.patch(model)
    assert len(report.patched) == 2 and not report.skipped, str(report)
    _assert_close(step(model, ids), ref)


@pytest.mark.parametrize("name", NAMES)
def test_peft_lora_on_expert_linears_runs_grouped(name, monkeypatch):
    """LoRA on every expert's Linears (and attention) runs the grouped LoRA path, with the
    loop's logits, loss and gradients (every lora_A/lora_B)."""
    peft = pytest.importorskip("peft")
    from groupmoe.integrations import modulelist

    model = build(name).train()
    experts = ["w1", "w3", "w2"] if name == "mixtral" else ["gate_proj", "up_proj", "down_proj"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", *experts],
                          init_lora_weights=False)
    model = peft.get_peft_model(model, cfg)
    ids = tokens()
    ref = step(model, ids)
    assert any(".experts." in n and "lora_A" in n for n in ref[2])
    calls = count_calls(monkeypatch, modulelist, "expert_mlp_lora")
    report = groupmoe.patch(model)
    assert len(report.patched) == 2 and not report.skipped, str(report)
    _assert_close(step(model, ids), ref)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora_on", ["experts", "attention"])
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_4bit_expert_linears_run_grouped(name, lora_on, dtype, monkeypatch):
    """QLoRA on a 4.x model: every expert Linear is a bitsandbytes Linear4bit (NF4, nested
    absmax; swapped in on CPU as BitsAndBytesConfig(load_in_4bit=True) does on a GPU), peft
    LoRA on the experts (or on attention only, frozen experts): the grouped NF4 path gives the
    loop's logits, loss and LoRA gradients."""
    peft = pytest.importorskip("peft")
    from bnb4 import quantize_expert_linears
    from groupmoe.quant import experts as qexperts

    # sizes multiple of 64: bitsandbytes' CPU dequantize needs whole-block rows. bf16: one
    # layer, so no second router sees bf16-rounded differences (a near-tie top-k flip)
    layers = 2 if dtype == torch.float32 else 1
    model = build(name, hidden_size=64, num_hidden_layers=layers,
                  **{"intermediate_size" if name == "mixtral" else "moe_intermediate_size": 64})
    model = model.to(dtype)
    names = ["w1", "w3", "w2"] if name == "mixtral" else ["gate_proj", "up_proj", "down_proj"]
    assert quantize_expert_linears(model, names, nested=True) == layers * 8 * 3
    targets = ["q_proj", "v_proj"] + (names if lora_on == "experts" else [])
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                      init_lora_weights=False)).train()
    for n, p in model.named_parameters():  # peft keeps adapters fp32; run both paths in dtype
        if "lora_" in n:
            p.data = p.data.to(dtype)
    ids = tokens()
    ref = step(model, ids)
    assert any(".experts." in n for n in ref[2]) == (lora_on == "experts")
    calls = count_calls(monkeypatch, qexperts, "chunked_expert_mlp")
    report = groupmoe.patch(model)
    assert len(report.patched) == layers and len(report.quantized) == layers, str(report)
    assert not report.skipped, str(report)
    got = step(model, ids)
    assert len(calls) == layers
    # the loop leaves an expert without tokens gradient-less; the grouped path gives zeros
    extra = got[2].keys() - ref[2].keys()
    assert ref[2].keys() <= got[2].keys() and all(not got[2][n].any() for n in extra)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got[0], ref[0]) < tol and abs(float(got[1] - ref[1])) < tol
    for n in ref[2]:
        if dtype == torch.float32:
            assert rel_err(got[2][n], ref[2][n]) < 1e-5, n
    g, r = (torch.cat([d[n].float().flatten() for n in sorted(ref[2])]) for d in (got[2], ref[2]))
    assert rel_err(g, r) < 2 * tol  # bf16: GEMM sums in another order, through a backward


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_bitsandbytes_config_4bit_experts_with_lora(name, tmp_path, monkeypatch):
    """A real ``BitsAndBytesConfig(load_in_4bit=True)`` load (bitsandbytes 0.50 quantizes on
    CPU too): every expert Linear and the router are Linear4bit; peft LoRA on experts and
    attention runs grouped, against the model's own loop (bf16)."""
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    import transformers

    from groupmoe.quant import experts as qexperts

    inter = "intermediate_size" if name == "mixtral" else "moe_intermediate_size"
    build(name, hidden_size=64, num_hidden_layers=1, **{inter: 64}).save_pretrained(tmp_path)
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    model = getattr(transformers, _configs()[name][1].__name__).from_pretrained(
        tmp_path, quantization_config=cfg, dtype=torch.bfloat16, device_map="cpu",
        attn_implementation="eager")
    names = ["w1", "w3", "w2"] if name == "mixtral" else ["gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", *names], init_lora_weights=False)).train()
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(torch.bfloat16)
    assert sum(type(p).__name__ == "Params4bit" and ".experts." in n
               for n, p in model.named_parameters()) == 8 * 3
    ids = tokens()
    ref = step(model, ids)
    calls = count_calls(monkeypatch, qexperts, "chunked_expert_mlp")
    report = groupmoe.patch(model)
    assert len(report.quantized) == 1 and not report.skipped, str(report)
    got = step(model, ids)
    assert calls == [1]
    extra = got[2].keys() - ref[2].keys()  # experts without tokens: zeros here, None in the loop
    assert ref[2].keys() <= got[2].keys() and all(not got[2][n].any() for n in extra)
    assert rel_err(got[0], ref[0]) < 1e-2 and abs(float(got[1] - ref[1])) < 1e-2
    g, r = (torch.cat([d[n].float().flatten() for n in sorted(ref[2])]) for d in (got[2], ref[2]))
    assert rel_err(g, r) < 2e-2


def test_bitsandbytes_config_4bit_save_load_after_grouped_run(tmp_path):
    """After a grouped run the experts' Params4bit view slices of the shared stacks; the model
    still saves (disjoint views) and reloads to the same weights and the same patched step."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("accelerate")
    import transformers

    build("qwen3_moe", hidden_size=64, moe_intermediate_size=64,
          num_hidden_layers=1).save_pretrained(tmp_path / "dense")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    cls = transformers.Qwen3MoeForCausalLM
    model = cls.from_pretrained(tmp_path / "dense", quantization_config=cfg,
                                dtype=torch.bfloat16, device_map="cpu").train()
    assert len(groupmoe.patch(model).quantized) == 1
    ids = tokens()
    want = step(model, ids)
    model.save_pretrained(tmp_path / "q")
    loaded = cls.from_pretrained(tmp_path / "q", dtype=torch.bfloat16, device_map="cpu").train()
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert sd.keys() == lsd.keys() and all(torch.equal(sd[k], lsd[k]) for k in sd)
    assert len(groupmoe.patch(loaded).quantized) == 1
    got = step(loaded, ids)
    assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("name", ["qwen2_moe", "mixtral"])
def test_compiled_layers_match_eager(name):
    """Every decoder layer under torch.compile(fullgraph=True, dynamic=True), as the Trainer's
    torch_compile does: no new graph for a new sequence length, loss and gradients equal to
    eager (eval mode: Mixtral's training jitter draws differ between compiled and eager RNG).
    4.x's own layer code (the cache's integer layer_idx, the router-logits collector) gives
    each layer its graph."""
    from test_compile import counting_backend

    model = build(name).eval()
    groupmoe.patch(model)
    batches = [tokens(seq=12), tokens(seq=17, seed=2)]
    want = [step(model, b) for b in batches]
    count, graphs = counting_backend("aot_eager")
    for layer in model.model.layers:
        layer.compile(fullgraph=True, dynamic=True, backend=count)
    counts = []
    for b, ref in zip(batches, want):
        _assert_close(step(model, b), ref)
        counts.append(len(graphs))
    assert counts == [len(model.model.layers)] * 2


def test_gradient_checkpointing_with_jitter():
    """Mixtral with router jitter in training under transformers' gradient checkpointing: the
    recompute draws the same noise (restored RNG), so gradients equal those without."""
    model = build("mixtral").train()
    groupmoe.patch(model)
    ids = tokens()
    ref = step(model, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _assert_close(step(model, ids), ref)


# ----- every 4.x MoE block with ModuleList experts, discovered -----

def _discovered():
    from family_builders import discover_blocks

    return discover_blocks()


NOT_MOE = {"VitPoseBackboneMoeMLP": "experts picked by a dataset index, not routed"}
# blocks whose tiny build the generic builder cannot make from their config classes alone
UNBUILDABLE = {"Qwen3OmniMoeTalkerTextSparseMoeBlock":
               "reads shared_expert_intermediate_size, which its text config lacks"}


def test_every_modulelist_block_is_patched_or_says_why():
    from groupmoe.integrations import modulelist

    names = [ec.name for ec in _discovered()]
    assert "MixtralSparseMoeBlock" in names and "DeepseekV3MoE" in names
    unknown = set(names) - set(modulelist.BLOCKS) - set(NOT_MOE)
    assert not unknown, f"4.x MoE blocks groupmoe does not know: {sorted(unknown)}"


def _block_step(model, x, seed=3):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same jitter draw in both runs
    out = model(x)
    hidden = out[0] if isinstance(out, tuple) else out
    up = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(4))
    loss = (hidden * up).sum() + (out[1].pow(2).sum() if isinstance(out, tuple) else 0)
    loss.backward()
    # an expert no token reached: None in the loop, zeros from the grouped op
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for n, p in model.named_parameters()}
    return hidden.detach(), x.grad, grads


@pytest.mark.parametrize("ec", _discovered() if _major() == 4 else [], ids=lambda ec: ec.name)
def test_modulelist_block_matches_its_own_forward(ec, monkeypatch):
    """Each block, tiny and fp32, in training: output, input and every parameter gradient
    (router included) equal to its own forward, or skipped with the reason in the report."""
    import copy

    from family_builders import build_block
    from groupmoe.integrations import modulelist

    if ec.name in NOT_MOE:
        pytest.skip(NOT_MOE[ec.name])
    if ec.name in UNBUILDABLE:
        pytest.skip(UNBUILDABLE[ec.name])
    ref = Model(build_block(ec)).train()
    model = copy.deepcopy(ref)
    report = groupmoe.patch(model)
    assert report.patched == ["block"] and "fused expert op (swiglu)" in report.paths["block"]
    calls = count_calls(monkeypatch, modulelist, "_experts")
    x = torch.randn(2, 7, ref.block.experts[0].down_proj.out_features
                    if hasattr(ref.block.experts[0], "down_proj")
                    else ref.block.experts[0].w2.out_features)
    want, got = _block_step(ref, x), _block_step(model, x)
    assert calls, f"{ec.name} did not run grouped"
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-4
    assert got[2].keys() == want[2].keys()
    for n in want[2]:
        assert rel_err(got[2][n], want[2][n]) < 1e-4, n


def test_longcat_identity_experts_with_lora(monkeypatch):
    """LongCat-Flash's identity experts (a zero expert in the grouped op) under peft LoRA on
    the expert Linears: output and every gradient equal to the block's own loop."""
    import copy

    peft = pytest.importorskip("peft")
    from family_builders import build_block, discover_blocks

    ec = next((ec for ec in discover_blocks() if ec.name == "LongcatFlashMoE"), None)
    if ec is None:
        pytest.skip("LongCat-Flash is not in this transformers release")
    cfg = peft.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "down_proj"],
                          init_lora_weights=False)
    ref = peft.inject_adapter_in_model(cfg, Model(build_block(ec))).train()
    model = copy.deepcopy(ref)
    assert groupmoe.patch(model).patched
    from groupmoe.integrations import modulelist

    calls = count_calls(monkeypatch, modulelist, "_pad_lora")  # grouped, LoRA on a zero expert
    x = torch.randn(2, 7, 16)
    want, got = _block_step(ref, x), _block_step(model, x)
    assert calls
    assert rel_err(got[0], want[0]) < 1e-5 and rel_err(got[1], want[1]) < 1e-4
    assert any("lora_" in n for n in want[2])
    for n in want[2]:
        assert rel_err(got[2][n], want[2][n]) < 1e-4, n
