"""The baselines' data paths without a model: RFT keeps only correct samples, its sampling log
survives a crash, SDFT's teacher reads the gold solution, budgets add up, `sdzero eval --compare`.
(The phases themselves run end to end in test_demo_and_pipeline.py.)"""

import json
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from sdzero_mcore.config import ConfigError, load_config

TINY = REPO_ROOT / "examples" / "tiny_cpu.yaml"


def _chunk(index, questions):
    return {"chunk": index, "questions": [
        {"id": qid, "x_ids": x, "samples": [{"ids": ids, "reward": r} for ids, r in samples]} for qid, x, samples in questions
    ]}


def test_rft_keeps_only_distinct_correct_samples(tmp_path):
    from sdzero_mcore.phases.rft import correct_examples

    log = tmp_path / "samples.jsonl"
    log.write_text(json.dumps(_chunk(0, [
        ("q0", [1, 2], [([5, 6, 9], 1), ([5, 7, 9], 0), ([5, 6, 9], 1), ([8, 9], 1)]),  # a duplicate correct sample
        ("q1", [3], [([4, 9], 0), ([], 1), ([4, 4, 9], 0), ([4, 5, 9], 0)]),  # an empty "correct" one: nothing to learn
    ])) + "\n" + json.dumps(_chunk(1, [("q2", [7, 7, 7], [([1, 1, 1, 1, 1, 9], 1)] * 4)])) + "\n")
    examples = correct_examples(log, max_len=8)
    got = [(e.completion.ids, e.completion.loss_start, e.completion.loss_end) for e in examples]
    assert got == [([1, 2, 5, 6, 9], 2, 5), ([1, 2, 8, 9], 2, 4)]  # q2's sample (9 tokens) exceeds max_len
    assert len(correct_examples(log, max_len=16)) == 3


def test_rft_log_drops_a_line_cut_by_a_crash(tmp_path):
    from sdzero_mcore.phases.rft import read_chunks

    log = tmp_path / "samples.jsonl"
    whole = json.dumps(_chunk(0, [("q0", [1], [([2], 1)])])) + "\n"
    log.write_text(whole + json.dumps(_chunk(1, [("q1", [1], [([3], 0)])]))[:25])
    assert list(read_chunks(log)) == [0]
    assert log.read_text() == whole  # the partial line is gone, so the rerun appends cleanly


def test_rft_and_grpo_budget_caps_name_the_problem():
    from sdzero_mcore.phases.grpo import grpo_steps
    from sdzero_mcore.phases.rft import rft_questions

    cfg = load_config(TINY, ["data.phase1_questions=8", "data.phase2_questions=8", "rft.max_generations=30"])
    assert len(rft_questions(cfg)) == 7  # 30 generations // 4 samples
    with pytest.raises(ConfigError, match=r"rft.max_generations \(3\) is less than one question's"):
        rft_questions(load_config(TINY, ["rft.max_generations=3"]))
    cfg = load_config(TINY, ["grpo.prompts_per_step=8", "grpo.max_generations=100"])
    assert grpo_steps(cfg, 16) == 3  # 100 // (8 x 4)
    assert grpo_steps(load_config(TINY, ["grpo.prompts_per_step=8"]), 16) == 2  # one pass over the questions
    with pytest.raises(ConfigError, match="less than one step's"):
        grpo_steps(load_config(TINY, ["grpo.max_generations=10"]), 16)


def test_grpo_collate_masks_exactly_the_response_predictions():
    from sdzero_mcore.data.sample import Sample
    from sdzero_mcore.phases.grpo import collate_policy

    batch = collate_policy([Sample(0, [1, 2, 3], [4, 5], 1, advantage=0.5), Sample(1, [1], [6, 7, 8], 0, advantage=-0.5)],
                           pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 6, 7, 8, 0]]
    labels, mask = batch["labels"], batch["mask"]
    assert labels[mask].tolist() == [4, 5, 6, 7, 8]  # every response token once, nothing else
    assert batch["advantages"].tolist() == [0.5, -0.5]


