"""Phase 1 collection (``sdzero srt-collect``): attempts, their rewards, and revisions of each.

For the Phase 1 questions, in order, ``questions_per_call`` at a time: ``n_init`` attempts
y_init ~ pi(.|x) and their rewards; then, for each attempt (correct ones too when
``revise_correct``), ``n_rev`` revisions y_rev ~ pi(.|x, y_init, P_r) and theirs. Every revision becomes one record in an append-only
JSONL file; the verified-correct ones form D_revision, the SRT training set. With
``target_kept`` the scan stops once that many verified revisions are logged, and D_revision holds
the first ``target_kept`` of them (after cleaning, when ``cleaning`` is on: the release's rules,
each counted in the summary). Samples end at the tokenizer's end token or the first of
``stop_strings`` (``rollout/stop_strings.py``). Samples of a chunk's questions after the one that
reaches the target are discarded: not logged, not counted in the budget.

Crash safety: all records of a question are appended in one write followed by a ``done`` line
and an fsync. A rerun of the same command truncates the file after the last ``done`` line (a
kill mid-question leaves at most a partial question, which is dropped) and skips the questions
already done; a chunk of questions is always sampled whole with its own seed, so a redone
question gets the same samples.
Nothing is lost or duplicated. D_revision and the summary are derived from the log, atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from sdzero_mcore.checkpoint.source import start_source
from sdzero_mcore.config import SDZeroConfig
from sdzero_mcore.data.prompts import RunPrompts, default_stop_ids
from sdzero_mcore.data.question_sets import phase_questions
from sdzero_mcore.data.trace_cleaning import clean_records
from sdzero_mcore.eval.budget import record_budget
from sdzero_mcore.fileio import atomic_write_text
from sdzero_mcore.parallel.rank0 import run_on_rank0
from sdzero_mcore.phases.append_log import check_log_hash
from sdzero_mcore.rewards import reward_fn_for, reward_target
from sdzero_mcore.rollout import sampling_from_config
from sdzero_mcore.rollout.stop_strings import cut_at_stop_strings, stop_string_ids
from sdzero_mcore.rollout.weight_sync import serving_engine
from sdzero_mcore.run_setup import load_tokenizer, run_prompts

PHASE = "srt_collect"
RECORDS_FILE = "srt_records.jsonl"
REVISION_FILE = "d_revision.jsonl"
SUMMARY_FILE = "summary.json"
COMPLETE_FILE = "complete.json"  # every question done (or target_kept reached)


def config_hash(cfg: SDZeroConfig) -> str:
    relevant = {"data": cfg.data.__dict__, "collect": cfg.srt_collect.__dict__, "rollout": cfg.rollout.__dict__,
                "prompt": cfg.prompts.collection.__dict__}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_seed(base: int, chunk_index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{base}:chunk:{chunk_index}".encode()).digest()[:4], "little")


def recover_log(path: Path) -> set[str]:
    """Truncate ``path`` after its last complete question; return the ids of the questions done."""
    if not path.exists():
        return set()
    done: set[str] = set()
    keep = 0
    offset = 0
    with path.open("rb") as handle:
        for raw in handle:
            offset += len(raw)
            if not raw.endswith(b"\n"):
                break  # a line cut by the kill
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                break
            if record.get("type") == "done":
                done.add(record["question_id"])
                keep = offset
    if keep != path.stat().st_size:
        with path.open("r+b") as handle:
            handle.truncate(keep)
    return done


def collect_dir(cfg: SDZeroConfig) -> Path:
    return Path(cfg.output_dir) / "srt_collect"


def run_srt_collect(cfg: SDZeroConfig, init_from: Optional[str] = None) -> Path:
    """Collect (or finish collecting) Phase 1 data; returns the D_revision file."""
    source = start_source(cfg, init_from)
    tokenizer = load_tokenizer(source)
    prompts = run_prompts(cfg, source, tokenizer)
    questions, _ = phase_questions(cfg, tokenizer)
    out = collect_dir(cfg)
    check_log_config(out / RECORDS_FILE, config_hash(cfg))  # before any work, on every rank
    engine = serving_engine(cfg, source, tokenizer)  # every rank joins a megatron weight stream
    # rank 0 generates and writes; the others wait for it
    path = run_on_rank0(
        lambda: str(_collect_on_rank0(cfg, source, tokenizer, prompts, questions, engine, out)), out
    )
    return Path(path)


def _collect_on_rank0(cfg, source, tokenizer, prompts: RunPrompts, questions, engine, out: Path) -> Path:
    ccfg = cfg.srt_collect
    out.mkdir(parents=True, exist_ok=True)
    log = out / RECORDS_FILE
    chash = config_hash(cfg)
    done = recover_log(log)
    reward_fn = reward_fn_for(cfg, questions, collection=True)
    stop_ids = sorted(default_stop_ids(tokenizer, stop_string_ids(tokenizer, ccfg.stop_strings)))
    base = replace(
        sampling_from_config(cfg.rollout, stop_token_ids=stop_ids),
        temperature=ccfg.temperature,
        top_p=ccfg.top_p,
        max_new_tokens=ccfg.max_new_tokens,
    )

    def sample(contexts: list[list[int]], n: int, seed: int) -> list[list]:
        """``n`` samples per context in one engine call, grouped per context, cut at the stop strings."""
        completions = engine.generate(contexts, replace(base, n=n, seed=seed)) if contexts else []
        cut = [cut_at_stop_strings(c, tokenizer, ccfg.stop_strings) for c in completions]
        return [cut[i * n : (i + 1) * n] for i in range(len(contexts))]

    eos_ids = frozenset(stop_ids)

    def usable(records: list[dict]) -> list[dict]:
        """The verified revisions among ``records`` that D_revision would keep (cleaned, deduplicated)."""
        correct = [r for r in records if r["type"] == "revision" and r["r_rev"] == 1]
        return clean_records(correct, tokenizer, eos_ids=eos_ids).records if ccfg.cleaning else correct

    # duplicates only occur within a question (x is part of the key), so counting per question is exact
    kept = sum(len(usable(group)) for group in _records_by_question(log))
    size = ccfg.questions_per_call
    chunks = [questions[i : i + size] for i in range(0, len(questions), size)]
    progress = tqdm(total=len(questions), initial=len(done), desc="srt-collect", disable=not cfg.logging.progress)
    try:
        for c_index, chunk in enumerate(chunks):
            if ccfg.target_kept is not None and kept >= ccfg.target_kept:
                break
            if all(q.id in done for q in chunk):
                continue
            # a chunk is always sampled whole, with its own seed: a rerun after a crash regenerates a
            # partly written chunk exactly and appends only the questions the log lacks
            seed = chunk_seed(cfg.rollout.seed, c_index)
            xs = [prompts.prompt("collection", q.question) for q in chunk]
            targets = [reward_target(q) for q in chunk]
            attempts = sample(xs, ccfg.n_init, seed)
            scores = reward_fn.score_batch([a.text for group in attempts for a in group],
                                           [t for t, group in zip(targets, attempts) for _ in group])
            init_rewards = [scores[i * ccfg.n_init : (i + 1) * ccfg.n_init] for i in range(len(chunk))]
            revised = [(qi, ai) for qi in range(len(chunk)) for ai, r in enumerate(init_rewards[qi])
                       if r.reward == 0 or ccfg.revise_correct]
            contexts = [prompts.revision("collection", chunk[qi].question, attempts[qi][ai].token_ids,
                                         init_rewards[qi][ai].reward, x_ids=xs[qi]) for qi, ai in revised]
            revisions = sample(contexts, ccfg.n_rev, seed + 1)
            rev_scores = reward_fn.score_batch([r.text for group in revisions for r in group],
                                               [targets[qi] for (qi, _), group in zip(revised, revisions) for _ in group])
            rev_rewards = [rev_scores[i * ccfg.n_rev : (i + 1) * ccfg.n_rev] for i in range(len(revised))]
            by_question: dict[int, list] = {}
            for (qi, ai), group, rewards in zip(revised, revisions, rev_rewards):
                by_question.setdefault(qi, []).append((ai, group, rewards))
            for qi, question in enumerate(chunk):
                if question.id in done:
                    continue
                lines = []
                for ai, group, rewards in by_question.get(qi, []):
                    attempt, r_init = attempts[qi][ai], init_rewards[qi][ai]
                    for r_index, (revision, r_rev) in enumerate(zip(group, rewards)):
                        lines.append({
                            "type": "revision",
                            "question_id": question.id, "attempt_id": ai, "revision_id": r_index,
                            "x": question.question, "x_ids": xs[qi],
                            "y_init_ids": attempt.token_ids, "y_init": attempt.text, "r_init": r_init.reward,
                            "p_r": prompts.phrases.for_reward(r_init.reward),
                            "y_rev_ids": revision.token_ids, "y_rev": revision.text, "r_rev": r_rev.reward,
                            "init_tokens": len(attempt.token_ids), "rev_tokens": len(revision.token_ids),
                            "model": str(source.path), "config_hash": chash,
                        })
                kept += len(usable(lines))
                lines.append({
                    "type": "done", "question_id": question.id,
                    "attempts": [{"r": r.reward, "tokens": len(a.token_ids)}
                                 for a, r in zip(attempts[qi], init_rewards[qi])],
                })
                _append(log, lines)
                done.add(question.id)
                progress.update(1)
                if ccfg.target_kept is not None and kept >= ccfg.target_kept:
                    break  # the scan stops at the question that reaches the target
        progress.close()
        # the loop ends when every question is done or target_kept is reached: either completes it,
        # and the marker comes last (D_revision, the summary and the budget exist when it does)
        d_revision = write_outputs(out, target_kept=ccfg.target_kept, cleaning=ccfg.cleaning,
                                   tokenizer=tokenizer, eos_ids=eos_ids)
        atomic_write_text(out / COMPLETE_FILE, json.dumps({"config_hash": chash, "kept": kept}) + "\n")
    finally:
        reward_fn.close()
        engine.shutdown()
    return d_revision


def collection_complete(cfg: SDZeroConfig) -> bool:
    """Whether this config's collection has finished (a marker from another config does not count)."""
    marker = collect_dir(cfg) / COMPLETE_FILE
    return marker.is_file() and json.loads(marker.read_text()).get("config_hash") == config_hash(cfg)


