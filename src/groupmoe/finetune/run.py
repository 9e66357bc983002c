"""``groupmoe finetune``: one fine-tuning job with transformers' ``Trainer``, or two of them on
the same seed and data (``compare``) with both loss curves on one PNG."""

from __future__ import annotations

import dataclasses
import gc
import os
from dataclasses import dataclass

import torch

from ..ops.checkpoint import checkpoint_context
from ..ops.checks import check, flush_checks
from ..ops.experts import PRECISIONS
from .configs import model_spec
from .data import TokenWindows, train_tokenizer
from .loss import chunked_loss_reason, use_chunked_loss
from .metrics import Metrics, StepClock, optimizer_bytes, plot_losses, static_memory
from .model import TARGETS, add_lora, attention_4bit_reason, compile_layers, load
from .profiling import StepProfiler

IMPLS = ("groupmoe", "grouped_mm", "eager")


@dataclass
class FinetuneConfig:
    """One job. ``model``: a name of :data:`groupmoe.finetune.MODELS` or a local folder with
    ``config.json`` (and weights); ``layers`` keeps that many decoder layers (random weights).
    ``qlora``: NF4 experts (``groupmoe.quantize_experts``; groupmoe only, transformers keeps
    stacked experts in bf16) and NF4 attention through bitsandbytes where it runs; the
    experts are double-quantized (8-bit absmax, as QLoRA) and dequantized
    ``dequant_chunk_mib`` of a stack at a time (0: whole stacks, no host sync). ``loss_chunk``:
    the LM head and cross-entropy run that many positions at a time (0: the model's own loss
    over the whole logits). ``checkpoint_keep``: with gradient checkpointing, what groupmoe keeps
    from the forward instead of recomputing (:func:`groupmoe.ops.checkpoint_context`:
    ``"routing"``, ``"experts"``; empty: plain checkpointing). ``compile``: ``torch.compile``
    each decoder layer. ``attention``:
    transformers' attention implementation (``"sdpa"``, ``"flex_attention"``, ``"eager"``;
    ``None``: the model's default). ``precision``: ``"fp8"`` runs groupmoe's expert GEMMs
    (forward and dX) in e4m3 (experimental, plain bf16 stacks only, see
    :func:`groupmoe.patch`). ``data``: a text or JSONL file, default the Python standard
    library's source."""

    model: str = "qwen3-30b-a3b"
    impl: str = "groupmoe"
    layers: int | None = None
    qlora: bool = False
    dequant_chunk_mib: int = 0
    loss_chunk: int = 256
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] = TARGETS
    seq: int = 2048
    batch: int = 1
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    checkpoint_keep: tuple[str, ...] = ("routing",)
    compile: bool = False
    attention: str | None = None
    precision: str = "default"
    steps: int = 50
    lr: float = 2e-4
    seed: int = 0
    data: str | None = None
    vocab: int = 8192
    out: str = "finetune_out"
    device: str | None = None
    progress: bool = True
    profile: bool = False

    def run_dir(self) -> str:
        name = os.path.basename(os.path.normpath(self.model))
        tags = ("-fp8" if self.precision == "fp8" else "") + ("-compiled" if self.compile else "")
        return os.path.join(self.out, f"{name}-{self.impl}{tags}")


class FinetuneOOM(RuntimeError):
    """The job ran out of GPU memory; the message says the peak reached and what to lower."""


def smoke_config(**overrides) -> FinetuneConfig:
    """``--smoke``: the tiny model on CPU, a few dozen steps (well under two minutes)."""
    base = dict(model="tiny", device="cpu", seq=64, batch=2, steps=30, lr=1e-2, lora_rank=4,
                vocab=512)
    return FinetuneConfig(**{**base, **overrides})


