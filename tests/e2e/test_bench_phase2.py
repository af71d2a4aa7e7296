"""tools/bench_phase2_step.py runs end to end (the --tiny smoke run): both heads measured in their own
processes, the same loss from both, the FLOP accounting of every part."""

import json
import os
import subprocess
import sys

from helpers import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "bench_phase2_step.py"


def test_tiny_run_measures_both_heads(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # the CPU path proper
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(TOOL), "--tiny", "--device", "cpu", "--iters", "1", "--warmup", "0",
                             "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    by_head = {r["head"]: r for r in report["results"]}
    assert set(by_head) == {"dense", "sparse"}
    for r in by_head.values():
        assert r["median_ms"] > 0 and r["working_gib"] > 0 and r["peak_rss_reset"]
    # the same micro-batch and weights: the same loss (float32 rounding apart)
    assert abs(by_head["sparse"]["loss_sum"] - by_head["dense"]["loss_sum"]) < 1e-5 * abs(by_head["dense"]["loss_sum"])
    flops = report["flops"]
    assert flops["student LM head (fwd+bwd)"]["sparse"] < flops["student LM head (fwd+bwd)"]["dense"] / 50
    assert flops["teacher trunk (fwd)"]["sparse"] == flops["teacher trunk (fwd)"]["dense"]
    assert "| sparse |" in result.stdout and "shape qwen3-4b" in result.stdout
