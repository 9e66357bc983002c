"""End-to-end: a stack of real-sized transformers decoder layers (random weights, real configs
of Qwen3-30B-A3B, gpt-oss-20b and Mixtral-8x7B, few layers), training step tokens/s and peak
memory per experts implementation: transformers' built-ins and groupmoe, each eager and with
every decoder layer under ``torch.compile`` (``--modes eager compiled``).

``python -m groupmoe.bench.hf_e2e --out hf.json`` (``--smoke`` for tiny CPU configs).
The step is forward + backward of the decoder layers on ``inputs_embeds`` (embedding and LM
head left out: they do not depend on the experts implementation). Compiled rows also give the
time to the first step (compilation included). transformers' ``eager`` experts (a loop over
experts with data-dependent shapes) run eager only: compiled, they break the graph per expert.
"""

from __future__ import annotations

import argparse
import json
import logging

import torch

from ..finetune.configs import MODELS
from ..integrations.transformers import use_experts_implementation
from .layer import environment
from .profile import back_to_back_ms, kernel_ms
from .timing import median_ms, peak_extra_bytes

# the real configs of groupmoe finetune, with a small vocabulary (embedding and LM head are
# left out of the step)
_BASE_MODELS = {"Qwen3MoeConfig": "Qwen3MoeModel", "GptOssConfig": "GptOssModel",
                "MixtralConfig": "MixtralModel"}
REAL = {name: (MODELS[name][0], _BASE_MODELS[MODELS[name][0]],
               dict(MODELS[name][1], vocab_size=1024))
        for name in ("qwen3-30b-a3b", "gpt-oss-20b", "mixtral-8x7b")}
SMOKE = {k: (c, m, dict(kw, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16,
                        **({"moe_intermediate_size": 16} if "moe_intermediate_size" in kw
                           else {})))
         for k, (c, m, kw) in REAL.items()}
IMPLS = ("eager", "grouped_mm", "batched_mm", "groupmoe", "groupmoe-fp8")
MODES = ("eager", "compiled")


def use_impl(model, impl: str) -> None:
    """transformers' experts implementation ``impl``, groupmoe's, or groupmoe's with
    ``precision="fp8"`` (``"groupmoe-fp8"``)."""
    if impl == "groupmoe-fp8":
        use_experts_implementation(model, "groupmoe", precision="fp8")
    else:
        use_experts_implementation(model, impl)


def set_compiled(model, compiled: bool) -> None:
    """Compile each decoder layer (``nn.Module.compile``), or undo it; caches are reset so
    each implementation compiles afresh."""
    torch._dynamo.reset()
    for layer in model.layers:
        if compiled:
            layer.compile()
        else:
            layer._compiled_call_impl = None


def build(name: str, layers: int, smoke: bool, device, dtype):
    import transformers

    cfg_name, model_name, kw = (SMOKE if smoke else REAL)[name]
    kw = dict(kw, num_hidden_layers=layers)
    if "layer_types" in kw:  # gpt-oss alternates sliding and full attention
        kw["layer_types"] = (kw["layer_types"] * layers)[:layers]
    cfg = getattr(transformers, cfg_name)(**kw)
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, model_name)(cfg).to(dtype)
    model.train()
    return model