def _device(cfg: FinetuneConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check(cfg: FinetuneConfig, spec) -> None:
    check(cfg.impl in IMPLS, f"--impl must be one of {IMPLS}, got {cfg.impl!r}")
    check(cfg.precision in PRECISIONS,
          f"--precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    check(cfg.precision == "default" or cfg.impl == "groupmoe",
          f"--precision {cfg.precision} needs --impl groupmoe, not {cfg.impl}")
    limit = getattr(spec.config, "max_position_embeddings", None)
    check(limit is None or cfg.seq <= limit,
          f"--seq {cfg.seq} is beyond {spec.name}'s maximum of {limit} positions")
    check(cfg.seq >= 2 and cfg.batch >= 1 and cfg.grad_accum >= 1 and cfg.steps >= 1,
          "--seq >= 2, --batch, --grad-accum and --steps >= 1")
    check(cfg.loss_chunk >= 0 and cfg.dequant_chunk_mib >= 0,
          "--loss-chunk and --dequant-chunk-mib must be >= 0 (0: whole)")


def finetune(cfg: FinetuneConfig) -> dict:
    """Run one fine-tuning job; returns its metrics (also written to
    ``<out>/<model>-<impl>/metrics.json`` after every step, with ``loss.png``).

    Raises :class:`FinetuneOOM` when the GPU runs out of memory, after writing the steps done;
    an interrupt (Ctrl-C) leaves the metrics file valid with ``status: "interrupted"``.
    """
    from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

    spec = model_spec(cfg.model, cfg.layers)
    _check(cfg, spec)
    device = _device(cfg)

    def say(message: str) -> None:
        if cfg.progress:
            print(f"groupmoe finetune [{cfg.impl}]: {message}", flush=True)

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run_dir = cfg.run_dir()
    os.makedirs(run_dir, exist_ok=True)
    set_seed(cfg.seed)
    say("tokenizer and data")
    tokenizer = train_tokenizer(cfg.data, min(cfg.vocab, spec.config.vocab_size),
                                os.path.join(cfg.out, f"tokenizer-{cfg.vocab}.json"))
    windows = TokenWindows(cfg.data, tokenizer, cfg.seq, cfg.steps * cfg.batch * cfg.grad_accum)
    say(f"building {spec.name} ({spec.config.num_hidden_layers} layers) on {device}")
    notes = []
    why_bf16 = attention_4bit_reason(device) if cfg.qlora else None
    if why_bf16:
        notes.append(why_bf16)
    model = load(spec, device, dtype, attention_4bit=cfg.qlora and why_bf16 is None,
                 attention=cfg.attention)
    if cfg.qlora and cfg.impl == "groupmoe":
        from ..integrations import quantize_experts

        say("quantizing the experts to NF4")
        chunk = cfg.dequant_chunk_mib * 2 ** 20 or None
        notes.append(str(quantize_experts(model, nested=True, dequant_chunk_bytes=chunk)))
    elif cfg.qlora:
        notes.append("experts kept in the compute dtype: transformers' own experts "
                     "implementations run stacked experts unquantized")
    loss_func = None
    if cfg.loss_chunk:
        why = chunked_loss_reason(model)
        if why is None:
            loss_func = use_chunked_loss(model, cfg.loss_chunk)
        else:
            notes.append(f"the model's own loss over the whole logits: {why}")
    model = add_lora(model, cfg.lora_rank, tuple(cfg.lora_targets), cfg.lora_alpha)
    from ..integrations import use_experts_implementation

    report = use_experts_implementation(model, cfg.impl, cfg.precision)
    if report is not None:
        notes.append(str(report))
    if cfg.gradient_checkpointing:
        notes.append(_checkpoint_note(cfg))
    if cfg.compile:
        say("compiling the decoder layers (on the first step)")
        notes.append(f"torch.compile on each of {compile_layers(model)} decoder layers")
    metrics = Metrics(os.path.join(run_dir, "metrics.json"), {
        "config": dataclasses.asdict(cfg),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "notes": notes,
        "tokens_per_step": cfg.batch * cfg.grad_accum * cfg.seq,
        "static_memory_mib": {k: v / 2 ** 20 for k, v in static_memory(model).items()},
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock, tokens = StepClock(device), metrics.data["tokens_per_step"]
    profiler = StepProfiler(device) if cfg.profile else None
    reports: list[str] = []

    class Recorder(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            clock.start()

        def on_step_begin(self, args, state, control, **kw):
            if profiler is not None:
                profiler.step_begin(state.global_step + 1)

        def on_step_end(self, args, state, control, **kw):
            flush_checks()  # a NaN in a router surfaces in the step that produced it
            if profiler is not None:
                profiler.step_end(state.global_step)
                if profiler.report is not None:
                    _write_profile(run_dir, profiler, reports, say)
            dt = clock.lap()
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 \
                if device.type == "cuda" else None
            profiled = profiler is not None and profiler.covers(state.global_step)
            metrics.step(state.global_step, seconds=dt, tokens_per_s=tokens / dt, peak_mib=peak,
                         **({"profiled": True} if profiled else {}))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                metrics.step(state.global_step, loss=float(logs["loss"]))

    # transformers 5.2x renamed gradient_checkpointing; 5.17 knows only the old name
    ckpt = "activation_checkpointing" if "activation_checkpointing" in \
        TrainingArguments.__dataclass_fields__ else "gradient_checkpointing"
    args = TrainingArguments(
        output_dir=run_dir, per_device_train_batch_size=cfg.batch,
        gradient_accumulation_steps=cfg.grad_accum, max_steps=cfg.steps, learning_rate=cfg.lr,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        bf16=dtype == torch.bfloat16, use_cpu=device.type == "cpu", seed=cfg.seed,
        **{ckpt: cfg.gradient_checkpointing, f"{ckpt}_kwargs": _checkpoint_kwargs(cfg)},
        dataloader_num_workers=0, disable_tqdm=not cfg.progress,
        remove_unused_columns=False)
    trainer = _trainer_class(Trainer)(model=model, args=args, train_dataset=windows,
                                      callbacks=[Recorder()], compute_loss_func=loss_func)
    say(f"training {cfg.steps} steps of {metrics.data['tokens_per_step']} tokens")
    try:
        trainer.train()
    except torch.OutOfMemoryError:
        done = len(metrics.data["steps"])
        reached = ""
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
            total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
            reached = f": the peak reached {peak:.1f} GiB of {total:.1f} GiB"
        message = (f"out of memory after {done} step(s){reached}; lower --seq or --batch "
                   f"(--grad-accum keeps the tokens per step), add --gradient-checkpointing or "
                   f"--qlora, or train fewer --lora-targets")
        metrics.update(status="out of memory", error=message)
        raise FinetuneOOM(message) from None
    except KeyboardInterrupt:
        metrics.update(status="interrupted", **metrics.summary())
        raise
    metrics.update(status="done", optimizer_state_mib=optimizer_bytes(trainer.optimizer) / 2 ** 20,
                   **metrics.summary())
    curve = [(r["step"], r["loss"]) for r in metrics.data["steps"] if "loss" in r]
    plot_losses({cfg.impl: curve}, os.path.join(run_dir, "loss.png"),
                f"{cfg.model}, {cfg.impl}{', QLoRA' if cfg.qlora else ''}: training loss")
    result = metrics.data
    del trainer, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _trainer_class(trainer_cls):
    """The Trainer with its FLOP count (logged as ``total_flos``) taken from a parameter count
    made once: transformers re-counts every parameter each step (a walk of the whole module
    tree, milliseconds of host time per step on a whole model with LoRA)."""

    class CountOnceTrainer(trainer_cls):
        _params: int | None = None

        def floating_point_ops(self, inputs):  # transformers' formula, 6 x tokens x params
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return super().floating_point_ops(inputs)
            if self._params is None:
                self._params = self.model.num_parameters(exclude_embeddings=True)
            return 6 * inputs[main].numel() * self._params

    return CountOnceTrainer


def _checkpoint_note(cfg: FinetuneConfig) -> str:
    if cfg.impl != "groupmoe":
        return (f"plain gradient checkpointing: --checkpoint-keep applies to groupmoe's ops, "
                f"{cfg.impl} runs transformers' own experts")
    if not cfg.checkpoint_keep:
        return "plain gradient checkpointing (--checkpoint-keep none)"
    return (f"gradient checkpointing keeps groupmoe's {' and '.join(cfg.checkpoint_keep)} "
            "from the forward (not recomputed)")


def _checkpoint_kwargs(cfg: FinetuneConfig) -> dict:
    kwargs = {"use_reentrant": False}
    if cfg.impl == "groupmoe" and cfg.checkpoint_keep:
        kwargs["context_fn"] = checkpoint_context(cfg.checkpoint_keep)
    return kwargs


def _write_profile(run_dir: str, profiler: StepProfiler, reports: list[str], say) -> None:
    # profile.txt holds every window's report so far (torch.profiler's, then cProfile's)
    reports.append(profiler.report)
    with open(os.path.join(run_dir, "profile.txt"), "w") as fh:
        fh.write("\n".join(reports) + "\n")
    say(f"profile:\n{profiler.report}")
    profiler.report = None


def compare(cfg: FinetuneConfig, impls: tuple[str, str] = ("groupmoe", "grouped_mm")) -> dict:
    """The same job (seed, data, steps) with two experts implementations; both loss curves on
    ``<out>/compare.png`` with the largest per-step loss difference, and ``compare.json``."""
    from .metrics import write_json

    runs = {impl: finetune(dataclasses.replace(  # --precision applies to groupmoe only
        cfg, impl=impl, precision=cfg.precision if impl == "groupmoe" else "default"))
        for impl in impls}
    curves = {impl: [(r["step"], r["loss"]) for r in run["steps"] if "loss" in r]
              for impl, run in runs.items()}
    a, b = (dict(curves[i]) for i in impls)
    diffs = [abs(a[s] - b[s]) for s in a.keys() & b.keys()]
    max_diff = max(diffs) if diffs else None
    title = (f"{cfg.model}: {impls[0]} vs {impls[1]}, max |loss difference| "
             f"{max_diff:.2e}" if max_diff is not None else f"{cfg.model}")
    png = plot_losses(curves, os.path.join(cfg.out, "compare.png"), title)
    result = {"impls": list(impls), "max_abs_loss_diff": max_diff, "png": png,
              "runs": {i: {k: v for k, v in run.items() if k != "steps"}
                       for i, run in runs.items()}, "curves": curves}
    write_json(os.path.join(cfg.out, "compare.json"), result)
    return result
