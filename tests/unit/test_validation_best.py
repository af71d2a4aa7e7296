"""Best-k checkpoint retention of on-policy validation (phases/validation.py), on real directories:
the ranking, what survives keep_last pruning, the file a resumed run reads, and when validation is due."""

import json

import pytest

from sdzero_mcore.phases.validation import BEST_FILE, BestCheckpoints, rank_best, validation_due
from sdzero_mcore.trainer import prune_checkpoints


def _values(value: float) -> dict:
    return {"avg_at_k": value, "pass_at_k": 100.0 - value, "mean_response_tokens": 7.0}


def _on_disk(root) -> set[int]:
    return {int(p.name.split("_")[1]) for p in root.glob("step_*")}


def _expected_best(history: list[tuple[int, float]], keep_best: int) -> list[int]:
    """The oracle, independent of rank_best: a stable sort by value keeps the earlier step first on ties."""
    ordered = sorted(sorted(history), key=lambda sv: sv[1], reverse=True)
    return [step for step, _ in ordered[:keep_best]]


def _run(root, events: list[tuple[int, float | None]], keep_best: int, keep_last: int) -> BestCheckpoints:
    """A phase's checkpoint directory through ``events`` (step, validation value or None for a plain
    save), as the trainer and the loop handle them; after each, what is on disk is checked."""
    best = BestCheckpoints(root, metric="avg_at_k", keep_best=keep_best, keep_last=keep_last)
    history, saved = [], []
    for step, value in events:
        target = root / f"step_{step:07d}"
        target.mkdir()
        saved.append(step)
        # Trainer.save_checkpoint prunes with the best set protected
        prune_checkpoints(root, keep_last, {target.name, *best.names})
        if value is not None:
            history.append((step, value))
            best.add(step, target, _values(value))
        expected = set(_expected_best(history, keep_best)) | set(saved[-keep_last:])
        assert _on_disk(root) == expected, (step, sorted(_on_disk(root)), sorted(expected))
        assert [e["step"] for e in best.entries] == _expected_best(history, keep_best)
    return best


def test_rank_best_prefers_higher_values_then_earlier_steps():
    entries = [{"step": s, "value": v} for s, v in [(4, 60.0), (1, 50.0), (3, 60.0), (2, 10.0), (5, 60.0)]]
    kept, dropped = rank_best(entries, 2)
    assert [e["step"] for e in kept] == [3, 4]
    assert [e["step"] for e in dropped] == [5, 1, 2]
    assert [e["step"] for e in rank_best(entries, 10)[0]] == [3, 4, 5, 1, 2]


@pytest.mark.parametrize("keep_best,keep_last", [(1, 1), (2, 1), (3, 2), (2, 4)])
def test_keeps_exactly_the_best_k_and_what_keep_last_wants(tmp_path, keep_best, keep_last):
    # ties (25 at 2 and 6, 50 at 4 and 8), a late best, a late worst, plain saves in between
    events = [(1, None), (2, 25.0), (3, None), (4, 50.0), (6, 25.0), (7, None), (8, 50.0), (10, 75.0), (12, 0.0)]
    best = _run(tmp_path, events, keep_best, keep_last)
    validated = [(s, v) for s, v in events if v is not None]
    winners = _expected_best(validated, keep_best)
    saved = [s for s, _ in events]
    assert _on_disk(tmp_path) == set(winners) | set(saved[-keep_last:])
    record = json.loads((tmp_path / BEST_FILE).read_text())
    assert record["metric"] == "avg_at_k" and record["keep_best"] == keep_best
    assert [(e["step"], e["checkpoint"], e["value"]) for e in record["checkpoints"]] == [
        (s, f"step_{s:07d}", dict(validated)[s]) for s in winners]
    assert all((tmp_path / e["checkpoint"]).is_dir() for e in record["checkpoints"])
    assert best.names == {f"step_{s:07d}" for s in winners}


def test_a_checkpoint_leaving_the_best_set_survives_only_while_keep_last_wants_it(tmp_path):
    best = BestCheckpoints(tmp_path, metric="avg_at_k", keep_best=1, keep_last=2)
    for step, value, on_disk in [(2, 50.0, {2}), (4, 60.0, {2, 4}), (6, 10.0, {4, 6}), (8, 5.0, {4, 6, 8})]:
        (tmp_path / f"step_{step:07d}").mkdir()
        deleted = best.add(step, tmp_path / f"step_{step:07d}", _values(value))
        assert _on_disk(tmp_path) == on_disk, step
        assert all(not p.exists() for p in deleted)
    # 6 was never best: keep_last (2) still wanted it after step 8 (6 and 8 are the newest)
    assert [e["step"] for e in best.entries] == [4]


def test_pass_at_k_ranks_by_its_own_value(tmp_path):
    best = BestCheckpoints(tmp_path, metric="pass_at_k", keep_best=1, keep_last=1)
    for step, value in [(1, 90.0), (2, 10.0)]:  # pass_at_k = 100 - value: step 2 is the better one
        (tmp_path / f"step_{step:07d}").mkdir()
        best.add(step, tmp_path / f"step_{step:07d}", _values(value))
    assert [(e["step"], e["value"]) for e in best.entries] == [(2, 90.0)]
    assert _on_disk(tmp_path) == {2}


def test_a_resumed_run_continues_the_saved_set(tmp_path):
    _run(tmp_path, [(2, 30.0), (4, 80.0), (6, 60.0), (8, 70.0)], keep_best=3, keep_last=1)
    assert _on_disk(tmp_path) == {4, 6, 8}
    # resumed from step 6 (say 8's save was lost): 8 is trained again, so its entry is dropped
    resumed = BestCheckpoints(tmp_path, metric="avg_at_k", keep_best=3, keep_last=1, resumed_step=6)
    assert [e["step"] for e in resumed.entries] == [4, 6]
    resumed.add(8, tmp_path / "step_0000008", _values(10.0))  # step 8 again, now worse
    (tmp_path / "step_0000010").mkdir()
    resumed.add(10, tmp_path / "step_0000010", _values(90.0))
    assert [e["step"] for e in resumed.entries] == [10, 4, 6]
    assert _on_disk(tmp_path) == {4, 6, 10}
    # a directory that is gone cannot be kept
    (tmp_path / "step_0000004").rename(tmp_path / "elsewhere")
    def reload(**kwargs):
        return [e["step"] for e in BestCheckpoints(tmp_path, keep_last=1, resumed_step=10, **kwargs).entries]
    assert reload(metric="avg_at_k", keep_best=3) == [10, 6]
    # another metric or a smaller keep_best re-ranks what was saved (pass_at_k = 100 - value here)
    assert reload(metric="pass_at_k", keep_best=1) == [6]
    # a fresh run (step 0) starts empty whatever an earlier run left
    assert BestCheckpoints(tmp_path, metric="avg_at_k", keep_best=3, keep_last=1).entries == []


@pytest.mark.parametrize("interval,before,after,last,due", [
    (0, 1, 2, True, False),     # off, even at the last step
    (2, 0, 1, False, False),
    (2, 1, 2, False, True),
    (2, 2, 3, False, False),
    (2, 4, 5, True, True),      # the last step always validates
    (4, 2, 5, False, True),     # several optimizer steps per rollout step crossing a multiple
    (4, 4, 7, False, False),
])
def test_validation_is_due_at_multiples_of_the_interval_and_at_the_last_step(interval, before, after, last, due):
    assert validation_due(interval, before, after, last) is due
