"""``sdzero eval``: one checkpoint on one question set, written as ``eval.json`` (schema: ``report``).

1. k samples per question at ``eval.temperature`` -> avg@k, pass@k, mean response length and the
   self-revision keyword statistics (rank 0 and the rollout engine).
2. Generate-then-revise: the first sample of each question is revised once, conditioned on it and
   its binary reward (the P_r of docs/method.md) -> first and revised accuracy, correction rate, tokens.
3. Token-level localisation (the paper's Section 4.1): for up to ``eval.localization_responses`` first
   attempts, the per-token reverse KL between the checkpoint as generator pi(. | x, y_<t) and a
   reviser (default: the same checkpoint) pi_R(. | x, y, P_r, y_<t), on megatron models at the
   configured TP / CP, over the full vocabulary; sorted into 20 buckets per response, separately
   for r = 0 and r = 1 -> CSV, PNG and an HTML page colouring one response's tokens by KL.
   ``eval.lm_head``: ``dense`` takes both models' logits at every position of their sequences
   (gathered over TP and CP) and ``full_kl`` at the response positions; ``sparse`` (the default)
   runs both to the final norm and ``fused_linear_full_kl`` applies the output layers at the
   response positions only, over vocabulary chunks: the same KL (its sums in float64), no [T, V] logits.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from sdzero_kernels import full_kl, fused_linear_full_kl

from sdzero_mcore.checkpoint.source import resolve_model_source
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data import load_from_config
from sdzero_mcore.data.prompts import RunPrompts, default_stop_ids
from sdzero_mcore.data.question_sets import heldout_questions
from sdzero_mcore.eval.budget import read_budget
from sdzero_mcore.eval.metrics import avg_at_k, correction_rate, keyword_stats, localization_buckets, pass_at_k_dataset
from sdzero_mcore.eval.report import plot_localization, token_kl_html, write_localization_csv, write_run
from sdzero_mcore.models.forward import (
    causal_lm_logits,
    cp_local_batch,
    final_hidden_states,
    output_weight,
    real_vocab_size,
)
from sdzero_mcore.parallel.context_parallel import gather_from_cp
from sdzero_mcore.parallel.pipeline import broadcast_from_last_stage, last_stage_output
from sdzero_mcore.parallel.rank0 import barrier, is_rank0, run_on_rank0
from sdzero_mcore.rewards import reward_fn_for, reward_target
from sdzero_mcore.rollout import SamplingParams
from sdzero_mcore.rollout.weight_sync import serving_engine
from sdzero_mcore.run_setup import build_model, check_layout, load_tokenizer, run_prompts

SYNTHETIC_EVAL_QUESTIONS = 200


def eval_questions(cfg: SDZeroConfig, dataset: Optional[str] = None) -> list:
    """``dataset`` (read with the data section's field mapping) or, for synthetic tasks, held-out questions."""
    count = cfg.eval.questions
    if dataset is None or dataset.startswith("synthetic:"):
        # a synthetic task's training rows are a prefix of its generator: evaluate on held-out rows
        data = cfg.data if dataset is None else replace(cfg.data, dataset=dataset)
        return heldout_questions(replace(cfg, data=data), count or SYNTHETIC_EVAL_QUESTIONS)
    questions = load_from_config(replace(cfg.data, dataset=dataset)).questions
    return questions[:count] if count else questions


def _generate_and_score(cfg: SDZeroConfig, engine, run: RunPrompts, questions: Sequence) -> dict:
    """Rank 0: samples, revisions and their rewards (JSON-able, the localisation inputs included)."""
    ecfg = cfg.eval
    stop_ids = tuple(sorted(default_stop_ids(run.tokenizer)))
    sampling = SamplingParams(temperature=ecfg.temperature, max_new_tokens=ecfg.max_new_tokens, stop_token_ids=stop_ids,
                              n=ecfg.k, seed=ecfg.seed)
    prompts = [run.prompt("eval", q.question) for q in questions]
    targets = [reward_target(q) for q in questions]
    k = ecfg.k
    try:
        completions = engine.generate(prompts, sampling)
        with reward_fn_for(cfg, questions) as reward_fn:
            results = reward_fn.score_batch([c.text for c in completions], [t for t in targets for _ in range(k)])
            rewards = [[int(r.reward) for r in results[i * k : (i + 1) * k]] for i in range(len(questions))]
            first = [completions[i * k] for i in range(len(questions))]
            first_rewards = [row[0] for row in rewards]
            result = {
                "questions": len(questions), "k": k, "temperature": ecfg.temperature,
                "max_new_tokens": ecfg.max_new_tokens, "seed": ecfg.seed,
                "avg_at_k": avg_at_k(rewards), "pass_at_k": pass_at_k_dataset(rewards, k),
                "mean_response_tokens": sum(len(c.token_ids) for c in completions) / len(completions),
                "keywords": keyword_stats([c.text for c in completions]),
                "revise": None,
            }
            if ecfg.revise:
                contexts = [run.revision("eval", q.question, c.token_ids, r, x_ids=x)
                            for q, x, c, r in zip(questions, prompts, first, first_rewards)]
                revisions = engine.generate(contexts, replace(sampling, n=1, seed=ecfg.seed + 1))
                revised = reward_fn.score_batch([c.text for c in revisions], targets)
                first_pct = 100.0 * sum(first_rewards) / len(first_rewards)
                revised_pct = 100.0 * sum(r.reward for r in revised) / len(revised)
                rate = correction_rate(first_pct, revised_pct)
                result["revise"] = {
                    "first_accuracy": first_pct, "revised_accuracy": revised_pct,
                    "correction_rate": None if math.isnan(rate) else rate,
                    "first_tokens": sum(len(c.token_ids) for c in first) / len(first),
                    "revised_tokens": sum(len(c.token_ids) for c in revisions) / len(revisions),
                }
    finally:
        engine.shutdown()
    result["_first_attempts"] = [
        {"x_ids": x, "y_ids": c.token_ids, "reward": r} for x, c, r in zip(prompts, first, first_rewards)
    ]
    return result


def _hidden_at(model, ids: list[int], start: int, stop: int) -> Optional[torch.Tensor]:
    """The final-norm hidden states [stop - start, H] at positions [start, stop) of one sequence,
    gathered over CP (hidden states: H numbers per position, not V); at pipeline-parallel size > 1
    on the last stage, None on the others."""
    def rows(hidden, _):  # [s_local, 1, H]
        return gather_from_cp(hidden.transpose(0, 1).contiguous(), dim=1)[0, start:stop]

    return last_stage_output(model, cp_local_batch(torch.tensor([ids])), final_hidden_states, rows)


@torch.no_grad()
def token_reverse_kl(student, reviser, attempts: Sequence[dict], run: RunPrompts,
                     lm_head: str = "dense") -> list[list[float]]:
    """Per response token: KL(student(. | x, y_<t) || reviser(. | x, y, P_r, y_<t)), full vocabulary;
    the reviser reads the Phase 2 teacher's context around the eval prompt x. At pipeline-parallel
    size > 1 the logits (or hidden states) and the KL are computed on the last stage, and the KL
    lists (not the logits) are sent to the other stages. ``lm_head="sparse"`` applies the output
    layers at the response positions only (the module doc)."""
    per_token = []
    for attempt in attempts:
        x, y = attempt["x_ids"], attempt["y_ids"]
        context = run.teacher("", y, attempt["reward"], x_ids=x)
        if lm_head == "sparse":
            s_hidden = _hidden_at(student, x + y, len(x) - 1, len(x) + len(y) - 1)
            t_hidden = _hidden_at(reviser, context.ids, context.response_start - 1, context.response_end - 1)
            if s_hidden is None:  # not the last pipeline stage
                continue
            kl = fused_linear_full_kl(
                s_hidden, output_weight(student), t_hidden, output_weight(reviser), kl="reverse",
                tp_group=parallel_state.get_tensor_model_parallel_group(), vocab_size=real_vocab_size(student))
            per_token.append(kl.clamp_min(0.0).tolist())
            continue
        s_logits = causal_lm_logits(student, torch.tensor([x + y]))
        t_logits = causal_lm_logits(reviser, torch.tensor([context.ids]))
        if s_logits is None:  # not the last pipeline stage
            continue
        s_logits = s_logits[0, len(x) - 1 : len(x) + len(y) - 1]
        t_logits = t_logits[0, context.response_start - 1 : context.response_end - 1]
        per_token.append(full_kl(s_logits, t_logits, kl="reverse").clamp_min(0.0).tolist())
    return broadcast_from_last_stage(per_token)


def localization(cfg: SDZeroConfig, source, reviser_source, attempts: Sequence[dict], run: RunPrompts,
                 out_dir: Path) -> Optional[dict]:
    """KL buckets for r = 0 / r = 1 written as CSV, PNG, HTML (rank 0); every rank runs the models."""
    attempts = [a for a in attempts if a["y_ids"]][: cfg.eval.localization_responses]
    if not attempts:
        return None
    tokenizer = run.tokenizer
    student = build_model(cfg, source).eval()
    reviser = student if reviser_source is None else build_model(cfg, reviser_source).eval()
    kls = token_reverse_kl(student, reviser, attempts, run, lm_head=cfg.eval.lm_head)
    buckets = {r: localization_buckets([kl for kl, a in zip(kls, attempts) if a["reward"] == r])
               for r in (0, 1) if any(a["reward"] == r for a in attempts)}
    if is_rank0():
        write_localization_csv(out_dir / "localization.csv", buckets)
        plot_localization(out_dir / "localization.png", buckets)
        # the page shows the first incorrect response (the paper's case of interest), else the first
        shown = next((i for i, a in enumerate(attempts) if a["reward"] == 0), 0)
        tokens = [tokenizer.decode([t]) for t in attempts[shown]["y_ids"]]
        token_kl_html(out_dir / "localization.html", tokens, kls[shown],
                      f"per-token reverse KL, response {shown} (r = {attempts[shown]['reward']})")
    return {"responses": {f"r{r}": b["responses"] for r, b in buckets.items()},
            "mean_kl_top_bucket": {f"r{r}": b["mean_kl"][0] for r, b in buckets.items()},
            # Section 4.1's measure: the share of a response's KL held by its top 5% of tokens
            "kl_share_top_bucket": {f"r{r}": b["kl_share"][0] for r, b in buckets.items()},
            "files": ["localization.csv", "localization.png", "localization.html"]}


def run_eval(cfg: SDZeroConfig, checkpoint: str, out_dir: str | Path, *, name: Optional[str] = None,
             dataset: Optional[str] = None, reviser: Optional[str] = None, budget: Optional[dict] = None) -> dict:
    """Evaluate ``checkpoint``; writes ``out_dir/eval.json`` (and the localisation files) and returns the result."""
    out_dir = Path(out_dir)
    source = resolve_model_source(checkpoint, "eval checkpoint")
    reviser_source = resolve_model_source(reviser, "--reviser") if reviser else None
    check_layout(cfg, source)
    questions = eval_questions(cfg, dataset)
    if not questions:
        raise ConfigError("eval: no questions to evaluate")
    tokenizer = load_tokenizer(source)
    run = run_prompts(cfg, source, tokenizer)
    engine = serving_engine(cfg, source, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run_on_rank0(lambda: _generate_and_score(cfg, engine, run, questions), out_dir)
    attempts = result.pop("_first_attempts")
    result = {"name": name or out_dir.name, "checkpoint": str(source.path),
              "dataset": dataset or cfg.data.dataset, **result, "budget": budget}
    if cfg.eval.localization_responses > 0:
        result["localization"] = localization(cfg, source, reviser_source, attempts, run, out_dir)
    if is_rank0():
        write_run(out_dir / "eval.json", result)
    barrier()
    return result


def parse_budget(spec: str) -> dict:
    """``RUN_DIR:phase,phase`` -> the summed recorded budget of those phases in RUN_DIR."""
    run_dir, sep, phases = spec.rpartition(":")
    if not sep or not run_dir or not phases:
        raise ConfigError(f"--budget {spec!r}: expected RUN_DIR:phase[,phase...], e.g. runs/demo/sd_zero:srt_collect,distill")
    return read_budget(run_dir, [p for p in phases.split(",") if p])
