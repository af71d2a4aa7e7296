"""tools/bench_kernels.py runs end to end (on CPU: the --tiny smoke run) and reports every comparison."""

import json
import os
import subprocess
import sys

from helpers import REPO_ROOT

TOOL = REPO_ROOT / "tools" / "bench_kernels.py"


def test_cpu_smoke_run_reports_every_op(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # the CPU path proper
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--device", "cpu", "--tiny", "--no-compile", "--iters", "1", "--warmup", "0",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    measured = {(r["vocab"], r["op"], r["impl"]) for r in report["results"] if r["median_ms"] is not None}
    for vocab in (1000, 320):
        for op in ("teacher_topk", "topk_kl renorm", "topk_kl bucket", "full_kl reverse"):
            for impl in ("sdzero", "eager", "chunked fp32 (1024)"):
                assert (vocab, op, impl) in measured, (vocab, op, impl)
    assert report["copy_gbps"] > 0
    assert "| 1000 | topk_kl bucket | sdzero |" in result.stdout  # the markdown table is printed
