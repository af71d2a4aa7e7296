"""The `sdzero` command as a user runs it: the console script, the converter CLI and the demo."""

import subprocess
import sys

from safetensors.torch import load_file

from sdzero_mcore.models.tiny import save_tiny_hf_model


def _sdzero(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "sdzero_mcore.cli", *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_version_and_help():
    result = _sdzero("--version")
    assert result.returncode == 0 and result.stdout.startswith("sdzero-mcore ")
    result = _sdzero("convert", "hf-to-mcore", "--help")
    assert result.returncode == 0 and "--tp" in result.stdout and "--overwrite" in result.stdout


def test_convert_round_trip_from_the_command_line(tmp_path):
    hf_dir = save_tiny_hf_model(tmp_path / "hf", "Qwen2ForCausalLM")
    result = _sdzero("convert", "hf-to-mcore", "--hf-dir", hf_dir, "--out-dir", tmp_path / "mcore", "--tp", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote Qwen2ForCausalLM megatron-core checkpoint" in result.stdout and "TP=2" in result.stdout
    assert "loading HF weights" in result.stderr  # progress is shown
    result = _sdzero("convert", "mcore-to-hf", "--mcore-dir", tmp_path / "mcore", "--out-dir", tmp_path / "back")
    assert result.returncode == 0, result.stderr[-2000:]
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "back/model.safetensors"))
    assert original.keys() == back.keys()
    result = _sdzero("convert", "mcore-to-hf", "--mcore-dir", tmp_path / "mcore", "--out-dir", tmp_path / "back")
    assert result.returncode == 2 and "already holds a checkpoint; pass --overwrite" in result.stderr
    assert "Traceback" not in result.stderr


def test_parity_demo_runs_and_passes(tmp_path):
    result = _sdzero("parity-demo", "--out-dir", tmp_path / "demo")
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    for line in ("logits vs transformers, TP=2", "logits vs transformers, TP=1", "24/24 tensors bit-exact"):
        assert line in result.stdout
    assert "FAIL" not in result.stdout and "demo passed" in result.stdout
    assert "Warning" not in result.stderr  # dependency noise is filtered for users
