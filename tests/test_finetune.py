"""``groupmoe finetune`` on CPU: the smoke job (the README's command), --compare, data files,
bad input, and what an interrupted or out-of-memory run leaves behind."""

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from groupmoe.finetune import FinetuneConfig, FinetuneOOM, finetune, smoke_config  # noqa: E402
from groupmoe.finetune.data import TokenWindows, file_texts, train_tokenizer  # noqa: E402


def _run(tmp_path, **kw):
    return finetune(smoke_config(out=str(tmp_path), progress=False, **kw))


def test_smoke_job_writes_metrics_and_plot(tmp_path):
    run = _run(tmp_path, steps=8)
    path = tmp_path / "tiny-groupmoe" / "metrics.json"
    saved = json.loads(path.read_text())
    assert saved["status"] == "done" and saved["steps_done"] == 8
    assert [r["step"] for r in saved["steps"]] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in saved["steps"])
    assert saved["tokens_per_step"] == 2 * 64 and run["final_loss"] == saved["steps"][-1]["loss"]
    assert any("patched 2 experts" in n for n in saved["notes"])
    memory = saved["static_memory_mib"]
    assert {"experts", "attention", "LoRA adapters", "embeddings and LM head"} <= memory.keys()
    assert saved["trainable_params"] > 0 and saved["optimizer_state_mib"] > 0
    assert (tmp_path / "tiny-groupmoe" / "loss.png").stat().st_size > 1000


def test_cli_compare_plots_both_curves(tmp_path):
    """The README's command: groupmoe and transformers' grouped_mm on the same seed and data,
    equal to fp32 rounding on CPU."""
    out = subprocess.run([sys.executable, "-m", "groupmoe", "finetune", "--smoke", "--compare",
                          "grouped_mm", "--out", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "compare.json").read_text())
    assert result["impls"] == ["groupmoe", "grouped_mm"]
    assert result["max_abs_loss_diff"] < 1e-4
    assert len(result["curves"]["groupmoe"]) == len(result["curves"]["grouped_mm"]) == 30
    first, last = result["curves"]["groupmoe"][0][1], result["curves"]["groupmoe"][-1][1]
    assert last < first  # it learns
    assert (tmp_path / "compare.png").stat().st_size > 1000
    assert "tokens/s" in out.stdout


def test_qlora_and_gradient_checkpointing_on_cpu(tmp_path):
    run = _run(tmp_path, steps=3, qlora=True, gradient_checkpointing=True,
               lora_targets=("experts",))
    assert run["status"] == "done"
    assert any("quantized 2 experts module(s) to NF4" in n for n in run["notes"])
    assert any("attention kept in the compute dtype" in n for n in run["notes"])
    assert "experts (4-bit)" in run["static_memory_mib"]


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_data_file(tmp_path, kind):
    text = "def add(a, b):\n    return a + b\n" * 200
    path = tmp_path / f"data.{kind}"
    if kind == "txt":
        path.write_text(text)
    else:
        path.write_text("\n".join(json.dumps({"id": i, "text": text[:400]}) for i in range(20)))
    tok = train_tokenizer(str(path), 300, str(tmp_path / "tok.json"))
    windows = TokenWindows(str(path), tok, 16, 50)  # more than the file holds: it cycles
    assert windows.windows.shape == (50, 16) and int(windows.windows.max()) < 300
    run = _run(tmp_path, steps=2, data=str(path))
    assert run["status"] == "done"


