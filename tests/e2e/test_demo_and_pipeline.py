"""The product end to end, as a user runs it: `sdzero demo --quick --recipe paper` (step 0, SRT,
SD-Zero, the baselines, evaluation, the comparison table) and `sdzero run examples/tiny_cpu.yaml`
at TP=1 and at TP=2 x DP=1 (two gloo processes under torchrun), from the demo's base model.

The demo trains its base once per test session (module fixture); quality is not asserted, since
the table is a measurement, but its completeness, its budget accounting and the files are. One
recipe keeps CI short: the paper's, the cheaper one (one attempt per question, one SRT stage). The
release recipe's own steps are tested one by one: collection in test_collect_recipes.py, the
sequential SRT stages in test_srt_phase.py, Phase 2 validation in test_distill_validation.py.
"""

import json
import math
import os
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

# The quick demo is the suite's longest job (about 5 minutes on 2 idle cores, longer beside the
# other pytest-xdist worker): its fixture gets more than the suite's 900 s.
DEMO_TIMEOUT_S = 2400
pytestmark = pytest.mark.timeout(DEMO_TIMEOUT_S)

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
                          cwd=REPO_ROOT, env=_env(), timeout=DEMO_TIMEOUT_S)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = _sdzero("demo", "--quick", "--recipe", "paper", "--out-dir", out, "logging.progress=false")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result.stdout


def _arm_runs(arm):
    return {json.loads((d / "eval.json").read_text())["name"]: json.loads((d / "eval.json").read_text())
            for d in (arm / "eval").iterdir()}


def test_quick_demo_prints_the_table_premise_and_claims(demo):
    out, stdout = demo
    report = (out / "results.md").read_text()
    assert report.splitlines()[0] == "# sdzero demo --quick --recipe paper --seed 1234"
    for recipe in ("paper",):
        section = report.split(f"## recipe: {recipe}")[1].split("## recipe:")[0]
        header = next(line for line in section.splitlines() if line.startswith("| run"))
        for column in COLUMNS:
            assert column in header, column
        for row in ROWS:
            assert f"| {row} |" in section, (recipe, row)
        for needle in ("correction rate after a wrong first attempt: base", "top 5% of tokens",
                       "Phase 1 beats RFT (avg@k): one seed", "SRT raises the correction rate",
                       "held-out validation loss, sd_zero/"):
            assert needle in section, (recipe, needle)
        runs = _arm_runs(out / recipe / "seed1234")
        assert set(runs) == set(ROWS)
        for name, run in runs.items():
            for value in (run["avg_at_k"], run["pass_at_k"], run["mean_response_tokens"],
                          run["revise"]["first_accuracy"], run["revise"]["revised_accuracy"]):
                assert math.isfinite(value), name
            assert run["pass_at_k"] >= run["avg_at_k"] - 1e-9  # pass@k >= avg@k on the same samples
            assert run["questions"] == 16 and run["k"] == 4
    assert report.split("## recipe: paper")[1].split("\n")[0] in stdout
    # one base per recipe (its prompt layouts), shared by the recipe's seeds
    for recipe in ("paper",):
        assert _arm_runs(out / recipe / "seed1234")["base"]["checkpoint"].startswith(str(out / recipe / "base"))
    assert (out / "results.json").is_file()


def test_quick_demo_follows_the_paper_recipe(demo):
    out, _ = demo
    paper = out / "paper" / "seed1234"
    # the paper's SRT is one joint stage (the release's two sequential ones: test_srt_phase.py)
    assert (paper / "sd_zero" / "metrics" / "srt.jsonl").is_file()
    assert not (paper / "sd_zero" / "metrics" / "srt_generation.jsonl").exists()
    paper_log = [json.loads(line) for line in (paper / "sd_zero" / "srt_collect" / "srt_records.jsonl").read_text().splitlines()]
    assert all(len(r["attempts"]) == 1 for r in paper_log if r["type"] == "done")
    # the paper does not validate Phase 2 (the release does: test_distill_validation.py)
    paper_distill = [json.loads(line) for line in (paper / "sd_zero" / "metrics" / "distill.jsonl").read_text().splitlines()]
    assert paper_distill and not any("val/avg_at_k" in m for m in paper_distill)
    # SRT and RFT log a held-out validation loss before training and at the end
    srt = [json.loads(line) for line in (paper / "sd_zero" / "metrics" / "srt.jsonl").read_text().splitlines()]
    assert "val_loss_before" in srt[0] and "val_loss" in srt[-1]


