"""The product end to end, as a user runs it: `sdzero demo --quick` (step 0, SRT, SD-Zero, the
baselines, evaluation, the comparison table) and `sdzero run examples/tiny_cpu.yaml` at TP=1 and
at TP=2 x DP=1 (two gloo processes under torchrun), from the demo's base model.

The demo trains its base once per test session (module fixture); quality is not asserted, since
the table is a measurement, but its completeness, its budget accounting and the files are.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

TINY = REPO_ROOT / "examples" / "tiny_cpu.yaml"
# small enough for CI: a handful of questions and steps per stage
RUN_OVERRIDES = [
    "data.phase1_questions=16", "data.phase2_questions=16", "srt_train.epochs=1",
    "distill.prompts_per_step=8", "distill.global_batch_size=8", "distill.micro_batch_size=4", "logging.progress=false",
]
COLUMNS = ("run", "avg@4", "pass@4", "first acc", "revised acc", "correction rate", "mean length", "generations")
ROWS = ("base", "SRT (Phase 1)", "SD-Zero", "Phase 2 only", "SDFT", "RFT", "GRPO")


def _env() -> dict:
    # the kernels' Triton interpreter is far too slow for whole phases on CPU: the torch backend
    # (tested against it in test_kernels.py) runs them
    return {**os.environ, "SDZERO_KERNELS_BACKEND": "torch", "PYTHONWARNINGS": "ignore"}


def _sdzero(*args, launcher=(sys.executable, "-m")) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "sdzero_mcore.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO_ROOT, env=_env(), timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = _sdzero("demo", "--quick", "--out-dir", out, "logging.progress=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def test_quick_demo_prints_the_full_table(demo):
    out, stdout = demo
    table = (out / "results.md").read_text()
    assert table.splitlines()[0].startswith("# sdzero demo --quick")
    header = next(line for line in table.splitlines() if line.startswith("| run"))
    for column in COLUMNS:
        assert column in header, column
    for row in ROWS:
        assert f"| {row} |" in table and f"| {row} |" in stdout, row
    runs = {json.loads((d / "eval.json").read_text())["name"]: json.loads((d / "eval.json").read_text())
            for d in (out / "eval").iterdir()}
    assert set(runs) == set(ROWS)
    for name, run in runs.items():
        for value in (run["avg_at_k"], run["pass_at_k"], run["mean_response_tokens"],
                      run["revise"]["first_accuracy"], run["revise"]["revised_accuracy"]):
            assert math.isfinite(value), name
        assert run["pass_at_k"] >= run["avg_at_k"] - 1e-9  # pass@k >= avg@k on the same samples
        assert run["questions"] == 32 and run["k"] == 4
        assert (out / "eval" / next(p.name for p in (out / "eval").iterdir()
                                    if json.loads((p / "eval.json").read_text())["name"] == name) / "localization.png").is_file()


def test_quick_demo_budgets_add_up(demo):
    out, _ = demo
    runs = {json.loads((d / "eval.json").read_text())["name"]: json.loads((d / "eval.json").read_text())
            for d in (out / "eval").iterdir()}
    collect = json.loads((out / "sd_zero" / "srt_collect" / "summary.json").read_text())
    # Phase 1: n_init = 1 attempt and n_rev = 3 revisions per question; Phase 2: one sample per question per epoch
    assert collect["generations"] == 32 * (1 + 3)
    assert runs["SRT (Phase 1)"]["budget"]["generations"] == collect["generations"]
    assert runs["SD-Zero"]["budget"]["generations"] == collect["generations"] + 32
    assert runs["Phase 2 only"]["budget"]["generations"] == runs["SDFT"]["budget"]["generations"] == 32
    sd_zero = runs["SD-Zero"]["budget"]["generations"]
    assert runs["RFT"]["budget"]["generations"] == sd_zero // 4 * 4  # whole questions of 4 samples
    assert runs["GRPO"]["budget"]["generations"] == sd_zero // 32 * 32  # whole steps of 8 prompts x 4
    assert runs["base"]["budget"]["generations"] == 0
    for name, run in runs.items():  # tokens: the sum of every generated response's length
        assert run["budget"]["generated_tokens"] >= run["budget"]["generations"], name
    metrics = [json.loads(line) for line in (out / "grpo" / "metrics" / "grpo.jsonl").read_text().splitlines()]
    assert metrics[-1]["generations"] == runs["GRPO"]["budget"]["generations"]
    assert sum(1 for _ in metrics) == sd_zero // 32


def test_quick_demo_resumes_without_redoing_stages(demo):
    out, _ = demo
    before = {p: p.stat().st_mtime_ns for p in out.rglob("eval.json")}
    result = _sdzero("demo", "--quick", "--out-dir", out, "logging.progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done in" not in result.stdout.replace("sd_zero done in", "")  # only the skip-check of sd_zero runs
    assert {p: p.stat().st_mtime_ns for p in out.rglob("eval.json")} == before


@pytest.mark.parametrize("tp", [1, 2])
def test_sdzero_run_end_to_end(demo, tmp_path, tp):
    out, _ = demo
    base = out / "base" / "checkpoints" / "sft"  # a phase directory resolves to its newest checkpoint
    args = ["run", TINY, "--init-from", base, f"output_dir={tmp_path}", f"parallel.tensor_model_parallel_size={tp}", *RUN_OVERRIDES]
    launcher = (sys.executable, "-m") if tp == 1 else (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m")
    result = _sdzero(*args, launcher=launcher)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "srt_collect" / "summary.json").read_text())
    assert summary["questions"] == 16 and summary["kept"] > 0
    srt = [json.loads(line) for line in (tmp_path / "metrics" / "srt.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss_revision"]) and math.isfinite(m["loss_generation"]) for m in srt)
    distill = [json.loads(line) for line in (tmp_path / "metrics" / "distill.jsonl").read_text().splitlines()]
    assert len(distill) == 2 and all(math.isfinite(m["kl_per_token"]) for m in distill)
    for m in srt + distill:  # every step logs its wall time and throughput
        assert m["step_time_s"] > 0 and m["tokens_per_s"] > 0
    assert distill[-1]["generations"] == 16
    for name in ("base", "srt", "sd_zero"):
        assert 0.0 <= json.loads((tmp_path / "eval" / f"{name}.json").read_text())["accuracy"] <= 1.0
    from sdzero_mcore.checkpoint.mcore_io import read_checkpoint_meta
    from sdzero_mcore.checkpoint.source import final_checkpoint

    final = final_checkpoint(tmp_path / "checkpoints" / "distill")
    assert read_checkpoint_meta(final)["tensor_parallel_size"] == tp
