"""Command line: ``groupmoe demo``, ``groupmoe bench`` and ``groupmoe finetune``."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="groupmoe", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="train a tiny MoE LM with the loop and with groupmoe")
    demo.add_argument("--device", default=None)
    demo.add_argument("--steps", type=int, default=None)
    bench = sub.add_parser("bench", help="time one MoE layer per implementation")
    from .bench import layer

    layer.add_arguments(bench)
    tune = sub.add_parser("finetune", help="LoRA/QLoRA fine-tuning of a whole MoE model")
    from .finetune import cli as finetune_cli

    finetune_cli.add_arguments(tune)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        from .demo import run_demo

        run_demo(args.device, args.steps)
    elif args.cmd == "finetune":
        raise SystemExit(finetune_cli.main(args))
    else:
        layer.main(args)


if __name__ == "__main__":
    main()