def test_sdft_teacher_prefix_is_the_gold_solution_then_the_rephrase_prompt():
    from sdzero_mcore.data.prompts import RunPrompts, prompt_ids
    from sdzero_mcore.data.question_sets import phase_questions
    from sdzero_mcore.models.tiny import build_char_tokenizer
    from sdzero_mcore.phases.distill import gold_solution_prefixes

    cfg = load_config(TINY, ["data.phase1_questions=4", "data.phase2_questions=3"])
    _, questions = phase_questions(cfg)
    tokenizer = build_char_tokenizer()
    run_prompts = RunPrompts.from_config(cfg, tokenizer)
    prompts = [prompt_ids(tokenizer, q.question) for q in questions]
    for q, x, prefix in zip(questions, prompts, gold_solution_prefixes(questions, prompts, run_prompts)):
        assert prefix[: len(x)] == x
        text = tokenizer.decode(prefix[len(x):])
        assert text.startswith(" " + q.solution) and text.rstrip().endswith(run_prompts.phrases.for_reward(1))
    from dataclasses import replace

    with pytest.raises(ConfigError, match="needs a solution for every phase-2 question; 1 have none"):
        gold_solution_prefixes([replace(questions[0], solution=None)], prompts[:1], run_prompts)


def test_budget_records_sum_and_a_missing_one_is_named(tmp_path):
    from sdzero_mcore.eval.budget import read_budget, record_budget

    record_budget(tmp_path, "srt_collect", 40, 900)
    record_budget(tmp_path, "distill", 10, 250)
    record_budget(tmp_path, "distill", 12, 300)  # a rerun replaces its record
    assert read_budget(tmp_path, ["srt_collect", "distill"]) == {"generations": 52, "generated_tokens": 1200}
    with pytest.raises(ConfigError, match="no generation budget recorded for phase 'grpo'"):
        read_budget(tmp_path, ["grpo"])


def test_eval_compare_joins_runs_from_the_command_line(tmp_path):
    from sdzero_mcore.eval.report import write_run

    for name, avg in (("base", 40.0), ("sd", 55.5)):
        write_run(tmp_path / name / "eval.json", {
            "name": name, "checkpoint": "c", "dataset": "d", "questions": 10, "k": 4, "temperature": 0.7,
            "max_new_tokens": 8, "seed": 0, "avg_at_k": avg, "pass_at_k": avg + 10, "mean_response_tokens": 20.0,
            "keywords": {"per_response": 0.0, "responses_with_keyword": 0.0, "counts": {}},
            "revise": None, "budget": {"generations": 7, "generated_tokens": 70},
        })
    done = subprocess.run([sys.executable, "-m", "sdzero_mcore.cli", "eval", "--compare", tmp_path / "base", tmp_path / "sd"],
                          capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| run | avg@4 | pass@4") and len(lines) == 3
    assert lines[1].startswith("| base | 40.0 | 50.0") and lines[2].startswith("| sd | 55.5 | 65.5")
    missing = subprocess.run([sys.executable, "-m", "sdzero_mcore.cli", "eval", "--compare", tmp_path / "nope"],
                             capture_output=True, text=True, cwd=REPO_ROOT)
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr


def test_eval_questions_from_a_file_or_held_out(tmp_path):
    from sdzero_mcore.data.question_sets import phase_questions
    from sdzero_mcore.eval.evaluate import eval_questions

    rows = tmp_path / "eval.jsonl"
    rows.write_text("".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(5)))
    cfg = load_config(TINY, ["eval.questions=3"])
    assert [q.question for q in eval_questions(cfg, str(rows))] == [f"What is {i}+1?" for i in range(3)]
    held_out = eval_questions(cfg)
    phase1, phase2 = phase_questions(cfg)
    assert len(held_out) == 3 and not {q.id for q in held_out} & {q.id for q in phase1 + phase2}


def test_rft_refuses_samples_from_another_config(tmp_path):
    from sdzero_mcore.phases.rft import check_log, sampling_hash

    cfg = load_config(TINY)
    chash = sampling_hash(cfg, tmp_path / "model")
    assert sampling_hash(cfg, tmp_path / "model") == chash
    assert sampling_hash(load_config(TINY, ["rft.max_generations=64"]), tmp_path / "model") != chash
    assert sampling_hash(cfg, tmp_path / "other_model") != chash
    log = tmp_path / "samples.jsonl"
    log.write_text(json.dumps({**_chunk(0, [("q0", [1], [([2], 1)])]), "config_hash": chash}) + "\n")
    check_log(log, chash)
    with pytest.raises(ConfigError, match="sampled under another config or model"):
        check_log(log, sampling_hash(load_config(TINY, ["rft.samples_per_question=8"]), tmp_path / "model"))