def check_log_config(log: Path, chash: str) -> None:
    """Refuse to extend a log written under another data/collection/rollout config."""
    check_log_hash(log, chash, "was collected with another config")


def _append(path: Path, records: list[dict]) -> None:
    data = "".join(json.dumps(r) + "\n" for r in records)
    with path.open("a") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _records(path: Path):
    if not path.exists():
        return
    with path.open() as handle:
        for line in handle:
            yield json.loads(line)


def _records_by_question(path: Path):
    """The log's revision records, one list per question, in log order."""
    group: list[dict] = []
    for record in _records(path):
        if record["type"] == "done":
            yield group
            group = []
        else:
            group.append(record)


def write_outputs(out: Path, *, target_kept: Optional[int] = None, cleaning: bool = False, tokenizer=None,
                  eos_ids: frozenset = frozenset()) -> Path:
    """D_revision (the first ``target_kept`` verified-correct revisions in log order, cleaned and
    deduplicated when ``cleaning``) and the summary, rebuilt from the log."""
    revisions, attempts = [], []
    for record in _records(out / RECORDS_FILE):
        (revisions if record["type"] == "revision" else attempts).append(record)
    correct = [r for r in revisions if r["r_rev"] == 1]
    cleaned = clean_records(correct, tokenizer, eos_ids=eos_ids) if cleaning else None
    kept = (cleaned.records if cleaned else correct)[:target_kept]
    atomic_write_text(out / REVISION_FILE, "".join(json.dumps(r) + "\n" for r in kept))
    init = [a for done in attempts for a in done["attempts"]]

    def rate(rows, key):
        return sum(r[key] for r in rows) / len(rows) if rows else None

    summary = {
        "questions": len(attempts),
        "initial_accuracy": rate(init, "r"),
        "revision_accuracy_given_r_init_0": rate([r for r in revisions if r["r_init"] == 0], "r_rev"),
        "revision_accuracy_given_r_init_1": rate([r for r in revisions if r["r_init"] == 1], "r_rev"),
        "verified_revisions": len(correct),
        "kept": len(kept),
        "kept_corrections": sum(1 for r in kept if r["r_init"] == 0),
        "kept_rephrasings": sum(1 for r in kept if r["r_init"] == 1),
        "distinct_kept": len({(r["x"], r["y_init"], r["y_rev"]) for r in kept}),
        "cleaning": cleaned.as_summary() if cleaned else None,
        "generations": len(init) + len(revisions),
        "generated_tokens": sum(a["tokens"] for a in init) + sum(r["rev_tokens"] for r in revisions),
    }
    atomic_write_text(out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    record_budget(out.parent, PHASE, summary["generations"], summary["generated_tokens"])
    return out / REVISION_FILE
