"""`sdzero demo` / `make demo`: the paper's comparisons at toy scale, on 2 CPU cores, no downloads.

0. Step 0, once per recipe and shared by its seeds (the paper post-trains one base model): a tiny
   Qwen3-shaped model trained from scratch on worked column sums (``synthetic:add``), 30% of them
   with one wrong step, in the recipe's prompt layouts, is the base; it solves the task in part.
1. Per recipe (``paper``, ``release``) and seed, from that base: SD-Zero (Phase 1 collection until
   ``srt_collect.target_kept`` distinct kept tuples, SRT, Phase 2), the Phase-2-only ablation,
   SDFT, and RFT and GRPO capped at SD-Zero's generation count (matched budget).
2. Every model evaluated on the same held-out questions (``sdzero eval``), with the seed's
   sampling; per recipe the table gives mean ± sd over seeds, the premise (what Phase 1 kept,
   correction rates, KL localisation, SRT/RFT validation losses) and the paper's claims read as
   yes / no / within noise (``eval.seeds``).

Every stage is skipped when its output is complete, so an interrupted demo resumes where it
stopped. Hyperparameters are in examples/demo_cpu.yaml with the reason for each, fixed before any
evaluation was run; nothing is tuned per method.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path
from typing import Optional, Sequence

from sdzero_mcore.eval.seeds import format_mean_sd, paired_verdict

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = {"cpu": "demo_cpu.yaml", "small": "demo_gpu_small.yaml"}
RECIPE_CHOICES = {"paper": ("paper",), "release": ("release",), "both": ("paper", "release")}
# the base model's shape per scale (random init, the char tokenizer's 105 tokens in a 128 vocab)
MODEL_SHAPES = {
    "cpu": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32),
    "small": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64),
}
# The release recipe's layouts with short instruction texts: the character-level toy pays per
# character and reads no English, so the release's 70-character instructions would only slow it
# down; where each text goes (system prompt, before or after the question, the attempt in the user
# turn for SRT stage 2) is the release's (sdzero_mcore/config.py RECIPES, docs/method.md).
DEMO_PROMPTS = {
    "paper": (),
    "release": (
        "prompts.collection.system='Solve step by step.'", 'prompts.collection.suffix="\\n\\nBox the answer."',
        "prompts.srt_generation.system='Box the answer.'", "prompts.srt_revision.system='Box the answer.'",
        'prompts.student.prefix="Box the answer.\\n\\n"', 'prompts.teacher.prefix="Box the answer.\\n\\n"',
        'prompts.eval.prefix="Box the answer.\\n\\n"',
    ),
}
# `--quick`: the same stages, small enough for CI (a smoke run of the whole comparison)
QUICK_OVERRIDES = (
    "sft.examples=3000", "sft.epochs=3", "data.phase1_questions=256", "data.phase2_questions=32",
    "srt_collect.target_kept=16", "srt_train.stage2_size=4", "srt_train.epochs=1",
    "distill.prompts_per_step=8", "distill.global_batch_size=8", "distill.micro_batch_size=8", "distill.epochs=1",
    "distill.validation.questions=8", "distill.validation.k=2",
    "rft.epochs=1", "eval.k=4", "eval.questions=16", "eval.localization_responses=8",
)
# (row name, the run directory under the arm's, the phases whose generations it used)
ROWS = (
    ("base", None, ()),
    ("SRT (Phase 1)", "sd_zero", ("srt_collect",)),
    ("SD-Zero", "sd_zero", ("srt_collect", "distill")),
    ("Phase 2 only", "phase2_only", ("distill",)),
    ("SDFT", "sdft", ("distill",)),
    ("RFT", "rft", ("rft",)),
    ("GRPO", "grpo", ("grpo",)),
)
# (column header, how to read it from an eval.json, digits)
COLUMNS = (
    ("avg@k", lambda run: run.get("avg_at_k"), 1),
    ("pass@k", lambda run: run.get("pass_at_k"), 1),
    ("first acc", lambda run: (run.get("revise") or {}).get("first_accuracy"), 1),
    ("revised acc", lambda run: (run.get("revise") or {}).get("revised_accuracy"), 1),
    ("correction rate", lambda run: (run.get("revise") or {}).get("correction_rate"), 1),
    ("mean length (tokens)", lambda run: run.get("mean_response_tokens"), 1),
    ("generations", lambda run: (run.get("budget") or {}).get("generations"), 0),
)


def demo_config(out_dir: Path, scale: str, quick: bool, seed: int, overrides: Sequence[str] = (), *extra: str):
    from sdzero_mcore.config import load_config

    return load_config(EXAMPLES / CONFIGS[scale], [f"output_dir={out_dir}", f"seed={seed}", f"rollout.seed={seed}",
                                                   f"eval.seed={seed}", *(QUICK_OVERRIDES if quick else ()),
                                                   *overrides, *extra])


def _stage_runner(timings: dict):
    from sdzero_mcore.phases.pipeline import run_stage

    def stage(name: str, fn):
        start = time.perf_counter()
        result = run_stage(fn)  # the demo's phases share this process: each is released after it
        timings[name] = round(time.perf_counter() - start, 1)
        print(f"sdzero demo: {name} done in {timings[name]:.0f} s", flush=True)
        return result

    return stage


def recipe_overrides(recipe: str) -> tuple[str, ...]:
    return (f"recipe={recipe}", *DEMO_PROMPTS[recipe])


def train_base(root: Path, recipe: str, scale: str, quick: bool, base_seed: int, overrides: Sequence[str], stage) -> Path:
    """Step 0 of ``recipe``, shared by its seeds: the base model from scratch (skipped when it exists)."""
    # imported here, not at the top: the CLI imports this module to build `sdzero --help`
    from sdzero_mcore.checkpoint.source import final_checkpoint
    from sdzero_mcore.models.tiny import save_tiny_hf_model
    from sdzero_mcore.phases.sft import run_sft

    random_init = root / "random_init"
    if not (random_init / "config.json").is_file():
        save_tiny_hf_model(random_init, vocab_size=128, seed=base_seed, **MODEL_SHAPES[scale])
    cfg = demo_config(root / recipe / "base", scale, quick, base_seed, (*recipe_overrides(recipe), *overrides))
    return (final_checkpoint(root / recipe / "base" / "checkpoints" / "sft")
            or stage(f"{recipe} base", lambda: run_sft(cfg, str(random_init))))


def run_arm(root: Path, base: Path, recipe: str, seed: int, *, scale: str, quick: bool, overrides: Sequence[str],
            stage) -> dict:
    """One recipe and seed from ``base``: every row trained and evaluated; returns {row name: eval result}."""
    from sdzero_mcore.checkpoint.source import final_checkpoint
    from sdzero_mcore.eval.budget import read_budget
    from sdzero_mcore.eval.evaluate import run_eval
    from sdzero_mcore.eval.report import load_run
    from sdzero_mcore.phases.distill import run_distill
    from sdzero_mcore.phases.grpo import run_grpo
    from sdzero_mcore.phases.pipeline import train_sd_zero
    from sdzero_mcore.phases.rft import run_rft

    def config(run: str, *extra: str):
        return demo_config(root / run, scale, quick, seed, (*recipe_overrides(recipe), *overrides), *extra)

    label = f"{recipe}/seed{seed}"

    def trained(run: str, phase: str, train) -> Path:
        return final_checkpoint(root / run / "checkpoints" / phase) or stage(f"{label} {run}", train)

    sd_zero = stage(f"{label} sd_zero", lambda: train_sd_zero(config("sd_zero"), base))  # complete stages are skipped
    checkpoints = {"base": base, "SRT (Phase 1)": sd_zero["srt_checkpoint"], "SD-Zero": sd_zero["distill_checkpoint"]}
    budget = read_budget(root / "sd_zero", ("srt_collect", "distill"))["generations"]
    checkpoints["Phase 2 only"] = trained("phase2_only", "distill", lambda: run_distill(config("phase2_only"), str(base)))
    checkpoints["SDFT"] = trained(
        "sdft", "distill", lambda: run_distill(config("sdft", "distill.teacher_context=gold_solution"), str(base)))
    checkpoints["RFT"] = trained("rft", "rft", lambda: run_rft(config("rft", f"rft.max_generations={budget}"), str(base)))
    checkpoints["GRPO"] = trained("grpo", "grpo", lambda: run_grpo(config("grpo", f"grpo.max_generations={budget}"), str(base)))
    runs = {}
    for name, run, phases in ROWS:
        out = root / "eval" / run_slug(name)
        if not (out / "eval.json").is_file():
            spend = read_budget(root / run, phases) if run else {"generations": 0, "generated_tokens": 0}
            stage(f"{label} eval {name}", lambda: run_eval(config("eval"), str(checkpoints[name]), out, name=name,
                                                             budget=spend))
        runs[name] = load_run(out)
    return runs


def validation_losses(run_dir: Path) -> dict:
    """{stage: [val_loss before training, then at each epoch end]} from a run's metrics JSONL files."""
    out = {}
    for stage in ("srt", "srt_generation", "srt_revision", "rft"):
        path = run_dir / "metrics" / f"{stage}.jsonl"
        if not path.is_file():
            continue
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        values = [rows[0]["val_loss_before"]] if rows and "val_loss_before" in rows[0] else []
        values += [row["val_loss"] for row in rows if "val_loss" in row]
        if values:
            out[stage] = values
    return out


