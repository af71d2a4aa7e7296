"""``sdzero run``: Phase 1 collection -> SRT training -> Phase 2 -> a greedy accuracy check.

Each stage is skipped when its output already exists and is complete (a collection marker, a
``final`` checkpoint, an eval file), so rerunning the command after a crash resumes at the
unfinished stage; within a stage, ``checkpoint.resume`` continues from the last checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from sdzero_mcore.config import SDZeroConfig
from sdzero_mcore.phases import common


def run_pipeline(cfg: SDZeroConfig, init_from: Optional[str] = None, *, eval_questions: int = 32) -> dict:
    from sdzero_mcore.phases.quick_eval import greedy_accuracy
    from sdzero_mcore.phases.self_distill import run_distill
    from sdzero_mcore.phases.srt_collect import collection_complete, run_srt_collect
    from sdzero_mcore.phases.srt_train import run_srt_train, srt_stages
    from sdzero_mcore.trainer import final_checkpoint

    run_dir = Path(cfg.output_dir)
    base = common.start_source(cfg, init_from)
    common.check_layout(cfg, base)
    report: dict = {"base": str(base.path)}
    if not collection_complete(cfg):
        run_srt_collect(cfg, str(base.path))
    report["srt_collect"] = json.loads((run_dir / "srt_collect" / "summary.json").read_text())
    last_stage = srt_stages(cfg.srt_train.mode)[-1][0]
    srt = final_checkpoint(run_dir / "checkpoints" / last_stage)
    if srt is None:
        srt = run_srt_train(cfg, str(base.path))
    report["srt_checkpoint"] = str(srt)
    distilled = final_checkpoint(run_dir / "checkpoints" / "distill") or run_distill(cfg, str(srt))
    report["distill_checkpoint"] = str(distilled)
    _, phase2 = common.phase_questions(cfg)
    questions = phase2[:eval_questions]
    for name, checkpoint in (("base", base.path), ("srt", srt), ("sd_zero", distilled)):
        out = run_dir / "eval" / f"{name}.json"
        if out.is_file():
            report[f"eval_{name}"] = json.loads(out.read_text())
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            report[f"eval_{name}"] = greedy_accuracy(cfg, checkpoint, questions, out)
    return report
