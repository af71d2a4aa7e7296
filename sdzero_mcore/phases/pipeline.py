"""``sdzero run``: Phase 1 collection -> SRT training -> Phase 2 -> a greedy accuracy check.

Each stage is skipped when its output already exists and is complete (a collection marker, a
``final`` checkpoint, an eval file), so rerunning the command after a crash resumes at the
unfinished stage; within a stage, ``checkpoint.resume`` continues from the last checkpoint. All
stages run in this one process: each one's models, optimizer and process groups are released
before the next begins (``run_setup.release_phase``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, TypeVar

from sdzero_mcore.checkpoint.source import final_checkpoint, start_source
from sdzero_mcore.config import SDZeroConfig
from sdzero_mcore.data.question_sets import phase_questions
from sdzero_mcore.phases.distill import run_distill
from sdzero_mcore.phases.quick_eval import greedy_accuracy
from sdzero_mcore.phases.srt_collect import SUMMARY_FILE, collect_dir, collection_complete, run_srt_collect
from sdzero_mcore.phases.srt_train import final_stage, run_srt_train
from sdzero_mcore.run_setup import check_layout, release_phase

T = TypeVar("T")


def run_stage(fn: Callable[..., T], *args) -> T:
    """``fn(*args)``, a whole phase, then its release (also when it fails: a caller may go on)."""
    try:
        return fn(*args)
    finally:
        release_phase()


def train_sd_zero(cfg: SDZeroConfig, base: Path) -> dict:
    """Phase 1 (collect, SRT) and Phase 2 from ``base``, each stage skipped when complete.
    Returns the collection summary and the SRT and SD-Zero checkpoints."""
    run_dir = Path(cfg.output_dir)
    if not collection_complete(cfg):
        run_stage(run_srt_collect, cfg, str(base))
    summary = json.loads((collect_dir(cfg) / SUMMARY_FILE).read_text())
    last_stage = final_stage(cfg.srt_train.mode)
    srt = final_checkpoint(run_dir / "checkpoints" / last_stage) or run_stage(run_srt_train, cfg, str(base))
    sd_zero = final_checkpoint(run_dir / "checkpoints" / "distill") or run_stage(run_distill, cfg, str(srt))
    return {"srt_collect": summary, "srt_checkpoint": str(srt), "distill_checkpoint": str(sd_zero)}


def run_pipeline(cfg: SDZeroConfig, init_from: Optional[str] = None, *, eval_questions: int = 32) -> dict:
    run_dir = Path(cfg.output_dir)
    base = start_source(cfg, init_from)
    check_layout(cfg, base)
    report: dict = {"base": str(base.path), **train_sd_zero(cfg, base.path)}
    _, phase2 = phase_questions(cfg)
    questions = phase2[:eval_questions]
    checkpoints = (("base", base.path), ("srt", report["srt_checkpoint"]), ("sd_zero", report["distill_checkpoint"]))
    for name, checkpoint in checkpoints:
        out = run_dir / "eval" / f"{name}.json"
        if out.is_file():
            report[f"eval_{name}"] = json.loads(out.read_text())
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            report[f"eval_{name}"] = run_stage(greedy_accuracy, cfg, checkpoint, questions, out)
    return report