def arm_premise(root: Path, runs: dict) -> dict:
    """What the claims rest on, for one recipe and seed: Phase 1's kept data, correction rates, localisation."""
    summary = json.loads((root / "sd_zero" / "srt_collect" / "summary.json").read_text())
    localization = (runs["SRT (Phase 1)"].get("localization") or {}).get("kl_share_top_bucket") or {}
    return {
        "questions_scanned": summary["questions"],
        "kept": summary["kept"], "distinct_kept": summary.get("distinct_kept"),
        "kept_corrections": summary.get("kept_corrections"), "kept_rephrasings": summary.get("kept_rephrasings"),
        "cleaning_removed": ((summary.get("cleaning") or {}).get("removed") or {}),
        "initial_accuracy": summary["initial_accuracy"],
        "correction_rate_base": (runs["base"].get("revise") or {}).get("correction_rate"),
        "correction_rate_srt": (runs["SRT (Phase 1)"].get("revise") or {}).get("correction_rate"),
        "kl_top5_share_r0": localization.get("r0"), "kl_top5_share_r1": localization.get("r1"),
        "validation_losses": {**{f"sd_zero/{k}": v for k, v in validation_losses(root / "sd_zero").items()},
                              **{f"rft/{k}": v for k, v in validation_losses(root / "rft").items()}},
    }


