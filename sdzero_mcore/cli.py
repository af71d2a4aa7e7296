"""The `sdzero` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sdzero_mcore import __version__
from sdzero_mcore.warnings_filter import quiet_dependency_warnings


def build_parser() -> argparse.ArgumentParser:
    from sdzero_mcore.checkpoint.convert import add_convert_arguments
    from sdzero_mcore.demo import add_demo_arguments

    parser = argparse.ArgumentParser(prog="sdzero", description="SD-Zero on megatron-core")
    parser.add_argument("--version", action="version", version=f"sdzero-mcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert_arguments(
        commands.add_parser("convert", help="convert checkpoints between HF and megatron-core")
    )
    add_demo_arguments(
        commands.add_parser("demo", help="the embedded demo: tiny model, CPU, no downloads")
    )
    phases = {
        "sft": "step 0: supervised fine-tuning on a synthetic task's worked solutions (a base model)",
        "srt-collect": "Phase 1: attempts, rewards and revisions -> D_revision",
        "srt-train": "Phase 1: SRT training (L_revision + L_generation) on D_revision",
        "distill": "Phase 2: on-policy self-distillation from the SRT checkpoint",
        "run": "the whole pipeline: srt-collect -> srt-train -> distill -> accuracy check",
    }
    for name, help_text in phases.items():
        sub = commands.add_parser(
            name, help=help_text, description=f"{help_text}. Run under torchrun / srun for several GPUs; one process on CPU."
        )
        sub.add_argument("config", help="YAML run config (e.g. examples/tiny_cpu.yaml)")
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.top_k=32")
        sub.add_argument("--init-from", help="starting checkpoint (default: model.mcore_dir or model.hf_dir)")
        if name in ("sft", "srt-train", "distill"):
            sub.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
        if name == "sft":
            sub.add_argument("--examples", type=int, default=2000, help="worked solutions to train on")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_dependency_warnings()
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may follow the options (argparse stops filling a positional list early)
    if getattr(args, "overrides", None) is not None and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "convert":
        from sdzero_mcore.checkpoint.convert import run_convert

        return run_convert(args)
    if args.command == "demo":
        from sdzero_mcore.demo import run_demo

        return 0 if run_demo(args.out_dir, args.architecture, args.tp) else 1
    if args.command in ("sft", "srt-collect", "srt-train", "distill", "run"):
        return run_phase(args)
    raise AssertionError(args.command)


def run_phase(args) -> int:
    """Load the config, run the phase; a bad config or data prints one line and exits 2."""
    import json

    from sdzero_mcore.config import ConfigError, load_config
    from sdzero_mcore.data import DataError

    try:
        cfg = load_config(args.config, args.overrides)
        if args.command == "sft":
            from sdzero_mcore.phases.sft import run_sft

            result = run_sft(cfg, args.init_from, examples=args.examples, max_steps=args.max_steps)
        elif args.command == "srt-collect":
            from sdzero_mcore.phases.srt_collect import run_srt_collect

            result = run_srt_collect(cfg, args.init_from)
        elif args.command == "srt-train":
            from sdzero_mcore.phases.srt_train import run_srt_train

            result = run_srt_train(cfg, args.init_from, max_steps=args.max_steps)
        elif args.command == "distill":
            from sdzero_mcore.phases.self_distill import run_distill

            result = run_distill(cfg, args.init_from, max_steps=args.max_steps)
        else:
            from sdzero_mcore.phases.pipeline import run_pipeline

            result = json.dumps(run_pipeline(cfg, args.init_from), indent=2)
    except (ConfigError, DataError) as error:
        print(f"sdzero {args.command}: {error}", file=sys.stderr)
        return 2
    print(f"sdzero {args.command}: {result}")
    return 0


if __name__ == "__main__":  # `python -m sdzero_mcore.cli`; spawned workers re-import this module
    sys.exit(main())
