"""`sdzero demo` / `make demo`: the paper's comparisons at toy scale, on 2 CPU cores, no downloads.

0. Step 0: a tiny Qwen3-shaped model trained from scratch on noisy worked solutions of the
   synthetic task (``sdzero sft``) is the base; it solves the task in part.
1. SD-Zero from the base: Phase 1 collection and SRT, then Phase 2 (``sd_zero/``).
2. Baselines from the same base: the Phase-2-only ablation, SDFT (teacher reads the gold
   solution), and RFT and GRPO capped at SD-Zero's generation count (matched budget).
3. Every model evaluated on the same held-out questions (``sdzero eval``), joined in one table
   with the paper's columns, written to ``results.md`` with the command and seed.

Every stage is skipped when its output is complete, so an interrupted demo resumes where it
stopped. Numbers are whatever the run measures; nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Optional, Sequence

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = {"cpu": "demo_cpu.yaml", "small": "demo_gpu_small.yaml"}
# the base model's shape per scale (random init, the char tokenizer's 105 tokens in a 128 vocab)
MODEL_SHAPES = {
    "cpu": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
}
# `--quick`: the same stages, small enough for CI (a smoke run of the whole comparison)
QUICK_OVERRIDES = (
    "sft.examples=2000", "sft.epochs=5", "data.phase1_questions=32", "data.phase2_questions=32",
    "srt_train.epochs=1", "distill.prompts_per_step=8", "distill.global_batch_size=8", "distill.micro_batch_size=8",
    "distill.epochs=1", "rft.epochs=1", "eval.k=4", "eval.questions=32", "eval.localization_responses=16",
)
# (row name, the run directory under the demo's, the phases whose generations it used)
ROWS = (
    ("base", None, ()),
    ("SRT (Phase 1)", "sd_zero", ("srt_collect",)),
    ("SD-Zero", "sd_zero", ("srt_collect", "distill")),
    ("Phase 2 only", "phase2_only", ("distill",)),
    ("SDFT", "sdft", ("distill",)),
    ("RFT", "rft", ("rft",)),
    ("GRPO", "grpo", ("grpo",)),
)


def demo_config(out_dir: Path, scale: str, quick: bool, seed: int, overrides: Sequence[str] = (), *extra: str):
    from sdzero_mcore.config import load_config

    return load_config(EXAMPLES / CONFIGS[scale],
                       [f"output_dir={out_dir}", f"seed={seed}", *(QUICK_OVERRIDES if quick else ()), *overrides, *extra])


def run_demo(out_dir: str | Path = "runs/demo", *, scale: str = "cpu", quick: bool = False, seed: int = 1234,
             overrides: Sequence[str] = ()) -> dict:
    """Run (or finish) the demo; returns {"table": markdown, "runs": [eval results], "timings": {...}}."""
    # imported here, not at the top: the CLI imports this module to build `sdzero --help`
    from sdzero_mcore.checkpoint.source import final_checkpoint
    from sdzero_mcore.eval.budget import read_budget
    from sdzero_mcore.eval.evaluate import run_eval
    from sdzero_mcore.eval.report import compare_table, load_run
    from sdzero_mcore.fileio import atomic_write_text
    from sdzero_mcore.models.tiny import save_tiny_hf_model
    from sdzero_mcore.phases.distill import run_distill
    from sdzero_mcore.phases.grpo import run_grpo
    from sdzero_mcore.phases.pipeline import train_sd_zero
    from sdzero_mcore.phases.rft import run_rft
    from sdzero_mcore.phases.sft import run_sft

    root = Path(out_dir)
    timings: dict[str, float] = {}

    def config(run: str, *extra: str):
        return demo_config(root / run, scale, quick, seed, overrides, *extra)

    def stage(name: str, fn):
        start = time.perf_counter()
        result = fn()
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"sdzero demo: {name} done in {timings[name]:.0f} s", flush=True)
        return result

    def trained(run: str, phase: str, train) -> Path:
        return final_checkpoint(root / run / "checkpoints" / phase) or stage(run, train)

    random_init = root / "random_init"
    if not (random_init / "config.json").is_file():
        save_tiny_hf_model(random_init, vocab_size=128, seed=seed, **MODEL_SHAPES[scale])
    base = trained("base", "sft", lambda: run_sft(config("base"), str(random_init)))
    sd_zero = stage("sd_zero", lambda: train_sd_zero(config("sd_zero"), base))  # complete stages are skipped
    checkpoints = {"base": base, "SRT (Phase 1)": sd_zero["srt_checkpoint"], "SD-Zero": sd_zero["distill_checkpoint"]}
    budget = read_budget(root / "sd_zero", ("srt_collect", "distill"))["generations"]
    checkpoints["Phase 2 only"] = trained("phase2_only", "distill", lambda: run_distill(config("phase2_only"), str(base)))
    checkpoints["SDFT"] = trained(
        "sdft", "distill", lambda: run_distill(config("sdft", "distill.teacher_context=gold_solution"), str(base)))
    checkpoints["RFT"] = trained("rft", "rft", lambda: run_rft(config("rft", f"rft.max_generations={budget}"), str(base)))
    checkpoints["GRPO"] = trained("grpo", "grpo", lambda: run_grpo(config("grpo", f"grpo.max_generations={budget}"), str(base)))

    runs = []
    for name, run, phases in ROWS:
        out = root / "eval" / run_slug(name)
        if not (out / "eval.json").is_file():
            spend = read_budget(root / run, phases) if run else {"generations": 0, "generated_tokens": 0}
            stage(f"eval {name}", lambda: run_eval(config("eval"), str(checkpoints[name]), out, name=name, budget=spend))
        runs.append(load_run(out))
    table = compare_table(runs)
    command = "sdzero demo" + (" --quick" if quick else "") + (f" --scale {scale}" if scale != "cpu" else "") + f" --seed {seed}"
    atomic_write_text(root / "results.md", f"# {command}\n\nSynthetic task, held-out questions, SD-Zero budget "
                      f"{budget} generations (RFT and GRPO capped at it).\n\n{table}\n")
    atomic_write_text(root / "timings.json", json.dumps(timings, indent=2) + "\n")
    return {"table": table, "runs": runs, "timings": timings, "budget": budget}


def run_slug(name: str) -> str:
    """A row name as a directory name: "SRT (Phase 1)" -> "srt_phase_1"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def table_is_complete(runs: Sequence[dict]) -> Optional[str]:
    """None when every row has finite numbers in every column the table prints, else the problem."""
    for run in runs:
        values = {"avg_at_k": run.get("avg_at_k"), "pass_at_k": run.get("pass_at_k"),
                  "mean_response_tokens": run.get("mean_response_tokens"),
                  "first_accuracy": (run.get("revise") or {}).get("first_accuracy"),
                  "revised_accuracy": (run.get("revise") or {}).get("revised_accuracy"),
                  "generations": (run.get("budget") or {}).get("generations")}
        for key, value in values.items():
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                return f"{run.get('name')}: {key} is {value!r}"
    return None


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default=None, help="where the demo writes (default: runs/demo, runs/demo-quick)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run of every stage (CI, about 3 minutes)")
    parser.add_argument("--scale", choices=sorted(CONFIGS), default="cpu", help="cpu: 2 cores; small: one GPU")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every stage")


def main_demo(args) -> int:
    from sdzero_mcore.config import ConfigError
    from sdzero_mcore.data import DataError

    out_dir = args.out_dir or ("runs/demo-quick" if args.quick else "runs/demo" if args.scale == "cpu" else "runs/demo-small")
    start = time.perf_counter()
    try:
        result = run_demo(out_dir, scale=args.scale, quick=args.quick, seed=args.seed, overrides=args.overrides)
    except (ConfigError, DataError) as error:
        print(f"sdzero demo: {error}")
        return 2
    print(result["table"])
    problem = table_is_complete(result["runs"])
    print(f"sdzero demo: {len(result['runs'])} models evaluated; results in {out_dir}/results.md, plots in "
          f"{out_dir}/eval/*/localization.png; {time.perf_counter() - start:.0f} s")
    if problem:
        print(f"sdzero demo: incomplete table: {problem}")
        return 1
    return 0