def _column(arms: Sequence[dict], row: str, read) -> list:
    return [read(arm[row]) for arm in arms]


# (claim, how to read it: (row or premise key of the larger side, of the smaller side, source))
CLAIMS = (
    ("Phase 1 beats RFT (avg@k)", ("SRT (Phase 1)", "RFT", "avg_at_k")),
    ("SD-Zero beats GRPO at matched budget (avg@k)", ("SD-Zero", "GRPO", "avg_at_k")),
    ("SD-Zero beats SRT (avg@k)", ("SD-Zero", "SRT (Phase 1)", "avg_at_k")),
    ("Phase 2 shortens responses (SRT length > SD-Zero length)", ("SRT (Phase 1)", "SD-Zero", "mean_response_tokens")),
    ("SRT raises the correction rate (SRT > base)", ("correction_rate_srt", "correction_rate_base", "premise")),
    ("KL concentrates on r = 0 responses (top-5% share r=0 > r=1, SRT model)",
     ("kl_top5_share_r0", "kl_top5_share_r1", "premise")),
)


def read_claims(arms: Sequence[dict], premises: Sequence[dict]) -> list[tuple[str, str]]:
    out = []
    for claim, (larger, smaller, key) in CLAIMS:
        if key == "premise":
            a, b = [p[larger] for p in premises], [p[smaller] for p in premises]
        else:
            a, b = [arm[larger].get(key) for arm in arms], [arm[smaller].get(key) for arm in arms]
        scale = 100.0 if key == "premise" and larger.startswith("kl_") else 1.0
        a = [None if v is None else v * scale for v in a]
        b = [None if v is None else v * scale for v in b]
        out.append((claim, paired_verdict(a, b).describe()))
    return out


