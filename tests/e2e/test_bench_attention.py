"""tools/bench_attention.py runs end to end (on CPU: the --tiny smoke run) and reports both implementations."""

import json
import subprocess
import sys

from helpers import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "bench_attention.py"


def test_cpu_smoke_run_reports_both_implementations(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--tiny", "--iters", "1", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    measured = {(r["impl"], r["seq_len"]) for r in report["rows"] if r["median_ms"] is not None and r["tflops"] > 0}
    assert measured == {(impl, seq) for impl in ("sdpa", "unfused") for seq in (64, 256)}
    assert "| 256 | sdpa |" in result.stdout and "x |" in result.stdout  # the table with the speed-up column
