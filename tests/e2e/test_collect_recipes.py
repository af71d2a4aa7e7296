"""Phase 1 collection as the release runs it: n x m sampling, which attempts are revised, the
target of kept tuples, cleaning and dedup, stop strings, and a crash mid-question.

A random tiny model never answers correctly, so these tests drive the real collection loop with a
scripted engine whose answers are right or wrong by construction (what the loop does with them is
under test, not the engine; the real engine's SIGKILL test is in test_srt_phase.py).
"""

import json
import re

import pytest
from helpers import REPO_ROOT

from sdzero_mcore.config import load_config
from sdzero_mcore.models.tiny import build_char_tokenizer, save_tiny_hf_model
from sdzero_mcore.phases import srt_collect
from sdzero_mcore.rewards.synthetic import add_steps
from sdzero_mcore.rollout.base import Completion
from sdzero_mcore.rollout.stop_strings import cut_at_stop_strings, stop_string_ids

TINY = REPO_ROOT / "examples" / "tiny_cpu.yaml"
QUESTION = re.compile(r"What is (\d+)\+(\d+)\?")


class ScriptedEngine:
    """Attempt i of prompt p is right when (seed + p + i) is even; revision j is right unless j == 2,
    and revision 1 repeats revision 0 word for word (a duplicate tuple). Every call is recorded."""

    def __init__(self, tokenizer, tail: str = ""):
        self.tokenizer, self.tail, self.calls = tokenizer, tail, []

    def generate(self, prompts, sampling):
        out = []
        for p_index, context in enumerate(prompts):
            text = self.tokenizer.decode(context, skip_special_tokens=False)
            a, b = map(int, QUESTION.search(text).groups())
            revising = "Let me" in text or "Wait" in text
            self.calls.append(("revise" if revising else "attempt", text, sampling))
            for i in range(sampling.n):
                if revising:
                    answer = add_steps(a, b, (0, 1) if i == 2 else None)
                    body = answer + (f"\nchecked {i}" if i != 1 else "\nchecked 0")
                else:
                    right = (sampling.seed + p_index + i) % 2 == 0
                    body = add_steps(a, b, None if right else (1, 1)) + f"\nattempt {i}"
                body += self.tail
                ids = self.tokenizer.encode(body, add_special_tokens=False) + [self.tokenizer.eos_token_id]
                out.append(Completion(p_index, i, ids, self.tokenizer.decode(ids, skip_special_tokens=True), "stop"))
        return out

    def shutdown(self):
        pass


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("collect") / "hf")


def collect(hf_dir, out, monkeypatch, *overrides, tail=""):
    engine = ScriptedEngine(build_char_tokenizer(), tail)
    monkeypatch.setattr(srt_collect, "serving_engine", lambda cfg, source, tokenizer: engine)
    cfg = load_config(TINY, [f"output_dir={out}", "data.phase1_questions=12", "data.phase2_questions=4",
                             "logging.progress=false", *overrides])
    srt_collect.run_srt_collect(cfg, str(hf_dir))
    log = [json.loads(line) for line in (out / "srt_collect" / srt_collect.RECORDS_FILE).read_text().splitlines()]
    kept = [json.loads(line) for line in (out / "srt_collect" / srt_collect.REVISION_FILE).read_text().splitlines()]
    summary = json.loads((out / "srt_collect" / srt_collect.SUMMARY_FILE).read_text())
    return engine, log, kept, summary


def test_release_revises_only_wrong_attempts_and_stops_at_the_target(hf_dir, tmp_path, monkeypatch):
    engine, log, kept, summary = collect(hf_dir, tmp_path, monkeypatch, "recipe=release", "srt_collect.target_kept=7")
    attempts = [c for c in engine.calls if c[0] == "attempt"]
    assert all(s.n == 3 and s.temperature == 1.0 and s.top_p == 0.9 for _, _, s in attempts)
    revisions = [r for r in log if r["type"] == "revision"]
    assert revisions and all(r["r_init"] == 0 for r in revisions)  # revise_correct=false: no correct attempt revised
    assert all(r["p_r"] == "Wait, this response is wrong. Let me correct it." for r in revisions)
    # the release's collection prompt: its system prompt and the boxed instruction after the question
    assert "You are a helpful assistant that solves math problems step by step." in attempts[0][1]
    # per revised attempt: 3 revisions, one wrong, one a copy of another -> 1 distinct kept tuple
    done = [r for r in log if r["type"] == "done"]
    assert len(kept) == summary["kept"] == 7 and summary["distinct_kept"] == 7
    assert summary["cleaning"]["removed"]["duplicate"] >= 7
    # the scan stopped at the question that reached the target: one question fewer would not reach it
    per_question = [sum(1 for r in revisions if r["question_id"] == d["question_id"] and r["revision_id"] == 0)
                    for d in done]
    assert sum(per_question) >= 7 > sum(per_question[:-1])
    assert summary["questions"] == len(done) < 12


