"""Phase 2 validation during training (``distill.validation``): run_distill on the tiny CPU config
validates every 2 steps and at the last, logs ``val/*`` in the step's metrics, and keeps the best
checkpoints by the metric beyond ``checkpoint.keep_last``, also across a resume."""

import json
from pathlib import Path

import pytest
from helpers import REPO_ROOT, VOCAB

from sdzero_mcore.config import load_config
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.parallel import run_local_workers

TINY = REPO_ROOT / "examples" / "tiny_cpu.yaml"
STEPS = 5
KEEP_BEST = 1  # of the validated 2, 4 and 5, at least one of 2 and 4 must then be deleted
OVERRIDES = [
    "distill.prompts_per_step=4", "distill.global_batch_size=4", "distill.micro_batch_size=4",
    "rollout.max_new_tokens=16", "distill.max_response_tokens=16", "logging.progress=false",
    "data.phase1_questions=8", "data.phase2_questions=16", f"distill.train_steps={STEPS}",
    "distill.validation.interval=2", "distill.validation.questions=4", "distill.validation.k=2",
    "distill.validation.max_new_tokens=16", f"distill.validation.keep_best={KEEP_BEST}",
    # keep_last alone would keep only the final checkpoint; step 3's plain save is pruned whatever the metrics
    "checkpoint.keep_last=1", "checkpoint.save_interval=3",
]
VAL_KEYS = ("val/avg_at_k", "val/pass_at_k", "val/mean_response_tokens")


@pytest.fixture(scope="module", autouse=True)
def torch_kernels():
    """The kernels' PyTorch path (Triton's CPU interpreter would take minutes); spawned ranks inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDZERO_KERNELS_BACKEND", "torch")
        yield


def validation_worker(hf_dir: str, run_dir: str, overrides: list, max_steps) -> None:
    from sdzero_mcore.phases.distill import run_distill

    run_distill(load_config(TINY, [f"output_dir={run_dir}", *OVERRIDES, *overrides]), hf_dir, max_steps=max_steps)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Stopped after step 2 (validated as that run's last step), then resumed to step 5: the resumed
    run must continue the best set, not start a new one (with the metrics tied, step 2 stays best)."""
    root = tmp_path_factory.mktemp("validation")
    hf_dir = save_tiny_hf_model(root / "hf", vocab_size=VOCAB)
    run_local_workers(validation_worker, 1, str(hf_dir), str(root / "run"), [], 2)
    best = json.loads((root / "run" / "checkpoints" / "distill" / "best_checkpoints.json").read_text())
    assert [entry["step"] for entry in best["checkpoints"]] == [2]
    run_local_workers(validation_worker, 1, str(hf_dir), str(root / "run"), ["checkpoint.resume=true"], None)
    return root / "run"


def _metrics(run: Path) -> dict[int, dict]:
    lines = (run / "metrics" / "distill.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def test_validation_metrics_at_every_interval_and_the_last_step(run):
    metrics = _metrics(run)
    assert sorted(metrics) == list(range(1, STEPS + 1))
    validated = sorted(step for step, m in metrics.items() if any(k.startswith("val/") for k in m))
    assert validated == [2, 4, 5]
    for step in validated:
        m = metrics[step]
        assert all(k in m for k in VAL_KEYS), m
        assert 0.0 <= m["val/avg_at_k"] <= m["val/pass_at_k"] <= 100.0
        assert 0 < m["val/mean_response_tokens"] <= 16
        # avg@k over 4 questions x 2 samples is a multiple of 100 / 8
        assert m["val/avg_at_k"] * 8 / 100 == pytest.approx(round(m["val/avg_at_k"] * 8 / 100))
    # validation samples are not training generations: 4 prompts x 1 sample per step
    assert metrics[STEPS]["generations"] == 4 * STEPS


def test_best_checkpoints_are_kept_and_the_others_pruned(run):
    metrics = _metrics(run)
    root = run / "checkpoints" / "distill"
    record = json.loads((root / "best_checkpoints.json").read_text())
    assert record["metric"] == "avg_at_k" and record["keep_best"] == KEEP_BEST
    values = {step: metrics[step]["val/avg_at_k"] for step in (2, 4, 5)}
    # higher first, the earlier step first among equals
    expected = sorted(values, key=lambda step: (-values[step], step))[:KEEP_BEST]
    assert [entry["step"] for entry in record["checkpoints"]] == expected
    for entry in record["checkpoints"]:
        step = entry["step"]
        assert entry["checkpoint"] == f"step_{step:07d}"
        assert (root / entry["checkpoint"] / "sdzero_checkpoint.json").is_file()
        assert entry["value"] == entry["avg_at_k"] == metrics[step]["val/avg_at_k"]
        assert entry["pass_at_k"] == metrics[step]["val/pass_at_k"]
    # on disk: the best, and the final one (keep_last=1); step 3 and the validated steps out of the best are gone
    on_disk = sorted(p.name for p in root.glob("step_*"))
    assert on_disk == sorted({f"step_{s:07d}" for s in expected} | {f"step_{STEPS:07d}"})
    assert len(on_disk) <= 2 and "step_0000003" not in on_disk
    final = json.loads((root / f"step_{STEPS:07d}" / "sdzero_checkpoint.json").read_text())
    assert final["final"]