def test_fp8_precision_job(tmp_path):
    """--precision fp8: the experts' GEMMs in e4m3 (CPU emulation) train the tiny model (LoRA
    on attention, plain expert stacks) to a loss close to the default precision's; with LoRA
    on the experts the report says they keep their precision; other implementations refuse
    it."""
    runs = {p: _run(tmp_path, steps=4, precision=p, lora_targets=("attention",))
            for p in ("default", "fp8")}
    assert (tmp_path / "tiny-groupmoe-fp8" / "metrics.json").exists()
    losses = {p: [r["loss"] for r in run["steps"]] for p, run in runs.items()}
    assert losses["fp8"] != losses["default"]
    assert losses["fp8"] == pytest.approx(losses["default"], rel=0.05)
    wrapped = _run(tmp_path / "wrapped", steps=1, precision="fp8")
    assert any("keep their own precision" in n for n in wrapped["notes"])
    with pytest.raises(ValueError, match="--precision fp8 needs --impl groupmoe"):
        _run(tmp_path, impl="grouped_mm", precision="fp8")


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'qwen9'"):
        finetune(FinetuneConfig(model="qwen9", out=str(tmp_path)))
    with pytest.raises(ValueError, match="beyond tiny's maximum of 1024"):
        _run(tmp_path, seq=4096)
    with pytest.raises(ValueError, match="--layers 5: tiny has 2"):
        _run(tmp_path, layers=5)
    with pytest.raises(ValueError, match="no such file"):
        list(file_texts(str(tmp_path / "missing.txt")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        list(file_texts(str(bad)))
    import transformers

    dense = tmp_path / "dense"
    transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4).save_pretrained(dense)
    with pytest.raises(ValueError, match="has no MoE layers"):
        _run(tmp_path, model=str(dense))


class _StopAfter:
    def __init__(self, steps, error):
        self.steps, self.error = steps, error

    def __call__(self, metrics_step):
        def step(self_, step, **values):
            metrics_step(self_, step, **values)
            if step >= self.steps and "loss" in values:
                raise self.error
        return step


@pytest.mark.parametrize("error,status", [(KeyboardInterrupt(), "interrupted"),
                                          (torch.OutOfMemoryError("CUDA out of memory"),
                                           "out of memory")])
def test_interrupted_or_out_of_memory_run_leaves_valid_metrics(tmp_path, monkeypatch, error,
                                                               status):
    from groupmoe.finetune import metrics

    monkeypatch.setattr(metrics.Metrics, "step", _StopAfter(3, error)(metrics.Metrics.step))
    expected = KeyboardInterrupt if status == "interrupted" else FinetuneOOM
    with pytest.raises(expected) as err:
        _run(tmp_path, steps=10)
    saved = json.loads((tmp_path / "tiny-groupmoe" / "metrics.json").read_text())
    assert saved["status"] == status and len(saved["steps"]) == 3
    if status == "out of memory":
        assert "after 3 step(s)" in str(err.value) and "--gradient-checkpointing" in saved["error"]


def test_chunked_loss_equals_the_models_own():
    """The LM head + cross-entropy over chunks of positions (chunks not dividing the length,
    ignored labels): the model's loss and every gradient, fp32."""
    import transformers

    from groupmoe.finetune.configs import model_spec
    from groupmoe.finetune.loss import chunked_lm_loss, chunked_loss_reason, use_chunked_loss

    torch.manual_seed(0)
    cfg = model_spec("tiny", None).config
    model = transformers.AutoModelForCausalLM.from_config(cfg).float()
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    labels = ids.clone()
    labels[0, 5:9] = -100
    ref = model(input_ids=ids, labels=labels).loss
    params = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(ref, params)
    assert chunked_loss_reason(model) is None
    cfg.output_router_logits = True
    assert "auxiliary loss" in chunked_loss_reason(model)
    cfg.output_router_logits = False
    loss_func = use_chunked_loss(model, chunk=7)
    for num_items in (None, (labels[:, 1:] != -100).sum()):
        out = model(input_ids=ids)
        assert out.logits.shape == (2, 23, cfg.hidden_size)  # the hidden states pass through
        loss = loss_func(out, labels, num_items_in_batch=num_items)
        grads = torch.autograd.grad(loss, params)
        assert torch.allclose(loss, ref, rtol=1e-6, atol=0)
        for g, rg in zip(grads, ref_grads):
            assert torch.allclose(g, rg, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        chunked_lm_loss(model.lm_head.head, out.logits, labels, 0)
    assert "no nn.Linear lm_head" in chunked_loss_reason(model)  # not twice


def test_compiled_layers_with_checkpointing_match_eager(tmp_path):
    """--compile (each decoder layer) under gradient checkpointing: the same losses as eager."""
    kw = dict(steps=3, gradient_checkpointing=True)
    eager = _run(tmp_path / "eager", **kw)
    compiled = _run(tmp_path / "compiled", compile=True, **kw)
    assert any("torch.compile on each of 2 decoder layers" in n for n in compiled["notes"])
    losses = [[r["loss"] for r in run["steps"]] for run in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_checkpoint_keep_gives_the_same_losses(tmp_path):
    """--checkpoint-keep (selective checkpointing of groupmoe's ops): plain, routing (the
    default) and routing + experts train to the same losses."""
    runs = {keep: _run(tmp_path / "-".join(keep or ("none",)), steps=3,
                       gradient_checkpointing=True, checkpoint_keep=keep)
            for keep in ((), ("routing",), ("routing", "experts"))}
    losses = [[r["loss"] for r in run["steps"]] for run in runs.values()]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) == losses[2]
    notes = [n for run in runs.values() for n in run["notes"] if "checkpointing" in n]
    assert notes == ["plain gradient checkpointing (--checkpoint-keep none)",
                     "gradient checkpointing keeps groupmoe's routing from the forward (not "
                     "recomputed)", "gradient checkpointing keeps groupmoe's routing and "
                     "experts from the forward (not recomputed)"]


def test_step_profiler_windows():
    """torch.profiler over steps 1-2, then cProfile over steps 3-4: each window's report when it
    ends, and covers() marks exactly those steps."""
    from groupmoe.finetune.profiling import StepProfiler

    prof = StepProfiler(torch.device("cpu"), first=1, steps=2)
    reports = {}
    a = torch.randn(64, 64)
    for step in range(6):
        prof.step_begin(step)
        for _ in range(3):
            a = torch.tanh(a @ a)
        prof.step_end(step)
        if prof.report is not None:
            reports[step], prof.report = prof.report, None
    assert sorted(reports) == [2, 4]
    assert reports[2].startswith("per step:") and "aten::mm" in reports[2]
    assert reports[4].startswith("host Python under cProfile, 2 steps")
    assert "tanh" in reports[4]
    assert [s for s in range(6) if prof.covers(s)] == [1, 2, 3, 4]


def test_trainer_counts_parameters_once(tmp_path, monkeypatch):
    """The finetune Trainer's FLOP count equals transformers' own, from one parameter count."""
    from transformers import Trainer, TrainingArguments

    from groupmoe.finetune.run import _trainer_class
    from test_transformers import build, tokens

    model = build("qwen3_moe")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    ours, theirs = _trainer_class(Trainer)(model=model, args=args), Trainer(model=model, args=args)
    inputs = {"input_ids": tokens()}
    counted = []
    count = model.num_parameters
    monkeypatch.setattr(model, "num_parameters", lambda **kw: counted.append(1) or count(**kw))
    want = theirs.floating_point_ops(inputs)
    assert want > 0 and len(counted) == 1
    assert [ours.floating_point_ops(inputs) for _ in range(3)] == [want] * 3
    assert len(counted) == 2  # once for transformers' call, once for all three of ours
