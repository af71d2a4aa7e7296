"""``sdzero rft``: the rejection-sampling fine-tuning baseline (docs/method.md "Baselines").

k samples per question from the starting model (both phases' questions, capped by
``rft.max_generations`` for a matched budget), scored, then completion-only SFT on the correct
ones (identical correct samples of a question kept once). Sampling is written chunk by chunk to
an append-only log, so a killed run resumes at the first unfinished chunk; chunks are fixed
slices with their own seeds, so a resumed run samples exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple, Optional

from tqdm import tqdm

from sdzero_mcore.checkpoint.source import start_source
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.prompts import CompletionExample, RunPrompts, default_stop_ids
from sdzero_mcore.data.question_sets import phase_questions
from sdzero_mcore.eval.budget import record_budget
from sdzero_mcore.fileio import atomic_write_text
from sdzero_mcore.parallel.rank0 import run_on_rank0
from sdzero_mcore.phases.append_log import check_log_hash
from sdzero_mcore.phases.completion import train_completion_stage
from sdzero_mcore.rewards import reward_fn_for, reward_target
from sdzero_mcore.rollout import sampling_from_config
from sdzero_mcore.rollout.weight_sync import serving_engine
from sdzero_mcore.run_setup import check_layout, load_tokenizer, pad_id, run_prompts, setup_parallel

PHASE = "rft"
SAMPLES_FILE = "samples.jsonl"
CHUNK_QUESTIONS = 32


class RFTExample(NamedTuple):
    completion: "object"  # data.prompts.CompletionExample: loss on the sampled response (with its EOS)


def rft_questions(cfg: SDZeroConfig, tokenizer=None) -> list:
    phase1, phase2 = phase_questions(cfg, tokenizer)
    questions = phase1 + phase2
    if cfg.rft.max_generations is not None:
        questions = questions[: cfg.rft.max_generations // cfg.rft.samples_per_question]
        if not questions:
            raise ConfigError(f"rft.max_generations ({cfg.rft.max_generations}) is less than one question's "
                              f"rft.samples_per_question ({cfg.rft.samples_per_question})")
    return questions


def sample_dir(cfg: SDZeroConfig) -> Path:
    return Path(cfg.output_dir) / PHASE


def sampling_hash(cfg: SDZeroConfig, source_path: Path) -> str:
    """What the samples depend on: the data, the sampling settings, the rollout engine and the model."""
    r = cfg.rft
    relevant = {"data": cfg.data.__dict__, "rollout": cfg.rollout.__dict__, "model": str(source_path),
                "prompt": cfg.prompts.student.__dict__,
                "rft": [r.samples_per_question, r.temperature, r.max_new_tokens, r.max_generations]}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_log(log: Path, chash: str) -> None:
    """Refuse to extend or train on samples drawn under another config or from another model."""
    check_log_hash(log, chash, "was sampled under another config or model")


def read_chunks(path: Path) -> dict[int, dict]:
    """The complete chunk records of the log; a line cut by a crash is dropped (and truncated away)."""
    chunks, keep = {}, 0
    if not path.is_file():
        return chunks
    with path.open("rb") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if not line.endswith(b"\n"):
                break
            chunks[record["chunk"]] = record
            keep += len(line)
    if keep != path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return chunks


def _sample_on_rank0(cfg: SDZeroConfig, run: RunPrompts, questions, engine, log: Path, chash: str) -> dict:
    rcfg = cfg.rft
    log.parent.mkdir(parents=True, exist_ok=True)
    done = read_chunks(log)
    stop_ids = sorted(default_stop_ids(run.tokenizer))
    sampling = replace(sampling_from_config(cfg.rollout, stop_token_ids=stop_ids), temperature=rcfg.temperature,
                       max_new_tokens=rcfg.max_new_tokens, n=rcfg.samples_per_question)
    starts = range(0, len(questions), CHUNK_QUESTIONS)
    try:
        with reward_fn_for(cfg, questions) as reward_fn:
            for chunk, start in enumerate(tqdm(starts, desc="rft-sample", disable=not cfg.logging.progress)):
                if chunk in done:
                    continue
                batch = questions[start : start + CHUNK_QUESTIONS]
                prompts = [run.prompt("student", q.question) for q in batch]
                completions = engine.generate(prompts, replace(sampling, seed=cfg.rollout.seed + chunk))
                k = rcfg.samples_per_question
                targets = [reward_target(q) for q in batch for _ in range(k)]
                results = reward_fn.score_batch([c.text for c in completions], targets)
                record = {"chunk": chunk, "config_hash": chash, "questions": [
                    {"id": q.id, "x_ids": x, "samples": [
                        {"ids": c.token_ids, "reward": int(r.reward)}
                        for c, r in zip(completions[i * k : (i + 1) * k], results[i * k : (i + 1) * k])
                    ]} for i, (q, x) in enumerate(zip(batch, prompts))
                ]}
                with log.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
    finally:
        engine.shutdown()
    samples = [s for record in read_chunks(log).values() for q in record["questions"] for s in q["samples"]]
    if len(samples) != len(questions) * rcfg.samples_per_question:
        raise ConfigError(f"{log}: {len(samples)} samples for {len(questions)} questions x {rcfg.samples_per_question}")
    summary = {
        "questions": len(questions),
        "generations": len(samples),
        "generated_tokens": sum(len(s["ids"]) for s in samples),
        "accuracy": sum(s["reward"] for s in samples) / max(1, len(samples)),
    }
    record_budget(cfg.output_dir, PHASE, summary["generations"], summary["generated_tokens"])
    return summary


def correct_examples(log: Path, max_len: int) -> list[RFTExample]:
    """x + y for every distinct correct sample of every question (completion-only loss on y)."""
    examples = []
    for record in sorted(read_chunks(log).values(), key=lambda r: r["chunk"]):
        for question in record["questions"]:
            seen = set()
            for sample in question["samples"]:
                y = tuple(sample["ids"])
                if sample["reward"] != 1 or y in seen or not y:
                    continue
                seen.add(y)
                ids = question["x_ids"] + list(y)
                if len(ids) <= max_len:
                    examples.append(RFTExample(CompletionExample(ids, loss_start=len(question["x_ids"]), loss_end=len(ids))))
    return examples


def run_rft(cfg: SDZeroConfig, init_from: Optional[str] = None, *, max_steps: Optional[int] = None) -> Path:
    """Sample (or finish sampling), then fine-tune on the correct samples; returns the final checkpoint."""
    source = start_source(cfg, init_from)
    check_layout(cfg, source)
    tokenizer = load_tokenizer(source)
    questions = rft_questions(cfg, tokenizer)
    log = sample_dir(cfg) / SAMPLES_FILE
    summary_file = sample_dir(cfg) / "summary.json"
    chash = sampling_hash(cfg, source.path)
    check_log(log, chash)  # before any work, on every rank
    if not summary_file.is_file():
        run = run_prompts(cfg, source, tokenizer)
        engine = serving_engine(cfg, source, tokenizer)

        def sample() -> dict:
            summary = _sample_on_rank0(cfg, run, questions, engine, log, chash)
            atomic_write_text(summary_file, json.dumps(summary, indent=2) + "\n")
            return summary

        run_on_rank0(sample, sample_dir(cfg))
    examples = correct_examples(log, cfg.rft.max_seq_length)
    if not examples:
        summary = json.loads(summary_file.read_text())
        raise ConfigError(f"rft: no correct sample among {summary['generations']} generations; nothing to fine-tune on")
    setup_parallel(cfg)
    return train_completion_stage(cfg, source, examples, ("completion",), PHASE, cfg.rft, pad_id(tokenizer),
                                  max_steps=max_steps)
