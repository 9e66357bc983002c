"""``groupmoe finetune`` arguments and entry point (``groupmoe finetune --help``)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..ops.checkpoint import KEEPABLE
from ..ops.experts import PRECISIONS
from .configs import MODELS
from .model import TARGETS
from .run import IMPLS, FinetuneConfig, FinetuneOOM, compare, finetune, smoke_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    p.add_argument("--model", default=d.model,
                   help=f"one of {', '.join(m for m in MODELS if m != 'tiny')}, or a local "
                        "folder with config.json (and weights); nothing is downloaded")
    p.add_argument("--impl", default=d.impl, choices=IMPLS,
                   help="experts implementation: groupmoe, or transformers' own")
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers")
    p.add_argument("--qlora", action="store_true",
                   help="NF4 experts (groupmoe) and NF4 attention (bitsandbytes, on CUDA)")
    p.add_argument("--dequant-chunk-mib", type=int, default=d.dequant_chunk_mib,
                   help="QLoRA: dequantize at most this many MiB of an expert stack at a time "
                        "(less memory, one host sync per layer call); 0: whole stacks")
    p.add_argument("--loss-chunk", type=int, default=d.loss_chunk,
                   help="LM head + cross-entropy over this many positions at a time (the whole "
                        "logits never exist); 0: the model's own loss")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank)
    p.add_argument("--lora-alpha", type=float, default=None, help="default: 2 x rank")
    p.add_argument("--lora-targets", nargs="+", default=list(d.lora_targets), choices=TARGETS)
    p.add_argument("--seq", type=int, default=d.seq)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--grad-accum", type=int, default=d.grad_accum)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-keep", nargs="*", default=list(d.checkpoint_keep),
                   choices=sorted(KEEPABLE),
                   help="with checkpointing, keep these outputs of groupmoe's ops from the "
                        "forward instead of recomputing them: routing (a few int vectors), "
                        "experts (the expert MLP's output and its gate_up output h per layer: "
                        "memory for one less expert forward, and dequantization, per step); "
                        "none: plain checkpointing")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each decoder layer (one graph per layer type)")
    p.add_argument("--attention", default=None,
                   help="transformers' attention implementation: sdpa, flex_attention (gpt-oss "
                        "on CUDA: sinks supported), eager; default: the model's own")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS,
                   help="fp8: groupmoe's expert GEMMs (forward and dX) in e4m3 (experimental; "
                   "plain bf16 expert stacks only)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default=None,
                   help="plain text or JSONL file (default: the Python standard library)")
    p.add_argument("--out", default=d.out, help="folder for metrics.json and the PNGs")
    p.add_argument("--device", default=None)
    p.add_argument("--compare", default=None, choices=IMPLS, metavar="IMPL",
                   help="also run IMPL on the same seed and data; both loss curves on one PNG")
    p.add_argument("--profile", action="store_true",
                   help="profile steps 3-4: GPU busy vs wall time, host syncs, largest kernels "
                        "and host ops; steps 5-6: host Python functions (cProfile); printed "
                        "and written to profile.txt")
    p.add_argument("--smoke", action="store_true", help="the tiny model on CPU, a few steps")


def config_from(args: argparse.Namespace) -> FinetuneConfig:
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["lora_targets"] = tuple(values["lora_targets"])
    values["checkpoint_keep"] = tuple(values["checkpoint_keep"])
    if args.smoke:
        kept = ("impl", "out", "seed", "data", "profile", "compile", "precision")
        return smoke_config(**{k: values[k] for k in kept})
    return FinetuneConfig(**values)


def main(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    try:
        if args.compare:
            if args.compare == cfg.impl:
                print(f"--compare {args.compare}: pick another implementation than --impl")
                return 2
            result = compare(cfg, (cfg.impl, args.compare))
            print(json.dumps({k: result[k] for k in ("impls", "max_abs_loss_diff", "png")}))
            for impl, run in result["runs"].items():
                _summary(impl, run)
        else:
            _summary(cfg.impl, finetune(cfg))
    except FinetuneOOM as err:
        print(f"groupmoe finetune: {err}")
        return 1
    except KeyboardInterrupt:
        print("groupmoe finetune: interrupted; the metrics of the steps done are written")
        return 130
    return 0


def _summary(impl: str, run: dict) -> None:
    peak = run.get("peak_mib")
    print(f"{run['config']['model']} {impl}: {run['steps_done']} steps, "
          f"{run['tokens_per_s']:,.0f} tokens/s, final loss {run['final_loss']:.4f}, "
          f"peak {'-' if peak is None else f'{peak / 1024:.2f} GiB'}")
    for note in run["notes"]:
        print(f"  {note}")
