"""Phase 1: collection (crash-safe, resumable, no record lost or duplicated) and SRT training
(completion-only masks, both terms logged, joint and sequential modes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO_ROOT, VOCAB

from sdzero_mcore.config import load_config
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.parallel import run_local_workers
from sdzero_mcore.phases.srt_collect import RECORDS_FILE, recover_log

TINY = REPO_ROOT / "examples" / "tiny_cpu.yaml"
COLLECT = ["data.phase1_questions=6", "data.phase2_questions=4", "srt_collect.max_new_tokens=12",
           "srt_collect.n_init=2", "srt_collect.n_rev=2", "srt_collect.questions_per_call=2", "logging.progress=false"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("srt") / "hf", vocab_size=VOCAB)


def _collect_cmd(hf_dir, out):
    args = ["srt-collect", str(TINY), "--init-from", str(hf_dir), f"output_dir={out}", *COLLECT]
    code = f"import sys; from sdzero_mcore.cli import main; sys.exit(main({args!r}))"
    return [sys.executable, "-c", code]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "srt_collect" / RECORDS_FILE).read_text().splitlines()]


def test_recover_log_drops_a_partial_question(tmp_path):
    log = tmp_path / "log.jsonl"
    lines = [{"type": "revision", "question_id": "a"}, {"type": "done", "question_id": "a"},
             {"type": "revision", "question_id": "b"}]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"type": "revis')
    assert recover_log(log) == {"a"}
    assert [json.loads(line)["question_id"] for line in log.read_text().splitlines()] == ["a", "a"]
    assert recover_log(tmp_path / "missing.jsonl") == set()


def test_killed_collection_resumes_without_loss_or_duplicates(hf_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_collect_cmd(hf_dir, straight), check=True, capture_output=True, timeout=600)
    # start again elsewhere, SIGKILL it once two questions are done, then rerun the same command
    process = subprocess.Popen(_collect_cmd(hf_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = killed / "srt_collect" / RECORDS_FILE
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.is_file() and log.read_text().count('"type": "done"') >= 2:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = log.read_text().count('"type": "done"')
    assert 2 <= done_before < 6, done_before  # killed mid-collection
    assert not (killed / "srt_collect" / "complete.json").exists()
    subprocess.run(_collect_cmd(hf_dir, killed), check=True, capture_output=True, timeout=600)

    key = lambda r: (r["question_id"], r["type"], r.get("attempt_id", -1), r.get("revision_id", -1))  # noqa: E731
    a, b = sorted(_records(straight), key=key), sorted(_records(killed), key=key)
    assert len({key(r) for r in b}) == len(b)  # no duplicates
    assert a == b  # nothing lost, and the redone questions sampled the same tokens
    assert sum(r["type"] == "done" for r in b) == 6 and sum(r["type"] == "revision" for r in b) == 6 * 2 * 2
    summary = json.loads((killed / "srt_collect" / "summary.json").read_text())
    assert summary["questions"] == 6 and summary["generations"] == 6 * 2 + 6 * 2 * 2
    first = next(r for r in b if r["type"] == "revision")
    assert first["p_r"] in ("Let me rephrase the above solution.", "Wait, this response is not correct, let me start over.")
    assert {"x", "y_init_ids", "r_init", "y_rev_ids", "r_rev", "init_tokens", "rev_tokens", "config_hash", "model"} <= set(first)


# --- SRT training ------------------------------------------------------------------------------


def write_d_revision(path: Path, hf_dir: Path, n: int = 8) -> list[dict]:
    """Kept records built from the arith task: a wrong first attempt and the worked solution as revision."""
    from transformers import AutoTokenizer

    from sdzero_mcore.data.prompts import prompt_ids
    from sdzero_mcore.rewards import generate_rows

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    records = []
    for row in generate_rows("arith", n, seed=1):
        records.append({
            "x": row["question"],
            "x_ids": prompt_ids(tokenizer, row["question"]),
            "y_init_ids": tokenizer.encode(" \\boxed{0}", add_special_tokens=False),
            "r_init": 0,
            "y_rev_ids": tokenizer.encode(" " + row["solution"], add_special_tokens=False) + [tokenizer.eos_token_id],
            "r_rev": 1,
        })
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_masks_cover_exactly_the_completions(hf_dir, tmp_path):
    from transformers import AutoTokenizer

    from sdzero_mcore.data.prompts import RunPrompts
    from sdzero_mcore.phases.completion import collate_completion
    from sdzero_mcore.phases.srt_train import load_examples

    records = write_d_revision(tmp_path / "d.jsonl", hf_dir, n=2)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    pairs = load_examples(tmp_path / "d.jsonl", RunPrompts.from_config(load_config(), tokenizer), 512)
    batch = collate_completion(pairs, 0, ("revision", "generation"))
    for row, record in enumerate(records):
        y_rev, x = record["y_rev_ids"], record["x_ids"]
        seq_len = len(pairs[row].revision.ids)
        # the revision term's targets are exactly y_rev: nothing of x, y_init or P_r
        assert batch["labels"][row][batch["mask_revision"][row]].tolist() == y_rev
        # the generation term's targets are everything after x: y_init, sep P_r sep, y_rev
        assert batch["labels"][row][batch["mask_generation"][row]].tolist() == pairs[row].revision.ids[len(x):]
        assert int(batch["mask_generation"][row].sum()) == seq_len - len(x)
        assert not batch["mask_revision"][row][seq_len - 1 :].any()  # no target beyond the sequence


def srt_worker(hf_dir: str, d_revision: str, run_dir: str, mode: str, tp: int, extra: tuple = ()) -> None:
    from sdzero_mcore.phases.srt_train import run_srt_train

    cfg = load_config(TINY, [f"output_dir={run_dir}", f"srt_train.mode={mode}", "srt_train.global_batch_size=4",
                             "srt_train.micro_batch_size=2", "srt_train.epochs=3", "srt_train.optimizer.lr=3e-3",
                             "srt_train.optimizer.warmup_ratio=0", f"parallel.tensor_model_parallel_size={tp}",
                             "logging.progress=false", *extra])
    run_srt_train(cfg, hf_dir, d_revision)


def test_split_micro_batches_packs_by_padded_tokens():
    from sdzero_mcore.trainer import split_micro_batches

    items = [[0] * n for n in (5, 1, 9, 3, 3, 7, 2)]
    assert split_micro_batches(items, 3) == [items[0:3], items[3:6], items[6:]]  # rows, in order
    packed = split_micro_batches(items, 3, max_tokens=10)
    assert sorted(map(len, (i for b in packed for i in b))) == sorted(map(len, items))  # each once
    assert [[len(i) for i in b] for b in packed] == [[1, 2, 3], [3, 5], [7], [9]]
    for batch in packed:  # rows x longest <= budget (a lone sequence may exceed it), rows <= micro_batch_size
        assert len(batch) <= 3 and (len(batch) == 1 or len(batch) * max(map(len, batch)) <= 10)


def test_token_budget_micro_batches_give_the_same_training(hf_dir, tmp_path):
    """Packing by tokens changes only the padding: the same losses, step by step, as by rows."""
    write_d_revision(tmp_path / "d.jsonl", hf_dir, n=8)
    runs = {}
    for name, extra in (("rows", ()), ("tokens", ("srt_train.max_tokens_per_micro_batch=150",))):
        run_local_workers(srt_worker, 1, str(hf_dir), str(tmp_path / "d.jsonl"), str(tmp_path / name), "joint", 1, extra)
        runs[name] = [json.loads(line) for line in (tmp_path / name / "metrics" / "srt.jsonl").read_text().splitlines()]
    assert len(runs["rows"]) == len(runs["tokens"]) == 6
    for a, b in zip(runs["rows"], runs["tokens"]):
        assert a["tokens_generation"] == b["tokens_generation"]
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * a["grad_norm"]


@pytest.mark.parametrize("mode,tp", [("joint", 2), ("sequential", 1)])
def test_srt_training_logs_both_terms_and_learns(hf_dir, tmp_path, mode, tp):
    write_d_revision(tmp_path / "d.jsonl", hf_dir, n=8)
    run_local_workers(srt_worker, tp, str(hf_dir), str(tmp_path / "d.jsonl"), str(tmp_path / "run"), mode, tp)
    metrics_dir = tmp_path / "run" / "metrics"
    if mode == "joint":
        rows = [json.loads(line) for line in (metrics_dir / "srt.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all({"loss_revision", "loss_generation"} <= set(r) for r in rows)
        assert all(abs(r["loss"] - r["loss_revision"] - r["loss_generation"]) < 1e-5 for r in rows)
        assert rows[-1]["loss"] < rows[0]["loss"]
        assert all(r["tokens_generation"] > r["tokens_revision"] for r in rows)
        final = tmp_path / "run" / "checkpoints" / "srt" / "step_0000006"
    else:
        gen = [json.loads(line) for line in (metrics_dir / "srt_generation.jsonl").read_text().splitlines()]
        rev = [json.loads(line) for line in (metrics_dir / "srt_revision.jsonl").read_text().splitlines()]
        assert len(gen) == len(rev) == 6
        assert all("loss_generation" in r and "loss_revision" not in r for r in gen)
        assert all("loss_revision" in r and "loss_generation" not in r for r in rev)
        assert gen[-1]["loss"] < gen[0]["loss"] and rev[-1]["loss"] < rev[0]["loss"]
        final = tmp_path / "run" / "checkpoints" / "srt_revision" / "step_0000006"
    meta = json.loads((final / "sdzero_checkpoint.json").read_text())
    assert meta["final"] and meta["tensor_parallel_size"] == tp


def collect_worker(hf_dir: str, out: str) -> None:
    from sdzero_mcore.phases.srt_collect import run_srt_collect

    run_srt_collect(load_config(TINY, [f"output_dir={out}", *COLLECT]), hf_dir)


def test_two_ranks_collect_once(hf_dir, tmp_path):
    """Under a 2-rank launch only rank 0 generates; rank 1 waits for its result (no duplicate records)."""
    run_local_workers(collect_worker, 2, str(hf_dir), str(tmp_path / "two"))
    records = _records(tmp_path / "two")
    assert sum(r["type"] == "done" for r in records) == 6
    assert not list((tmp_path / "two" / "srt_collect").glob(".rank0-result-*"))


def test_a_log_from_another_config_is_refused(hf_dir, tmp_path):
    from sdzero_mcore.config import ConfigError
    from sdzero_mcore.phases.srt_collect import run_srt_collect

    log = tmp_path / "srt_collect" / RECORDS_FILE
    log.parent.mkdir(parents=True)
    log.write_text(json.dumps({"type": "revision", "question_id": "q", "config_hash": "0123456789abcdef"}) + "\n")
    with pytest.raises(ConfigError, match="was collected with another config"):
        run_srt_collect(load_config(TINY, [f"output_dir={tmp_path}", *COLLECT]), str(hf_dir))


def test_sft_examples_and_questions_are_disjoint_from_the_phases(hf_dir):
    from transformers import AutoTokenizer

    from sdzero_mcore.data.question_sets import heldout_questions, phase_questions
    from sdzero_mcore.phases.sft import sft_examples, sft_questions

    cfg = load_config(TINY, [*COLLECT])
    questions = sft_questions(cfg, 50)
    phase1, phase2 = phase_questions(cfg)
    heldout = heldout_questions(cfg, 200)
    assert len(questions) == 50 and len(heldout) == 200
    assert not {q.id for q in questions} & ({q.id for q in phase1} | {q.id for q in phase2} | {q.id for q in heldout})
    assert not {q.id for q in heldout} & ({q.id for q in phase1} | {q.id for q in phase2})
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    from sdzero_mcore.data.prompts import RunPrompts

    (example,) = sft_examples(questions[:1], RunPrompts.from_config(load_config(), tokenizer), 512)
    ids, start, end = example.completion.ids, example.completion.loss_start, example.completion.loss_end
    assert tokenizer.decode(ids[start:end - 1]) == " " + questions[0].solution and ids[end - 1] == tokenizer.eos_token_id
    from sdzero_mcore.data.prompts import prompt_ids

    assert end == len(ids) and ids[:start] == prompt_ids(tokenizer, questions[0].question)


def test_sft_noise_replaces_the_final_answer_of_that_fraction():
    import random

    from sdzero_mcore.data.questions import Question
    from sdzero_mcore.models.tiny import build_char_tokenizer
    from sdzero_mcore.phases.sft import noisy_solution, sft_examples
    from sdzero_mcore.rewards import verify_synthetic

    assert noisy_solution("62+12=74\n\\boxed{74}", "74", random.Random(0)) == "62+12=81\n\\boxed{81}"
    # an operand equal to the answer is left alone; only the stated results change
    noisy = noisy_solution("74+0=74\n\\boxed{74}", "74", random.Random(0))
    assert noisy.startswith("74+0=") and verify_synthetic("add", noisy, "74").reward == 0
    tokenizer = build_char_tokenizer()
    from sdzero_mcore.rewards import generate_rows

    rows = generate_rows("add", 400, seed=3)
    questions = [Question(id=str(i), question=r["question"], answer=r["answer"], tests=None, solution=r["solution"], source="add",
                          index=i, extra={"task": "add"}) for i, r in enumerate(rows)]
    from sdzero_mcore.data.prompts import RunPrompts

    prompts = RunPrompts.from_config(load_config(), tokenizer)
    examples = sft_examples(questions, prompts, 512, noise=0.3, seed=1)
    wrong = 0
    for q, example in zip(questions, examples):
        c = example.completion
        wrong += 1 - verify_synthetic("add", tokenizer.decode(c.ids[c.loss_start:c.loss_end - 1]), q.answer).reward
    assert 0.22 < wrong / len(examples) < 0.38, wrong
    again = sft_examples(questions, prompts, 512, noise=0.3, seed=1)
    assert [e.completion.ids for e in again] == [e.completion.ids for e in examples]  # deterministic


def test_sft_revision_format_examples_train_only_the_second_attempt():
    from sdzero_mcore.data.prompts import control_phrases, prompt_ids
    from sdzero_mcore.data.questions import Question
    from sdzero_mcore.models.tiny import build_char_tokenizer
    from sdzero_mcore.phases.sft import sft_examples
    from sdzero_mcore.rewards import generate_rows, verify_synthetic

    from sdzero_mcore.data.prompts import RunPrompts

    tokenizer = build_char_tokenizer()
    preset = control_phrases("paper")
    rows = generate_rows("add", 300, seed=5)
    questions = [Question(id=str(i), question=r["question"], answer=r["answer"], tests=None, solution=r["solution"],
                          source="add", index=i, extra={"task": "add"}) for i, r in enumerate(rows)]
    examples = sft_examples(questions, RunPrompts.from_config(load_config(), tokenizer), 512, noise=0.2,
                            revision_fraction=0.4, seed=2)
    seen = {0: 0, 1: 0}
    for q, example in zip(questions, examples):
        c = example.completion
        x = prompt_ids(tokenizer, q.question)
        before, target = tokenizer.decode(c.ids[len(x):c.loss_start]), tokenizer.decode(c.ids[c.loss_start:c.loss_end - 1])
        assert c.ids[:len(x)] == x and c.ids[c.loss_end - 1] == tokenizer.eos_token_id and c.loss_end == len(c.ids)
        if c.loss_start == len(x):
            continue  # a plain example
        for r in (0, 1):
            if before.rstrip().endswith(preset.for_reward(r)):
                seen[r] += 1
                first = before[: before.rindex(preset.for_reward(r))].strip()
                assert verify_synthetic("add", first, q.answer).reward == r  # P_r tells the truth about y_a
                if r == 1:
                    assert target.strip() == first  # a right answer is restated
    assert seen[0] > 20 and seen[1] > 20, seen
