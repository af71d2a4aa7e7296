"""Checks before work (issue 17): a bad top_k, output_dir or data row stops a command with one
line and exit code 2 before any model loads, and nothing is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from sdzero_mcore.cli import main
from sdzero_mcore.config import ConfigError, load_config
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.preflight import check_before_work, find_hf_files_dir

TINY_CONFIG = str(REPO_ROOT / "examples" / "tiny_cpu.yaml")
# Small enough that a command which wrongly gets past the checks ends soon instead of training.
SMALL = ["data.phase1_questions=2", "data.phase2_questions=2", "rollout.max_new_tokens=4", "srt_collect.max_new_tokens=4"]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("model") / "hf", vocab_size=128)


def _run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("command", ["distill", "run"])
def test_top_k_larger_than_the_vocabulary_fails_before_work(tmp_path, capsys, monkeypatch, tiny_hf, command):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    code, err = _run_cli(capsys, command, TINY_CONFIG, *SMALL, f"model.hf_dir={tiny_hf}", "distill.top_k=200",
                         f"output_dir={out}")
    assert code == 2
    assert _one_line(err) == (
        f"sdzero {command}: distill.top_k (200) is larger than the vocabulary (128 tokens in {tiny_hf}/config.json); "
        "set distill.top_k <= 128"
    )
    assert not out.exists()


@pytest.mark.parametrize("case", ["a file", "under a file", "empty"])
def test_unusable_output_dir_fails_before_work(tmp_path, capsys, monkeypatch, tiny_hf, case):
    monkeypatch.chdir(tmp_path)  # an empty output_dir used to mean: write into the current directory
    blocker = tmp_path / "blocker"
    blocker.write_text("not a directory")
    output_dir = {"a file": blocker, "under a file": blocker / "run", "empty": "''"}[case]
    code, err = _run_cli(capsys, "srt-collect", TINY_CONFIG, *SMALL, f"model.hf_dir={tiny_hf}", f"output_dir={output_dir}")
    assert code == 2
    expected = {
        "a file": f"output_dir: {blocker} exists and is not a directory",
        "under a file": f"output_dir: {blocker / 'run'} cannot be created: {blocker} is a file, not a directory",
        "empty": "output_dir: '' is empty; allowed: a directory path",
    }[case]
    assert _one_line(err) == f"sdzero srt-collect: {expected}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocker"] and blocker.read_text() == "not a directory"


def test_read_only_output_dir_fails_before_work(tmp_path, tiny_hf):
    """As root every directory is writable by permission bits, so the case is a read-only mount
    (in a private mount namespace of the command)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare for a read-only mount")
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    script = (
        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    )
    # --map-root-user makes the mount namespace available without root too.
    command = [unshare, "--mount", "--map-root-user", "sh", "-c", script, "sh", str(readonly), sys.executable, "-m",
               "sdzero_mcore.cli", "srt-collect", TINY_CONFIG, *SMALL, f"model.hf_dir={tiny_hf}",
               f"output_dir={readonly / 'run'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    if result.returncode != 2 and "mount" in result.stderr and "sdzero" not in result.stderr:
        pytest.skip(f"no read-only bind mount here: {result.stderr.strip()[-300:]}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert _one_line(result.stderr) == (
        f"sdzero srt-collect: output_dir: {readonly / 'run'} cannot be created: {readonly} is not writable (uid 0)"
    )
    assert list(readonly.iterdir()) == []


def test_bad_data_row_fails_before_work(tmp_path, capsys, monkeypatch, tiny_hf):
    monkeypatch.chdir(tmp_path)
    rows = [{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(4)] + [{"question": "nan?", "answer": float("nan")}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    out = tmp_path / "out"
    code, err = _run_cli(capsys, "srt-collect", TINY_CONFIG, *SMALL, f"model.hf_dir={tiny_hf}", f"data.dataset={data}",
                         f"output_dir={out}")
    assert code == 2
    assert _one_line(err).startswith(
        f"sdzero srt-collect: {data}: row 4 (line 5): field 'answer': the answer is nan, not a finite number"
    )
    assert not out.exists()


def test_long_prompts_are_counted_with_the_checkpoint_tokenizer(tmp_path, capsys, monkeypatch, tiny_hf):
    monkeypatch.chdir(tmp_path)
    rows = [{"question": f"{i}+1?", "answer": str(i + 1)} for i in range(4)] + [{"question": "7" * 600, "answer": "7"}]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    code, err = _run_cli(capsys, "srt-collect", TINY_CONFIG, *SMALL, f"model.hf_dir={tiny_hf}", f"data.dataset={data}",
                         "data.max_prompt_tokens=100", f"output_dir={tmp_path / 'out'}")
    assert code == 2
    assert "row 4 (line 5): field 'question': the prompt is" in _one_line(err)
    assert "over data.max_prompt_tokens (100) (set data.long_prompts=skip" in err
    assert not (tmp_path / "out").exists()


def test_checkpoint_layouts_are_found(tmp_path, tiny_hf):
    cfg = load_config(TINY_CONFIG, [f"model.hf_dir={tiny_hf}"])
    assert find_hf_files_dir(cfg, None) == tiny_hf
    phase_dir = tmp_path / "checkpoints" / "srt"
    shutil.copytree(tiny_hf, phase_dir / "step_000004" / "hf")
    (phase_dir / "latest").write_text("step_000004\n")
    assert find_hf_files_dir(cfg, str(phase_dir)) == phase_dir / "step_000004" / "hf"
    assert find_hf_files_dir(load_config(TINY_CONFIG), None) is None
    with pytest.raises(ConfigError, match="output_dir: .* is not a directory"):
        check_before_work(load_config(TINY_CONFIG, [f"output_dir={tiny_hf / 'config.json'}"]), "srt-train")
