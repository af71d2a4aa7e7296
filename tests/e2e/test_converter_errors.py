"""Every converter error path: a clear message naming the problem, and nothing half-written left behind."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT
from safetensors.torch import load_file, save_file

from sdzero_mcore.checkpoint.atomic import OutputExistsError, staged_output_dir
from sdzero_mcore.checkpoint.convert import hf_to_mcore, mcore_to_hf, parse_size
from sdzero_mcore.checkpoint.convert import main as convert_main
from sdzero_mcore.checkpoint.hf_io import CheckpointError
from sdzero_mcore.checkpoint.mcore_io import read_checkpoint_meta
from sdzero_mcore.models.tiny import save_tiny_hf_model


@pytest.fixture(scope="module")
def sharded_hf(tmp_path_factory):
    """A tiny Qwen3 checkpoint split into several shards with an index (read-only: copy to modify)."""
    path = save_tiny_hf_model(tmp_path_factory.mktemp("sharded") / "hf", max_shard_size="200KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture
def hf_copy(sharded_hf, tmp_path):
    import shutil

    return Path(shutil.copytree(sharded_hf, tmp_path / "hf"))


@pytest.fixture(scope="module")
def converted_tp1(sharded_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "mcore"
    hf_to_mcore(sharded_hf, out, 1, progress=False)
    return out


def _shards(hf_dir: Path) -> list[Path]:
    return sorted(hf_dir.glob("model-*.safetensors"))


def _assert_nothing_written(out_dir: Path):
    assert not out_dir.exists()
    assert not list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")), "staging directory left behind"


def test_missing_shard(hf_copy, tmp_path):
    victim = _shards(hf_copy)[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"shard {victim.name} is missing"):
        hf_to_mcore(hf_copy, tmp_path / "out", 1, progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_corrupt_shard_header(hf_copy, tmp_path):
    victim = _shards(hf_copy)[0]
    data = bytearray(victim.read_bytes())
    data[8:16] = b"\x00garbage"
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{victim.name}: corrupt safetensors header"):
        hf_to_mcore(hf_copy, tmp_path / "out", 1, progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_truncated_shard(hf_copy, tmp_path):
    victim = _shards(hf_copy)[-1]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: truncated: tensor '.+' needs"):
        hf_to_mcore(hf_copy, tmp_path / "out", 1, progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_index_points_to_wrong_shard(hf_copy, tmp_path):
    index_path = hf_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first, second = _shards(hf_copy)[:2]
    name = next(n for n, f in index["weight_map"].items() if f == first.name)
    index["weight_map"][name] = second.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"'{name}' is mapped to {second.name}, which does not contain it"):
        hf_to_mcore(hf_copy, tmp_path / "out", 1, progress=False)


def test_shape_that_does_not_match_config(hf_copy, tmp_path):
    config = json.loads((hf_copy / "config.json").read_text())
    config["intermediate_size"] = 128  # the stored MLP matrices are 96 wide
    (hf_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"tensor 'model.layers.\d+.mlp.\w+_proj.weight' has shape \[96, 64\], but .*config.json implies \[128, 64\]"):
        hf_to_mcore(hf_copy, tmp_path / "out", 1, progress=False)
    _assert_nothing_written(tmp_path / "out")


def _rewrite_shard_holding(hf_dir: Path, name: str, edit):
    index_path = hf_dir / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    path = hf_dir / index["weight_map"][name]
    tensors = load_file(str(path))
    edit(tensors, index["weight_map"], path.name)
    save_file(tensors, str(path), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))


def test_missing_tensor(hf_copy, tmp_path):
    name = "model.layers.1.self_attn.q_norm.weight"

    def drop(tensors, weight_map, _):
        del tensors[name], weight_map[name]

    _rewrite_shard_holding(hf_copy, name, drop)
    with pytest.raises(CheckpointError, match=rf"missing tensors '{name}' that .*config.json requires"):
        hf_to_mcore(hf_copy, tmp_path / "out", 1, progress=False)


def test_unexpected_tensor(hf_copy, tmp_path):
    def add(tensors, weight_map, file):
        tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
        weight_map["model.layers.0.self_attn.o_proj.bias"] = file

    _rewrite_shard_holding(hf_copy, "model.layers.0.self_attn.o_proj.weight", add)
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.o_proj.bias' are not part of the architecture"):
        hf_to_mcore(hf_copy, tmp_path / "out", 1, progress=False)


def test_no_safetensors_weights(tmp_path):
    hf_dir = tmp_path / "hf"
    save_tiny_hf_model(hf_dir)
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no safetensors weights .*found pytorch_model.bin"):
        hf_to_mcore(hf_dir, tmp_path / "out", 1, progress=False)


@pytest.mark.parametrize("tp, named", [(3, "num_attention_heads=4 and num_key_value_heads=2"), (4, "num_key_value_heads=2;")])
def test_tp_that_does_not_divide_heads_or_groups(sharded_hf, tmp_path, tp, named):
    with pytest.raises(ValueError, match=f"tensor-parallel size {tp} does not divide {named}"):
        hf_to_mcore(sharded_hf, tmp_path / "out", tp, progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_pp_that_does_not_divide_the_layers(sharded_hf, tmp_path, capsys):
    code = convert_main(["hf-to-mcore", "--hf-dir", str(sharded_hf), "--out-dir", str(tmp_path / "o"), "--pp", "3"])
    assert code == 2
    assert "pipeline-parallel size 3 does not divide num_hidden_layers=2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any process started


def test_existing_checkpoint_is_refused_unless_overwrite(sharded_hf, converted_tp1, tmp_path):
    import shutil

    out = Path(shutil.copytree(converted_tp1, tmp_path / "mcore"))
    with pytest.raises(OutputExistsError, match="already holds a checkpoint; pass --overwrite"):
        hf_to_mcore(sharded_hf, out, 2, progress=False)
    assert read_checkpoint_meta(out)["tensor_parallel_size"] == 1  # untouched
    hf_to_mcore(sharded_hf, out, 2, overwrite=True, progress=False)
    assert read_checkpoint_meta(out)["tensor_parallel_size"] == 2
    assert not list(tmp_path.glob(".mcore.*")), "staging or old checkpoint left behind"


def test_output_that_is_not_a_checkpoint_is_never_replaced(sharded_hf, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="holds no checkpoint; refusing"):
            hf_to_mcore(sharded_hf, out, 1, overwrite=overwrite, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="is not a directory"):
        hf_to_mcore(sharded_hf, tmp_path / "file", 1, progress=False)
    assert (out / "todo.txt").read_text() == "mine"


def test_mcore_to_hf_refuses_incomplete_or_missing_checkpoints(converted_tp1, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        mcore_to_hf(tmp_path / "nowhere", tmp_path / "out", progress=False)
    import shutil

    partial = Path(shutil.copytree(converted_tp1, tmp_path / "partial"))
    (partial / "sdzero_checkpoint.json").unlink()  # what an interrupted save looks like
    with pytest.raises(CheckpointError, match="not a complete sdzero-mcore checkpoint"):
        mcore_to_hf(partial, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_mcore_to_hf_refuses_existing_hf_output_unless_overwrite(converted_tp1, sharded_hf, tmp_path):
    out = tmp_path / "hf_out"
    mcore_to_hf(converted_tp1, out, max_shard_bytes=150_000, progress=False)
    shards = _shards(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    for shard in shards:
        tensors = load_file(str(shard))
        assert all(index["weight_map"][name] == shard.name for name in tensors)
        # a shard only exceeds the bound when it holds a single tensor larger than it
        assert sum(t.numel() * t.element_size() for t in tensors.values()) <= 150_000 or len(tensors) == 1
    with pytest.raises(OutputExistsError, match="already holds a checkpoint"):
        mcore_to_hf(converted_tp1, out, progress=False)
    mcore_to_hf(converted_tp1, out, overwrite=True, progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    original = {}
    for shard in _shards(sharded_hf):
        original.update(load_file(str(shard)))
    back = load_file(str(out / "model.safetensors"))
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in original)


def test_staged_output_dir_publishes_only_on_success(tmp_path):
    holds = lambda path: (path / "done").exists()  # noqa: E731
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output_dir(tmp_path / "out", False, holds) as staging:
            (staging / "half").write_text("x")
            raise RuntimeError("boom")
    _assert_nothing_written(tmp_path / "out")
    with staged_output_dir(tmp_path / "out", False, holds) as staging:
        (staging / "done").write_text("1")
    assert (tmp_path / "out" / "done").read_text() == "1"
    with staged_output_dir(tmp_path / "out", True, holds) as staging:
        (staging / "done").write_text("2")
    assert (tmp_path / "out" / "done").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_killed_conversion_leaves_no_checkpoint(sharded_hf, tmp_path):
    """SIGKILL mid-conversion: the output path does not appear, and the staging dir is not a checkpoint."""
    out = tmp_path / "mcore"
    process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tools" / "convert_checkpoint.py"), "hf-to-mcore",
         "--hf-dir", str(sharded_hf), "--out-dir", str(out), "--tp", "2", "--no-progress"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + 120
    while not list(tmp_path.glob(".mcore.tmp-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    staging = list(tmp_path.glob(".mcore.tmp-*"))
    assert len(staging) == 1 and not out.exists()
    with pytest.raises(CheckpointError, match="not a complete"):
        read_checkpoint_meta(staging[0])


def test_cli_reports_errors_in_one_line(sharded_hf, tmp_path, capsys):
    code = convert_main(["hf-to-mcore", "--hf-dir", str(sharded_hf), "--out-dir", str(tmp_path / "o"), "--tp", "3"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: tensor-parallel size 3 does not divide") and err.count("\n") == 1
    assert convert_main(["mcore-to-hf", "--mcore-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "megatron checkpoint directory does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 2**30), ("1234", 1234)])
def test_parse_size(text, size):
    assert parse_size(text) == size
    with pytest.raises(ValueError, match="cannot parse size"):
        parse_size("five gigs")
