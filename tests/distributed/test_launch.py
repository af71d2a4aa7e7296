"""run_local_workers: workers fork from a server that imported megatron-core once, yet each sees
what a freshly spawned worker would: the caller's environment at the call, its warning filters
(megatron-core's import notices shown or not by them), torchrun's variables, and its exceptions
raised in the caller."""

import json
import os
import sys
import warnings

import pytest

from sdzero_mcore.parallel import run_local_workers
from sdzero_mcore.parallel.forkserver_preload import IMPORT_WARNINGS, replay_import_warnings

NOTICE = r".*(Apex is|Transformer Engine and Apex are) not installed"


def _report_worker(out_dir: str) -> None:
    with warnings.catch_warnings(record=True) as shown:  # what the caller's filters let through
        replay_import_warnings()
    rank = os.environ["RANK"]
    report = {
        "marker": os.environ.get("SDZERO_LAUNCH_TEST"),
        "world": [os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")],
        "megatron_imported_before_fn": "megatron.core" in sys.modules,
        "shown": [str(w.message) for w in shown],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def _failing_worker() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank 1 found a bad shard")


def _reports(out_dir, nprocs):
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(nprocs)]


def test_workers_see_the_caller_environment_and_filters_of_each_call(tmp_path, monkeypatch):
    assert any("not installed" in str(w.message) for w in IMPORT_WARNINGS)  # what the replay can show
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()

    monkeypatch.setenv("SDZERO_LAUNCH_TEST", "first")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=NOTICE)
        run_local_workers(_report_worker, 2, str(first))
    # the fork server exists now: a later call's environment and filters still reach the workers
    monkeypatch.setenv("SDZERO_LAUNCH_TEST", "second")
    with warnings.catch_warnings():
        warnings.filterwarnings("always", message=NOTICE)
        run_local_workers(_report_worker, 2, str(second))

    for out, marker, notices_shown in ((first, "first", False), (second, "second", True)):
        reports = _reports(out, 2)
        assert [r["marker"] for r in reports] == [marker, marker]
        assert [r["world"] for r in reports] == [[str(r), str(r), "2", "127.0.0.1"] for r in range(2)]
        assert all(r["megatron_imported_before_fn"] for r in reports)  # preloaded by the server
        for report in reports:
            assert any("not installed" in m for m in report["shown"]) == notices_shown, report["shown"]


def test_a_worker_exception_is_raised_in_the_caller():
    with pytest.raises(Exception, match="rank 1 found a bad shard"):
        run_local_workers(_failing_worker, 2)
