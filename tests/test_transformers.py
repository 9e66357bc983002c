"""groupmoe.patch on tiny transformers 5 MoE models (built from config classes, no downloads)."""

import logging

import pytest
import torch

from moe_cases import count_calls, rel_err

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("stacked-experts tests need transformers 5", allow_module_level=True)

import groupmoe  # noqa: E402

COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _configs():
    t = transformers
    return {
        "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM, dict(
            intermediate_size=64, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, norm_topk_prob=True, head_dim=8)),
        "qwen2_moe": (t.Qwen2MoeConfig, t.Qwen2MoeForCausalLM, dict(
            intermediate_size=64, moe_intermediate_size=16, num_experts=8,
            num_experts_per_tok=2, shared_expert_intermediate_size=24)),
        "mixtral": (t.MixtralConfig, t.MixtralForCausalLM, dict(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8)),
        "olmoe": (t.OlmoeConfig, t.OlmoeForCausalLM, dict(
            intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
        "gpt_oss": (t.GptOssConfig, t.GptOssForCausalLM, dict(
            intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
            layer_types=["sliding_attention", "full_attention"], sliding_window=8)),
        "deepseek_v3": (t.DeepseekV3Config, t.DeepseekV3ForCausalLM, dict(
            intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
            n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8, num_key_value_heads=4)),
    }


def build(name, dtype=torch.float32, seed=0, **overrides):
    cfg_cls, model_cls, extra = _configs()[name]
    cfg = cfg_cls(**{**COMMON, **extra, **overrides})
    cfg._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(cfg).to(dtype)
    if name == "gpt_oss":  # biases and a wider router spread exercise the clamp and bias paths
        for mod in model.modules():
            if type(mod).__name__ == "GptOssExperts":
                torch.nn.init.normal_(mod.gate_up_proj, std=0.5)
                torch.nn.init.normal_(mod.gate_up_proj_bias, std=0.5)
                torch.nn.init.normal_(mod.down_proj_bias, std=0.1)
    return model


def step(model, tokens):
    model.zero_grad(set_to_none=True)
    out = model(tokens, labels=tokens)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def tokens(batch=2, seq=12, seed=1):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(_configs()))
def test_patched_matches_eager_fp32(name):
    model = build(name)
    ids = tokens()
    ref_logits, ref_loss, ref_grads = step(model, ids)
    report = groupmoe.patch(model)
    assert len(report.patched) >= 1 and not report.skipped, str(report)
    logits, loss, grads = step(model, ids)
    assert rel_err(logits, ref_logits) < 1e-5
    assert abs(loss - ref_loss) < 1e-5
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-4, n
    groupmoe.unpatch(model)
    assert model.config._experts_implementation == "eager"
    again, _, _ = step(model, ids)
    assert torch.equal(again, ref_logits)  # unpatch restores the original exactly


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_patched_bf16_relative_error(name):
    """bf16 patched is as close to the fp32 model as bf16 eager is. One layer, so the router
    sees identical inputs in both runs (deeper tiny random models flip top-k choices on bf16
    noise, which says nothing about the experts computation)."""
    ids = tokens()
    one = dict(num_hidden_layers=1, layer_types=["full_attention"]) if name == "gpt_oss" \
        else dict(num_hidden_layers=1)
    ref_logits, _, ref_grads = step(build(name, torch.float32, **one), ids)
    eager_logits, _, eager_grads = step(build(name, torch.bfloat16, **one), ids)
    model = build(name, torch.bfloat16, **one)
    groupmoe.patch(model)
    logits, _, grads = step(model, ids)
    assert logits.dtype == torch.bfloat16
    assert rel_err(logits, ref_logits) <= max(2e-2, 1.25 * rel_err(eager_logits, ref_logits))
    experts = [n for n in grads if "experts" in n]
    assert experts
    for n in experts:
        assert rel_err(grads[n], ref_grads[n]) <= max(
            5e-2, 1.25 * rel_err(eager_grads[n], ref_grads[n])), n


