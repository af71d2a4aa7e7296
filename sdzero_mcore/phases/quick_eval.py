"""A minimal accuracy check of a checkpoint (greedy, one sample per question); the full evaluation
suite (avg@k, pass@k, generate-then-revise) is a separate module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from sdzero_mcore.checkpoint.source import resolve_model_source
from sdzero_mcore.config import SDZeroConfig
from sdzero_mcore.data.prompts import default_stop_ids
from sdzero_mcore.fileio import atomic_write_text
from sdzero_mcore.parallel.rank0 import run_on_rank0
from sdzero_mcore.rewards import reward_fn_for, reward_target
from sdzero_mcore.rollout import SamplingParams
from sdzero_mcore.rollout.weight_sync import serving_engine
from sdzero_mcore.run_setup import load_tokenizer, run_prompts


def greedy_accuracy(cfg: SDZeroConfig, checkpoint: str | Path, questions: Sequence, out_file: Path) -> dict:
    """Greedy accuracy of ``checkpoint`` on ``questions``, written to ``out_file`` (JSON) by rank 0."""
    source = resolve_model_source(checkpoint, "eval checkpoint")
    tokenizer = load_tokenizer(source)
    run = run_prompts(cfg, source, tokenizer)
    engine = serving_engine(cfg, source, tokenizer)

    def evaluate() -> dict:
        try:
            prompts = [run.prompt("eval", q.question) for q in questions]
            sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.max_new_tokens,
                                      stop_token_ids=tuple(sorted(default_stop_ids(tokenizer))))
            completions = engine.generate(prompts, sampling)
        finally:
            engine.shutdown()
        with reward_fn_for(cfg, questions) as reward_fn:
            results = reward_fn.score_batch([c.text for c in completions], [reward_target(q) for q in questions])
        result = {
            "checkpoint": str(checkpoint),
            "questions": len(questions),
            "accuracy": sum(r.reward for r in results) / max(1, len(results)),
            "mean_response_tokens": sum(len(c.token_ids) for c in completions) / max(1, len(completions)),
        }
        atomic_write_text(out_file, json.dumps(result, indent=2) + "\n")
        return result

    return run_on_rank0(evaluate, out_file.parent)