def bench_model(name, layers, batch, seq, smoke, device, dtype, repeat, modes=MODES,
                impls=IMPLS, log=print):
    model = build(name, layers, smoke, device, dtype)
    h = model.config.hidden_size
    g = torch.Generator(device=device).manual_seed(1)
    embeds = [torch.randn(batch, seq, h, device=device, dtype=dtype, generator=g)
              .requires_grad_(True) for _ in range(2)]
    rows = []
    for mode in modes:
        for impl in impls:
            if mode == "compiled" and impl == "eager":
                continue
            use_impl(model, impl)
            set_compiled(model, mode == "compiled")

            def step(it, model=model):
                model.zero_grad(set_to_none=True)
                out = model(inputs_embeds=embeds[it % 2]).last_hidden_state
                out.float().pow(2).mean().backward()

            row = {"model": name, "impl": impl, "mode": mode, "layers": layers,
                   "tokens": batch * seq}
            try:
                row["first_step_s"] = median_ms(step, device, warmup=0, repeat=1) / 1e3
                ms = median_ms(step, device, warmup=2, repeat=repeat)
                model.zero_grad(set_to_none=True)
                peak = peak_extra_bytes(lambda: step(0), device)
                row.update(ms=ms, tokens_per_s=batch * seq / ms * 1e3,
                           peak_extra_mib=None if peak is None else peak / 2 ** 20)
            except torch.OutOfMemoryError:
                row.update(ms=None, tokens_per_s=None, peak_extra_mib=None, oom=True)
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(row)
            log(row)
    set_compiled(model, False)
    use_experts_implementation(model, "eager")
    return rows


def profile_impl(name, impl, layers, batch, seq, smoke, device, dtype, rows=20,
                 compiled=False) -> None:
    """Kernel-level breakdown of one training step with one experts implementation."""
    from torch.profiler import ProfilerActivity, profile

    model = build(name, layers, smoke, device, dtype)
    use_impl(model, impl)
    set_compiled(model, compiled)
    x = torch.randn(batch, seq, model.config.hidden_size, device=device, dtype=dtype,
                    requires_grad=True)

    def step():
        model.zero_grad(set_to_none=True)
        model(inputs_embeds=x).last_hidden_state.float().pow(2).mean().backward()

    for _ in range(2):
        step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages()
    print(f"--- {name} {impl}{' compiled' if compiled else ''}")
    print(table.table(sort_by=key, row_limit=rows, max_name_column_width=50))
    if device.type == "cuda":
        print(f"per step: kernels {kernel_ms(table):.2f} ms (GPU busy), timed alone "
              f"{median_ms(lambda i: step(), device, repeat=5):.2f} ms, back-to-back "
              f"{back_to_back_ms(lambda i: step(), device, steps=4, repeat=3):.2f} ms")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--models", nargs="+", default=list(REAL), choices=list(REAL))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--out", default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--profile", nargs="*", default=None, metavar="IMPL",
                   help="print a kernel breakdown of one step per implementation instead "
                        "(compiled too with --modes compiled)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)  # show any fallback to a model's own forward
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.smoke:
        args.batch, args.seq, args.repeat = 1, 16, 1
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.profile is not None:
        for name in args.models:
            for mode in args.modes:
                for impl in args.profile or ["grouped_mm", "groupmoe"]:
                    profile_impl(name, impl, args.layers, args.batch, args.seq, args.smoke,
                                 device, dtype, compiled=mode == "compiled")
        return
    rows = []
    for name in args.models:
        rows += bench_model(name, args.layers, args.batch, args.seq, args.smoke, device, dtype,
                            args.repeat, args.modes, args.impls)
    print_table(rows)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"env": environment(device), "rows": rows}, fh, indent=1)


def print_table(rows: list[dict]) -> None:
    """Markdown table; "vs best built-in" compares within a mode (compiled with compiled)."""
    print("| model | impl | mode | ms/step | tokens/s | peak extra MiB | first step s | "
          "vs best built-in |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = [o["ms"] for o in rows if o["model"] == r["model"] and o["mode"] == r["mode"]
                and not o["impl"].startswith("groupmoe") and o["ms"]]
        head = f"| {r['model']} | {r['impl']} | {r['mode']} |"
        if r["ms"] is None:
            print(f"{head} OOM | - | - | - | - |")
            continue
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        rel = f"{min(same) / r['ms']:.2f}x" if same else "-"
        print(f"{head} {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {peak} | "
              f"{r['first_step_s']:.1f} | {rel} |")


if __name__ == "__main__":
    main()
