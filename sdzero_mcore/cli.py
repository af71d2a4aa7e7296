"""The `sdzero` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sdzero_mcore import __version__
from sdzero_mcore.warnings_filter import quiet_dependency_warnings


def build_parser() -> argparse.ArgumentParser:
    from sdzero_mcore.convert_args import add_convert_arguments
    from sdzero_mcore.demo import add_demo_arguments
    from sdzero_mcore.parity_demo import add_parity_demo_arguments
    from sdzero_mcore.plan_args import add_plan_arguments

    parser = argparse.ArgumentParser(prog="sdzero", description="SD-Zero on megatron-core")
    parser.add_argument("--version", action="version", version=f"sdzero-mcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert_arguments(
        commands.add_parser("convert", help="convert checkpoints between HF and megatron-core")
    )
    add_demo_arguments(
        commands.add_parser("demo", help="the embedded comparison demo: SD-Zero vs baselines on a tiny model, CPU, no downloads")
    )
    add_parity_demo_arguments(
        commands.add_parser("parity-demo", help="converters and megatron models vs transformers on a tiny model (20 s)")
    )
    add_plan_arguments(
        commands.add_parser("plan", help="GPU memory per rank for a config's training phases, and the layouts that fit",
                            description="GPU memory per rank (weights, gradients, optimizer, activations, rollout "
                                        "engine) for the config's phases; --gpus N lists the smallest layouts that fit.")
    )
    tiny = commands.add_parser("tiny-model", help="write a randomly initialised tiny Qwen3-shaped HF model + char tokenizer")
    tiny.add_argument("out_dir")
    tiny.add_argument("--scale", choices=["cpu", "small"], default="cpu", help="the demo's model shapes")
    tiny.add_argument("--seed", type=int, default=0)
    phases = {
        "sft": "step 0: supervised fine-tuning on a synthetic task's worked solutions (a base model)",
        "srt-collect": "Phase 1: attempts, rewards and revisions -> D_revision",
        "srt-train": "Phase 1: SRT training (L_revision + L_generation) on D_revision",
        "distill": "Phase 2: on-policy self-distillation from the SRT checkpoint",
        "run": "the whole pipeline: srt-collect -> srt-train -> distill -> accuracy check",
        "rft": "baseline: k samples per question, fine-tune on the correct ones",
        "grpo": "baseline: GRPO (DAPO style) with group-normalised advantages",
    }
    for name, help_text in phases.items():
        sub = commands.add_parser(
            name, help=help_text, description=f"{help_text}. Run under torchrun / srun for several GPUs; one process on CPU."
        )
        sub.add_argument("config", help="YAML run config (e.g. examples/tiny_cpu.yaml)")
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. distill.top_k=32")
        sub.add_argument("--init-from", help="starting checkpoint (default: model.mcore_dir or model.hf_dir)")
        if name in ("sft", "srt-train", "distill", "rft", "grpo"):
            sub.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint (avg@k, pass@k, generate-then-revise, localisation), or --compare runs",
        description="Evaluate a checkpoint: `sdzero eval CONFIG --checkpoint CKPT --out DIR`; join runs: "
                    "`sdzero eval --compare DIR [DIR ...]`.",
    )
    evaluate.add_argument("config", nargs="?", help="YAML run config (data, rollout and eval sections)")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.k=4")
    evaluate.add_argument("--checkpoint", help="the checkpoint to evaluate (sdzero-mcore or HF directory)")
    evaluate.add_argument("--out", help="output directory (eval.json, localization.*)")
    evaluate.add_argument("--name", help="the run's name in --compare tables (default: the output directory's name)")
    evaluate.add_argument("--dataset", help="questions to evaluate on (default: a synthetic task's held-out questions)")
    evaluate.add_argument("--reviser", help="the reviser for the localisation analysis (default: the checkpoint itself)")
    evaluate.add_argument("--budget", help="RUN_DIR:phase[,phase]: the recorded generation budget to report")
    evaluate.add_argument("--compare", nargs="+", metavar="RUN", help="eval.json files or their directories to join in one table")
    evaluate.add_argument("--backend", choices=["hf", "sglang", "vllm"], help="the rollout engine (sets rollout.backend)")
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
    if getattr(args, "backend", None):  # after the config's own overrides: the flag wins
        args.overrides.append(f"rollout.backend={args.backend}")
    if args.command == "convert":
        from sdzero_mcore.checkpoint.convert import run_convert

        return run_convert(args)
    if args.command == "demo":
        from sdzero_mcore.demo import main_demo

        return main_demo(args)
    if args.command == "parity-demo":
        from sdzero_mcore.parity_demo import run_parity_demo

        return 0 if run_parity_demo(args.out_dir, args.architecture, args.tp) else 1
    if args.command == "plan":
        from sdzero_mcore.planner import run_plan

        return run_plan(args)
    if args.command == "tiny-model":
        from sdzero_mcore.demo import MODEL_SHAPES
        from sdzero_mcore.models.tiny import save_tiny_hf_model

        print(f"sdzero tiny-model: {save_tiny_hf_model(args.out_dir, vocab_size=128, seed=args.seed, **MODEL_SHAPES[args.scale])}")
        return 0
    if args.command == "eval" and args.compare:
        from sdzero_mcore.eval.report import compare_runs

        try:
            print(compare_runs(args.compare))
        except (OSError, ValueError) as error:
            print(f"sdzero eval --compare: {error}", file=sys.stderr)
            return 2
        return 0
    if args.command in ("sft", "srt-collect", "srt-train", "distill", "run", "rft", "grpo", "eval"):
        return run_phase(args)
    raise AssertionError(args.command)


def run_phase(args) -> int:
    """Load and check the config (and the data, the paths and the vocabulary it names), run the
    phase; a bad config or data prints one line and exits 2 before any work."""
    import json

    from sdzero_mcore.config import ConfigError, config_from_args
    from sdzero_mcore.data import DataError
    from sdzero_mcore.preflight import check_before_work

    try:
        cfg = config_from_args(args)
        check_before_work(cfg, args.command, init_from=getattr(args, "init_from", None), out=getattr(args, "out", None))
        if args.command == "eval":
            from sdzero_mcore.eval.evaluate import parse_budget, run_eval

            if not args.config or not args.checkpoint or not args.out:
                raise ConfigError("sdzero eval needs CONFIG, --checkpoint and --out (or --compare RUN ...)")
            budget = parse_budget(args.budget) if args.budget else None
            report = run_eval(cfg, args.checkpoint, args.out, name=args.name, dataset=args.dataset,
                              reviser=args.reviser, budget=budget)
            result = f"avg@{report['k']} {report['avg_at_k']:.1f}, pass@{report['k']} {report['pass_at_k']:.1f} -> {args.out}/eval.json"
        elif args.command == "rft":
            from sdzero_mcore.phases.rft import run_rft

            result = run_rft(cfg, args.init_from, max_steps=args.max_steps)
        elif args.command == "grpo":
            from sdzero_mcore.phases.grpo import run_grpo

            result = run_grpo(cfg, args.init_from, max_steps=args.max_steps)
        elif args.command == "sft":
            from sdzero_mcore.phases.sft import run_sft

            result = run_sft(cfg, args.init_from, max_steps=args.max_steps)
        elif args.command == "srt-collect":
            from sdzero_mcore.phases.srt_collect import run_srt_collect

            result = run_srt_collect(cfg, args.init_from)
        elif args.command == "srt-train":
            from sdzero_mcore.phases.srt_train import run_srt_train

            result = run_srt_train(cfg, args.init_from, max_steps=args.max_steps)
        elif args.command == "distill":
            from sdzero_mcore.phases.distill import run_distill

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