def test_paper_revises_every_attempt(hf_dir, tmp_path, monkeypatch):
    engine, log, kept, summary = collect(hf_dir, tmp_path, monkeypatch)
    revisions = [r for r in log if r["type"] == "revision"]
    assert {r["r_init"] for r in revisions} == {0, 1}
    assert {r["p_r"] for r in revisions if r["r_init"] == 1} == {"Let me rephrase the above solution."}
    assert summary["questions"] == 12 and summary["cleaning"] is None
    assert len(kept) == sum(r["r_rev"] for r in revisions)  # no cleaning: every verified revision, duplicates too
    assert summary["kept_rephrasings"] > 0 and summary["kept_corrections"] > 0


def test_a_crash_mid_question_resumes_to_the_same_records(hf_dir, tmp_path, monkeypatch):
    args = ("recipe=release", "srt_collect.target_kept=9")
    _, straight, kept_straight, _ = collect(hf_dir, tmp_path / "straight", monkeypatch, *args)
    _, _, _, _ = collect(hf_dir, tmp_path / "crashed", monkeypatch, *args)
    log = tmp_path / "crashed" / "srt_collect" / srt_collect.RECORDS_FILE
    lines = log.read_text().splitlines(keepends=True)
    cut = max(i for i, line in enumerate(lines[:-1]) if '"type": "done"' in line)  # the second-to-last question
    log.write_text("".join(lines[:cut + 2]) + lines[cut + 2][:25])  # a partial record, as a kill leaves it
    (tmp_path / "crashed" / "srt_collect" / srt_collect.COMPLETE_FILE).unlink()
    _, resumed, kept_resumed, _ = collect(hf_dir, tmp_path / "crashed", monkeypatch, *args)
    assert resumed == straight and kept_resumed == kept_straight


def test_cleaning_strips_openers_and_re_encodes(hf_dir, tmp_path, monkeypatch):
    # every sample ends with a block repeated 3 times: the release trims it to one copy
    tail = "\nso the sum is right." * 3
    _, log, kept, summary = collect(hf_dir, tmp_path, monkeypatch, "recipe=release", "srt_collect.target_kept=3",
                                    tail=tail)
    assert summary["cleaning"]["changed"]["repeated_tail"] == len([r for r in log if r.get("r_rev") == 1])
    tokenizer = build_char_tokenizer()
    for record in kept:
        assert record["y_rev"].count("so the sum is right.") == 1
        assert tokenizer.decode(record["y_rev_ids"], skip_special_tokens=True) == record["y_rev"]
        assert record["y_rev_ids"][-1] == tokenizer.eos_token_id  # the sampled end token is kept


def test_stop_strings_cut_on_ids():
    tokenizer = build_char_tokenizer()
    ids = tokenizer.encode("2+2=4\n\\boxed{4}\nQuestion: what is 3+3?", add_special_tokens=False)
    cut = cut_at_stop_strings(Completion(0, 0, ids, tokenizer.decode(ids), "length"), tokenizer, ["Question:", "<|im_start|>"])
    assert cut.text == "2+2=4\n\\boxed{4}\n" and cut.finish_reason == "stop"
    assert cut.token_ids == ids[: len(cut.text)]
    untouched = Completion(0, 0, ids[:5], tokenizer.decode(ids[:5]), "length")
    assert cut_at_stop_strings(untouched, tokenizer, ["Question:"]) is untouched
    # the chat markers are special tokens: stopped by id, never cut out of the text (the end token stays)
    assert stop_string_ids(tokenizer, ["<|im_end|>", "<|im_start|>", "Question:"]) == sorted(
        tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"]))
    ids = tokenizer.encode("4", add_special_tokens=False) + [tokenizer.eos_token_id]
    kept = Completion(0, 0, ids, "4", "stop")
    assert cut_at_stop_strings(kept, tokenizer, ["<|im_end|>", "Question:"]) is kept