def test_quick_demo_budgets_add_up(demo):
    out, _ = demo
    for recipe in ("paper",):
        arm = out / recipe / "seed1234"
        runs = _arm_runs(arm)
        collect = json.loads((arm / "sd_zero" / "srt_collect" / "summary.json").read_text())
        log = [json.loads(line) for line in (arm / "sd_zero" / "srt_collect" / "srt_records.jsonl").read_text().splitlines()]
        # every attempt and every revision the log holds, nothing else
        assert collect["generations"] == sum(len(r["attempts"]) for r in log if r["type"] == "done") + \
            sum(1 for r in log if r["type"] == "revision")
        assert runs["SRT (Phase 1)"]["budget"]["generations"] == collect["generations"]
        assert runs["SD-Zero"]["budget"]["generations"] == collect["generations"] + 32  # one sample per Phase 2 question
        assert runs["Phase 2 only"]["budget"]["generations"] == runs["SDFT"]["budget"]["generations"] == 32
        sd_zero = runs["SD-Zero"]["budget"]["generations"]
        # whole questions of 4 samples, at most every question of both phases (256 + 32)
        assert runs["RFT"]["budget"]["generations"] == min(sd_zero // 4, 288) * 4
        assert runs["GRPO"]["budget"]["generations"] == sd_zero // 64 * 64  # whole steps of 16 prompts x 4
        assert runs["base"]["budget"]["generations"] == 0
        for name, run in runs.items():  # tokens: the sum of every generated response's length
            assert run["budget"]["generated_tokens"] >= run["budget"]["generations"], name


def test_quick_demo_resumes_without_redoing_stages(demo):
    out, _ = demo
    before = {p: p.stat().st_mtime_ns for p in out.rglob("eval.json")}
    result = _sdzero("demo", "--quick", "--recipe", "paper", "--out-dir", out, "logging.progress=false")
    assert result.returncode == 0, result.stderr[-3000:]
    redone = [line for line in result.stdout.splitlines() if "done in" in line and not line.endswith("sd_zero done in 0 s")]
    assert all(" sd_zero done in" in line for line in redone), redone  # only the skip-check of sd_zero runs
    assert {p: p.stat().st_mtime_ns for p in out.rglob("eval.json")} == before


@pytest.mark.parametrize("tp", [1, 2])
def test_sdzero_run_end_to_end(demo, tmp_path, tp):
    out, _ = demo
    base = out / "paper" / "base" / "checkpoints" / "sft"  # a phase directory resolves to its newest checkpoint
    args = ["run", TINY, "--init-from", base, f"output_dir={tmp_path}", f"parallel.tensor_model_parallel_size={tp}", *RUN_OVERRIDES]
    launcher = (sys.executable, "-m") if tp == 1 else (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m")
    result = _sdzero(*args, launcher=launcher)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp_path / "srt_collect" / "summary.json").read_text())
    assert summary["questions"] == 16 and summary["kept"] > 0
    # the paper recipe (tiny_cpu.yaml's): one attempt per question, one joint SRT stage, no Phase 2 validation
    log = [json.loads(line) for line in (tmp_path / "srt_collect" / "srt_records.jsonl").read_text().splitlines()]
    assert all(len(r["attempts"]) == 1 for r in log if r["type"] == "done")
    assert not (tmp_path / "metrics" / "srt_generation.jsonl").exists()
    srt = [json.loads(line) for line in (tmp_path / "metrics" / "srt.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["loss_revision"]) and math.isfinite(m["loss_generation"]) for m in srt)
    distill = [json.loads(line) for line in (tmp_path / "metrics" / "distill.jsonl").read_text().splitlines()]
    assert len(distill) == 2 and all(math.isfinite(m["kl_per_token"]) for m in distill)
    assert not any("val/avg_at_k" in m for m in distill)
    for m in srt + distill:  # every step logs its wall time and throughput
        assert m["step_time_s"] > 0 and m["tokens_per_s"] > 0
    assert distill[-1]["generations"] == 16
    for name in ("base", "srt", "sd_zero"):
        assert 0.0 <= json.loads((tmp_path / "eval" / f"{name}.json").read_text())["accuracy"] <= 1.0
    from sdzero_mcore.checkpoint.mcore_io import read_checkpoint_meta
    from sdzero_mcore.checkpoint.source import final_checkpoint

    final = final_checkpoint(tmp_path / "checkpoints" / "distill")
    assert read_checkpoint_meta(final)["tensor_parallel_size"] == tp