def test_patch_fp8_runs_plain_stacks_in_fp8():
    """patch(model, precision="fp8"): the experts' GEMMs take e4m3 operands (the loss moves by
    FP8 rounding, not more); unpatch and a plain patch give the exact results back. One layer:
    in deeper tiny models FP8 noise flips later routers' top-k choices."""
    model = build("qwen3_moe", num_hidden_layers=1)
    ids = tokens()
    ref_logits, ref_loss, ref_grads = step(model, ids)
    report = groupmoe.patch(model, precision="fp8")
    assert report.patched and not report.notes, str(report)
    logits, loss, grads = step(model, ids)
    assert 1e-4 < rel_err(logits, ref_logits) < 0.05
    experts = [n for n in grads if "experts" in n]
    for n in experts:
        assert rel_err(grads[n], ref_grads[n]) < 0.15, n
    groupmoe.unpatch(model)
    groupmoe.patch(model)
    again, _, _ = step(model, ids)
    assert rel_err(again, ref_logits) < 1e-5
    with pytest.raises(ValueError, match="precision must be one of"):
        groupmoe.patch(model, precision="int4")


def test_patch_fp8_names_the_modules_it_leaves_alone():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[],
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    model = peft.get_peft_model(build("qwen3_moe"), cfg)
    report = groupmoe.patch(model, precision="fp8")
    assert len(report.notes) == 1 and "LoRA-wrapped" in report.notes[0]
    assert all(name in report.notes[0] for name in report.patched)


def test_generate_state_dict_and_save_load(tmp_path):
    model = build("qwen3_moe")
    model.eval()
    prompt = tokens(1, 5)
    want = model.generate(prompt, max_new_tokens=4, do_sample=False)
    keys = list(model.state_dict())
    with groupmoe.patched(model) as report:
        assert report.patched
        got = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert list(model.state_dict()) == keys
        model.save_pretrained(tmp_path)
    assert "groupmoe" not in (tmp_path / "config.json").read_text()  # nothing of ours saved
    assert torch.equal(got, want)
    loaded = type(model).from_pretrained(tmp_path)
    assert list(loaded.state_dict()) == keys
    assert loaded.config._experts_implementation != "groupmoe"  # the patch is not saved
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n


def test_experts_implementation_selects_groupmoe():
    from groupmoe.integrations import register

    register()
    model = build("mixtral")
    ids = tokens()
    ref, _, _ = step(model, ids)
    model.config._experts_implementation = "groupmoe"  # no patch(): the native switch
    out, _, _ = step(model, ids)
    assert rel_err(out, ref) < 1e-5


def test_frozen_experts_and_lora_on_attention():
    peft = pytest.importorskip("peft")
    model = build("qwen3_moe")
    for n, p in model.named_parameters():
        p.requires_grad_("experts" not in n)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    ids = tokens()
    ref_logits, _, ref_grads = step(model, ids)
    assert not any("experts" in n for n in ref_grads)
    report = groupmoe.patch(model)
    assert report.patched
    logits, _, grads = step(model, ids)
    assert rel_err(logits, ref_logits) < 1e-5
    assert grads.keys() == ref_grads.keys() and any("lora_A" in n for n in grads)
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-4, n


def test_lora_on_experts_runs_grouped(monkeypatch):
    peft = pytest.importorskip("peft")
    model = build("qwen3_moe")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                          target_parameters=["mlp.experts.gate_up_proj",
                                             "mlp.experts.down_proj"])
    model = peft.get_peft_model(model, cfg)
    ids = tokens()
    ref_logits, _, ref_grads = step(model, ids)  # peft's own path: W + BA materialised
    groupmoe.patch(model)
    from groupmoe.lora import experts as lora_experts

    calls = count_calls(monkeypatch, lora_experts, "expert_mlp_lora")
    logits, _, grads = step(model, ids)
    assert calls, "LoRA on experts did not take the grouped LoRA path"
    assert rel_err(logits, ref_logits) < 1e-5
    lora_grads = [n for n in grads if "lora" in n]
    assert lora_grads and grads.keys() == ref_grads.keys()
    for n in grads:
        assert rel_err(grads[n], ref_grads[n]) < 1e-4, n


def test_runtime_fallback_is_visible(caplog):
    """A weight transform groupmoe cannot see through (a foreign parametrization) makes it
    run the model's own forward, with a warning, and the same result as unpatched."""

    class Doubled(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    model = build("olmoe")
    experts = next(m for m in model.modules() if type(m).__name__ == "OlmoeExperts")
    torch.nn.utils.parametrize.register_parametrization(experts, "down_proj", Doubled())
    ids = tokens()
    ref, _, _ = step(model, ids)
    groupmoe.patch(model)
    with caplog.at_level(logging.WARNING, logger="groupmoe"):
        out, _, _ = step(model, ids)
    assert any("runs its original forward" in r.message and "parametrized" in r.message
               for r in caplog.records)
    assert rel_err(out, ref) < 1e-5