def recipe_report(recipe: str, seeds: Sequence[int], arms: Sequence[dict], premises: Sequence[dict]) -> str:
    k = {arm["base"]["k"] for arm in arms}
    k_label = str(next(iter(k))) if len(k) == 1 else "k"
    header = [c[0].replace("@k", f"@{k_label}") for c in COLUMNS]
    lines = [f"## recipe: {recipe} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''}: {', '.join(map(str, seeds))}; "
             "mean ± sd over seeds)", "", "| run | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, _, _ in ROWS:
        cells = [format_mean_sd(_column(arms, name, read), digits) for _, read, digits in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def cell(key: str, digits: int = 1, scale: float = 1.0, unit: str = "") -> str:
        text = format_mean_sd([None if p[key] is None else p[key] * scale for p in premises], digits)
        return text if text == "-" else text + unit

    removed = [sum(p["cleaning_removed"].values()) for p in premises]
    lines += ["", "Premise (mean ± sd over seeds):", "",
              f"- Phase 1: questions scanned {cell('questions_scanned', 0)}, initial accuracy "
              f"{cell('initial_accuracy', 1, 100.0, '%')}, kept tuples {cell('kept', 0)} (distinct {cell('distinct_kept', 0)}; "
              f"corrections {cell('kept_corrections', 0)}, rephrasings {cell('kept_rephrasings', 0)}), removed by "
              f"cleaning {format_mean_sd(removed, 0)}",
              f"- correction rate after a wrong first attempt: base {cell('correction_rate_base', unit='%')}, "
              f"SRT {cell('correction_rate_srt', unit='%')}",
              f"- share of a response's token KL in its top 5% of tokens (SRT as generator and reviser): r = 0 "
              f"{cell('kl_top5_share_r0', 1, 100.0, '%')}, r = 1 {cell('kl_top5_share_r1', 1, 100.0, '%')}"]
    for stage in sorted({s for p in premises for s in p["validation_losses"]}):
        per_seed = [p["validation_losses"].get(stage) for p in premises]
        shown = "; ".join("→".join(f"{v:.3f}" for v in values) for values in per_seed if values)
        rose = sum(1 for values in per_seed if values and len(values) > 1 and values[-1] > values[-2])
        lines.append(f"- held-out validation loss, {stage} (before training → each epoch end, per seed): {shown}; "
                     f"rose in the last epoch in {rose} of {sum(1 for v in per_seed if v)} seeds")
    lines += ["", "Claims (paired over seeds; yes / no when the 95% t-interval of the mean difference excludes 0):", ""]
    lines += [f"- {claim}: {verdict}" for claim, verdict in read_claims(arms, premises)]
    return "\n".join(lines) + "\n"


def run_demo(out_dir: str | Path = "runs/demo", *, scale: str = "cpu", quick: bool = False,
             seeds: Sequence[int] = (1234,), recipes: Sequence[str] = ("release",),
             overrides: Sequence[str] = ()) -> dict:
    """Run (or finish) the demo; returns {"report": markdown, "arms": {(recipe, seed): rows}, "timings": {...}}."""
    from sdzero_mcore.fileio import atomic_write_text

    root = Path(out_dir)
    timings: dict[str, float] = {}
    stage = _stage_runner(timings)
    arms, premises, sections = {}, {}, []
    for recipe in recipes:
        base = train_base(root, recipe, scale, quick, seeds[0], overrides, stage)
        for seed in seeds:
            arm_root = root / recipe / f"seed{seed}"
            arms[(recipe, seed)] = run_arm(arm_root, base, recipe, seed, scale=scale, quick=quick, overrides=overrides,
                                           stage=stage)
            premises[(recipe, seed)] = arm_premise(arm_root, arms[(recipe, seed)])
        sections.append(recipe_report(recipe, seeds, [arms[(recipe, s)] for s in seeds],
                                      [premises[(recipe, s)] for s in seeds]))
    command = ("sdzero demo" + (" --quick" if quick else "") + (f" --scale {scale}" if scale != "cpu" else "")
               + f" --recipe {'both' if len(recipes) > 1 else recipes[0]} --seed {seeds[0]}"
               + (f" --seeds {len(seeds)}" if len(seeds) > 1 else ""))
    report = (f"# {command}\n\nSynthetic task (synthetic:add), held-out questions; RFT and GRPO capped at each arm's "
              f"SD-Zero generation count.\n\n" + "\n".join(sections))
    atomic_write_text(root / "results.md", report)
    atomic_write_text(root / "results.json", json.dumps(
        {"command": command, "arms": [{"recipe": r, "seed": s, "premise": premises[(r, s)],
                                       "runs": {name: arms[(r, s)][name] for name, _, _ in ROWS}}
                                      for r, s in arms]}, indent=2, default=str) + "\n")
    atomic_write_text(root / "timings.json", json.dumps(timings, indent=2) + "\n")
    return {"report": report, "arms": arms, "premises": premises, "timings": timings}


def run_slug(name: str) -> str:
    """A row name as a directory name: "SRT (Phase 1)" -> "srt_phase_1"."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def table_is_complete(arms: dict) -> Optional[str]:
    """None when every row of every arm has finite numbers in every column the table prints, else the problem."""
    for (recipe, seed), runs in arms.items():
        for name, run in runs.items():
            for column, read, _ in COLUMNS:
                value = read(run)
                if column == "correction rate" and value is None and "correction_rate" in (run.get("revise") or {}):
                    continue  # a perfect first attempt: the rate is undefined, not missing
                if not isinstance(value, (int, float)) or not math.isfinite(value):
                    return f"{recipe}/seed{seed} {name}: {column} is {value!r}"
    return None


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default=None, help="where the demo writes (default: runs/demo, runs/demo-quick)")
    parser.add_argument("--quick", action="store_true", help="a small smoke run of every stage (CI, a few minutes)")
    parser.add_argument("--scale", choices=sorted(CONFIGS), default="cpu", help="cpu: 2 cores; small: one GPU")
    parser.add_argument("--recipe", choices=sorted(RECIPE_CHOICES), default="release",
                        help="the recipe(s) each arm follows (docs/method.md); both = paper and release")
    parser.add_argument("--seed", type=int, default=1234, help="the base model's seed and the first arm seed")
    parser.add_argument("--seeds", type=int, default=1, help="arms per recipe, with seeds --seed, --seed + 1, ...")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every stage")


def main_demo(args) -> int:
    from sdzero_mcore.config import ConfigError
    from sdzero_mcore.data import DataError

    out_dir = args.out_dir or ("runs/demo-quick" if args.quick else "runs/demo" if args.scale == "cpu" else "runs/demo-small")
    if args.seeds < 1:
        print(f"sdzero demo: --seeds must be >= 1, got {args.seeds}")
        return 2
    start = time.perf_counter()
    try:
        result = run_demo(out_dir, scale=args.scale, quick=args.quick, seeds=[args.seed + i for i in range(args.seeds)],
                          recipes=RECIPE_CHOICES[args.recipe], overrides=args.overrides)
    except (ConfigError, DataError) as error:
        print(f"sdzero demo: {error}")
        return 2
    print(result["report"])
    problem = table_is_complete(result["arms"])
    print(f"sdzero demo: {sum(len(runs) for runs in result['arms'].values())} models evaluated; results in "
          f"{out_dir}/results.md, plots in {out_dir}/<recipe>/seed*/eval/*/localization.png; "
          f"{time.perf_counter() - start:.0f} s")
    if problem:
        print(f"sdzero demo: incomplete table: {problem}")
        return 1
    return 0
