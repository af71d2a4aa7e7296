"""Tests for sdzero_mcore.config: loading, overrides, validation messages, saving, hashing, argparse."""

import argparse
import os
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from sdzero_mcore import fileio
from sdzero_mcore.config import (
    ConfigError,
    DistillConfig,
    OptimizerConfig,
    ParallelConfig,
    SDZeroConfig,
    add_config_args,
    config_from_args,
    config_hash,
    config_to_yaml,
    load_config,
    save_config,
)

EXAMPLES = REPO_ROOT / "examples"
PARALLEL_KEYS = (
    "backend, context_parallel_size, cp_comm_type, handoff_timeout_minutes, hierarchical_context_parallel_sizes, "
    "pipeline_model_parallel_size, tensor_model_parallel_size, timeout_minutes, virtual_pipeline_model_parallel_size"
)


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(*overrides: str, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# --- loading -----------------------------------------------------------------------------------


def test_defaults_load():
    cfg = load_config()
    assert cfg == SDZeroConfig()
    assert isinstance(cfg.distill, DistillConfig)
    assert cfg.parallel.tensor_model_parallel_size == 1
    assert cfg.data.eval_datasets == []
    assert cfg.srt_train.optimizer == OptimizerConfig(
        lr=5e-6, lr_schedule="cosine", warmup_ratio=0.05, weight_decay=1e-4, adam_beta1=0.9, adam_beta2=0.95
    )
    assert cfg.distill.optimizer == OptimizerConfig(
        lr=5e-6, lr_schedule="constant", warmup_steps=20, weight_decay=0.01, clip_grad=1.0
    )
    assert cfg.optimizer == OptimizerConfig()


def test_tiny_cpu_example():
    cfg = load_config(EXAMPLES / "tiny_cpu.yaml")
    assert (cfg.run_name, cfg.output_dir) == ("tiny-cpu", "runs/tiny-cpu")
    assert (cfg.model.dtype, cfg.model.transformer_impl, cfg.model.max_seq_length) == ("float32", "local", 512)
    assert (cfg.data.dataset, cfg.data.phase1_questions, cfg.data.phase2_questions) == ("synthetic:add", 64, 64)
    assert (cfg.rollout.backend, cfg.rollout.max_new_tokens) == ("hf", 160)
    assert cfg.srt_collect.max_new_tokens == 160
    assert (cfg.sft.noise, cfg.sft.revision_fraction, cfg.sft.examples, cfg.sft.epochs) == (0.3, 0.25, 4000, 6)
    srt = cfg.srt_train
    assert (srt.epochs, srt.global_batch_size, srt.micro_batch_size, srt.max_seq_length) == (2, 8, 8, 512)
    d = cfg.distill
    assert (d.prompts_per_step, d.global_batch_size, d.micro_batch_size, d.top_k) == (8, 8, 8, 16)
    assert (d.max_response_tokens, d.max_teacher_tokens, d.optimizer.lr) == (160, 512, 1e-4)
    assert (cfg.eval.k, cfg.eval.questions) == (4, 64)
    assert cfg.logging.tensorboard is False


def test_qwen3_release_example_is_the_release_recipe():
    cfg = load_config(EXAMPLES / "qwen3_4b_release.yaml")
    recipe_only = load_config(overrides=["recipe=release"])
    assert cfg.recipe == "release"
    assert (cfg.data.dataset, cfg.data.phase2_dataset) == ("open-r1/OpenR1-Math-220k", "agentica-org/DeepScaleR-Preview-Dataset")
    assert cfg.distill.validation.dataset == "HuggingFaceH4/aime_2024"
    # every method value the file writes out is the recipe's own default
    for section in ("srt_collect", "prompts", "math"):
        assert getattr(cfg, section) == getattr(recipe_only, section), section
    for key in ("kl", "mixed_weight", "top_k", "tail", "teacher_keeps_end_token", "max_teacher_tokens",
                "teacher_sync_at_epoch_end", "optimizer"):
        assert getattr(cfg.distill, key) == getattr(recipe_only.distill, key), key
    assert (cfg.srt_train.mode, cfg.srt_train.stage2_size) == ("sequential", 1000)
    assert cfg.srt_train.optimizer == recipe_only.srt_train.optimizer


def test_qwen3_example():
    cfg = load_config(EXAMPLES / "qwen3_4b_paper.yaml")
    assert cfg.model.hf_dir == "checkpoints/Qwen3-4B-Instruct-2507"
    assert cfg.model.mcore_dir == "checkpoints/Qwen3-4B-Instruct-2507-mcore-tp4"
    assert cfg.model.dtype == "bfloat16"
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.context_parallel_size) == (4, 1)
    assert cfg.data.dataset == "open-r1/OpenR1-Math-220k"
    assert (cfg.data.phase1_questions, cfg.data.phase2_questions) == (10000, 9000)
    assert (cfg.rollout.backend, cfg.rollout.sglang_tp_size, cfg.rollout.max_new_tokens) == ("sglang", 1, 16384)
    c = cfg.srt_collect
    assert (c.n_init, c.n_rev, c.temperature, c.max_new_tokens) == (1, 3, 0.7, 16384)
    s = cfg.srt_train
    assert (s.epochs, s.global_batch_size, s.micro_batch_size, s.max_seq_length) == (3, 4, 1, 32768)
    assert (s.optimizer.lr, s.optimizer.lr_schedule, s.optimizer.warmup_ratio, s.optimizer.weight_decay) == (
        5e-6, "cosine", 0.05, 1e-4
    )
    d = cfg.distill
    assert (d.prompts_per_step, d.global_batch_size, d.micro_batch_size, d.top_k) == (128, 128, 1, 64)
    assert (d.kl, d.tail, d.max_response_tokens, d.max_teacher_tokens) == ("reverse", "renorm", 8192, 20480)
    o = d.optimizer
    assert (o.lr, o.lr_schedule, o.warmup_steps, o.weight_decay, o.clip_grad) == (5e-6, "constant", 20, 0.01, 1.0)


def test_file_then_overrides_override_wins(tmp_path):
    path = write(tmp_path, "seed: 7\nrollout:\n  temperature: 0.6\n  top_p: 0.9\n")
    cfg = load_config(path, ["rollout.temperature=0.3", "seed=8"])
    assert cfg.seed == 8
    assert cfg.rollout.temperature == 0.3
    assert cfg.rollout.top_p == 0.9  # from the file, not overridden
    assert cfg.rollout.max_new_tokens == 8192  # default, in neither


def test_later_override_wins():
    assert load_config(overrides=["seed=1", "seed=2"]).seed == 2


def test_nested_override():
    cfg = load_config(overrides=["distill.optimizer.lr=1e-5"])
    assert cfg.distill.optimizer.lr == 1e-5
    assert cfg.srt_train.optimizer.lr == 5e-6
    assert cfg.optimizer.lr == 5e-6


def test_list_and_null_overrides():
    cfg = load_config(overrides=["data.eval_datasets=[gsm8k, math500]", "rollout.sglang_url=http://host:30000"])
    assert cfg.data.eval_datasets == ["gsm8k", "math500"]
    assert cfg.rollout.sglang_url == "http://host:30000"
    assert load_config(overrides=["rollout.sglang_url=null"]).rollout.sglang_url is None


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing set\n")) == SDZeroConfig()


# --- file and override syntax errors -----------------------------------------------------------


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert config_error(path=missing) == f"config file not found: {missing}"


def test_invalid_yaml_names_path_and_line(tmp_path):
    path = write(tmp_path, "seed: 1\nrollout:\n  top_p: [0.5\n  top_k: 3\n")
    message = config_error(path=path)
    assert message.startswith(f"invalid YAML in {path}: line 4, column")


def test_duplicate_yaml_key_is_invalid(tmp_path):
    path = write(tmp_path, "seed: 1\nseed: 2\n")
    message = config_error(path=path)
    assert message.startswith(f"invalid YAML in {path}: line 2")
    assert "found duplicate key seed" in message


@pytest.mark.parametrize("text", ["- seed\n- 1\n", "42\n", "just a string\n"])
def test_non_mapping_yaml(tmp_path, text):
    path = write(tmp_path, text)
    message = config_error(path=path)
    assert message == f"config file {path}: the top level must be a mapping of keys to values"


@pytest.mark.parametrize("override", ["seed", "=3"])
def test_override_without_key_value_form(override):
    message = config_error(override)
    assert repr(override) in message and "key=value" in message


def test_override_with_invalid_yaml_value():
    message = config_error("data.eval_datasets=[a, b")
    assert "data.eval_datasets=[a, b" in message and "not valid YAML" in message


# --- unknown keys and types --------------------------------------------------------------------


def test_unknown_nested_key_lists_section_keys():
    message = config_error("parallel.tp_size=2")
    assert f"unknown key 'parallel.tp_size'; allowed keys under 'parallel': {PARALLEL_KEYS}" in message


def test_unknown_top_level_key_lists_top_level_keys():
    message = config_error("tp=2")
    assert "unknown key 'tp'" in message
    assert "allowed top-level keys: checkpoint, data, distill, eval, grpo, logging, math, model, optimizer, output_dir" in message
    assert "did you mean" not in message


def test_unknown_key_did_you_mean():
    message = config_error("parallel.tensor_parallel_size=2")
    assert "did you mean 'parallel.tensor_model_parallel_size'?" in message


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    path = write(tmp_path, "distill:\n  optimizer:\n    learning_rate: 1.0e-5\n")
    message = config_error(path=path)
    assert str(path) in message
    assert "unknown key 'distill.optimizer.learning_rate'" in message
    assert "allowed keys under 'distill.optimizer': adam_beta1, adam_beta2, adam_eps, clip_grad, distributed, lr," in message


def test_wrong_type():
    message = config_error("parallel.tensor_model_parallel_size=two")
    assert "parallel.tensor_model_parallel_size: expected int, got 'two' (str)" in message


def test_wrong_type_in_file(tmp_path):
    path = write(tmp_path, "srt_train:\n  optimizer:\n    lr: fast\n")
    message = config_error(path=path)
    assert "srt_train.optimizer.lr: expected float, got 'fast' (str)" in message


def test_bool_for_int():
    message = config_error("distill.top_k=true")
    assert "distill.top_k: expected int, got True (bool)" in message


def test_scalar_for_list():
    message = config_error("data.eval_datasets=gsm8k")
    assert "data.eval_datasets: expected list of str, got 'gsm8k' (str)" in message


def test_scalar_for_section():
    message = config_error("parallel=2")
    assert "parallel: expected a mapping" in message and "tensor_model_parallel_size" in message


def test_no_omegaconf_traceback_leaks():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["parallel.tensor_model_parallel_size=two"])
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert "full_key" not in str(info.value)


# --- value validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, problem",
    [
        ("distill.kl=kll", "'kll' is not one of: reverse, forward, mixed"),
        ("model.dtype=fp8", "'fp8' is not one of: auto, bfloat16, float16, float32"),
        ("model.transformer_impl=te", "'te' is not one of: auto, local, transformer_engine"),
        ("parallel.backend=mpi", "'mpi' is not one of: auto, nccl, gloo"),
        ("parallel.cp_comm_type=ring", "'ring' is not one of: p2p, all_gather, a2a, a2a+p2p"),
        ("model.local_attention=flash", "'flash' is not one of: sdpa, unfused"),
        ("rollout.backend=vllm2", "'vllm2' is not one of: hf, sglang, vllm"),
        ("srt_train.mode=both", "'both' is not one of: joint, sequential"),
        ("distill.tail=drop", "'drop' is not one of: renorm, bucket"),
        ("distill.optimizer.lr_schedule=linear", "'linear' is not one of: cosine, constant"),
        ("math.extraction=last_number", "'last_number' is not one of: boxed, release"),
        ("math.extraction=Release", "'Release' is not one of: boxed, release"),
    ],
)
def test_choice_violation(override, problem):
    key = override.split("=")[0]
    assert config_error(override) == f"{key}: {problem}"


@pytest.mark.parametrize(
    "override, problem",
    [
        ("rollout.top_p=1.5", "1.5 is out of range; allowed: (0, 1]"),
        ("rollout.top_p=0", "0.0 is out of range; allowed: (0, 1]"),
        ("rollout.top_k=0", "0 is out of range; allowed: -1 (off) or >= 1"),
        ("rollout.temperature=-0.1", "-0.1 is out of range; allowed: >= 0"),
        ("rollout.sglang_mem_fraction_static=1", "1.0 is out of range; allowed: (0, 1)"),
        ("rollout.vllm_gpu_memory_utilization=0", "0.0 is out of range; allowed: (0, 1)"),
        ("rollout.vllm_tp_size=0", "0 is out of range; allowed: >= 1"),
        ("rollout.vllm_max_model_len=0", "0 is out of range; allowed: null or >= 1"),
        ("optimizer.lr=0", "0.0 is out of range; allowed: > 0"),
        ("distill.top_k=300", "300 is out of range; allowed: [1, 256]"),
        ("distill.mixed_weight=1.5", "1.5 is out of range; allowed: [0, 1]"),
        ("distill.train_steps=0", "0 is out of range; allowed: null or >= 1"),
        ("srt_train.optimizer.warmup_ratio=1.0", "1.0 is out of range; allowed: [0, 1)"),
        ("parallel.tensor_model_parallel_size=0", "0 is out of range; allowed: >= 1"),
    ],
)
def test_range_violation(override, problem):
    key = override.split("=")[0]
    assert config_error(override) == f"{key}: {problem}"


def test_math_extraction_default_and_release():
    assert load_config().math.extraction == "boxed"
    assert load_config(overrides=["math.extraction=release"]).math.extraction == "release"


def test_warmup_steps_and_ratio_both_set():
    message = config_error("srt_train.optimizer.warmup_steps=10")  # warmup_ratio defaults to 0.05 there
    assert "srt_train.optimizer.warmup_steps (10)" in message
    assert "srt_train.optimizer.warmup_ratio (0.05)" in message


def test_min_lr_above_lr():
    message = config_error("optimizer.min_lr=1e-3")
    assert "optimizer.min_lr (0.001)" in message and "optimizer.lr (5e-06)" in message


@pytest.mark.parametrize("section", ["distill", "srt_train"])
def test_global_batch_not_multiple_of_micro_batch(section):
    message = config_error(f"{section}.global_batch_size=7", f"{section}.micro_batch_size=2")
    assert f"{section}.global_batch_size (7) must be a multiple of {section}.micro_batch_size (2)" in message


def test_pipeline_parallel_size_at_least_one():
    message = config_error("parallel.pipeline_model_parallel_size=0")
    assert "parallel.pipeline_model_parallel_size: 0" in message and ">= 1" in message


def test_virtual_pipeline_size():
    """null (off) by default; when set, >= 2 and only beside PP >= 2 (megatron-core interleaves the
    chunks of several stages); the layers it must divide are checked against the model (run_setup)."""
    assert load_config().parallel.virtual_pipeline_model_parallel_size is None
    cfg = load_config(overrides=["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"])
    assert cfg.parallel.virtual_pipeline_model_parallel_size == 2
    message = config_error("parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=1")
    assert message.startswith("parallel.virtual_pipeline_model_parallel_size: 1 ") and "null (off) or >= 2" in message
    message = config_error("parallel.virtual_pipeline_model_parallel_size=2")
    assert message.startswith("parallel.virtual_pipeline_model_parallel_size: 2 needs "
                              "parallel.pipeline_model_parallel_size >= 2")


def test_virtual_pipeline_size_must_divide_the_stage_layers(tmp_path):
    """check_layout: VPP must divide num_layers / PP of the model's config.json (the key is named)."""
    from sdzero_mcore.checkpoint.source import ModelSource
    from sdzero_mcore.models.tiny import save_tiny_hf_model
    from sdzero_mcore.run_setup import check_layout

    hf_dir = save_tiny_hf_model(tmp_path / "hf", "Qwen3ForCausalLM", num_hidden_layers=4)
    source = ModelSource(hf_dir, "hf")
    good = load_config(overrides=["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"])
    check_layout(good, source)
    bad = load_config(overrides=["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"^parallel.virtual_pipeline_model_parallel_size: 4 does not divide the 2 layers "
                                          r"per pipeline stage"):
        check_layout(bad, source)


def test_hierarchical_cp_needs_its_group_sizes():
    """TE's a2a+p2p reads two levels of CP groups; without their sizes none would exist (cp_group=None)."""
    message = config_error("parallel.context_parallel_size=4", "parallel.cp_comm_type=a2a+p2p")
    assert message.startswith("parallel.cp_comm_type: 'a2a+p2p' needs parallel.hierarchical_context_parallel_sizes")
    message = config_error("parallel.context_parallel_size=4", "parallel.cp_comm_type=a2a+p2p",
                           "parallel.hierarchical_context_parallel_sizes=[2,1]")
    assert message == ("parallel.hierarchical_context_parallel_sizes: [2, 1] must multiply to "
                       "parallel.context_parallel_size (4)")
    message = config_error("parallel.context_parallel_size=4", "parallel.cp_comm_type=a2a+p2p",
                           "parallel.hierarchical_context_parallel_sizes=[4]")
    assert message.startswith("parallel.hierarchical_context_parallel_sizes: [4] must be two sizes")
    message = config_error("parallel.context_parallel_size=4", "parallel.hierarchical_context_parallel_sizes=[2,2]")
    assert message.startswith("parallel.hierarchical_context_parallel_sizes: is read only with "
                              "parallel.cp_comm_type=a2a+p2p")
    cfg = load_config(overrides=["parallel.context_parallel_size=4", "parallel.cp_comm_type=a2a+p2p",
                                 "parallel.hierarchical_context_parallel_sizes=[2,2]"])
    assert cfg.parallel.hierarchical_context_parallel_sizes == [2, 2]
    # at CP = 1 the scheme is not used (the model gets no cp_comm_type): nothing to size
    assert load_config(overrides=["parallel.cp_comm_type=a2a+p2p"]).parallel.context_parallel_size == 1


def test_direct_construction_validates_relative_to_section():
    with pytest.raises(ConfigError, match=r"^kl: 'kll' is not one of: reverse, forward, mixed$"):
        DistillConfig(kl="kll")


def test_validate_catches_mutation_with_full_path():
    cfg = SDZeroConfig()
    cfg.srt_train.optimizer.warmup_ratio = 2.0  # assignment bypasses __post_init__
    with pytest.raises(ConfigError, match=r"^srt_train\.optimizer\.warmup_ratio: 2\.0 is out of range"):
        cfg.validate()


# --- data parallel size ------------------------------------------------------------------------


@pytest.mark.parametrize("tp, cp, world, dp", [(1, 1, 1, 1), (1, 1, 8, 8), (4, 1, 8, 2), (2, 2, 8, 2), (4, 2, 8, 1)])
def test_data_parallel_size(tp, cp, world, dp):
    parallel = ParallelConfig(tensor_model_parallel_size=tp, context_parallel_size=cp)
    assert parallel.data_parallel_size(world) == dp


def test_data_parallel_size_bad_layout():
    parallel = ParallelConfig(tensor_model_parallel_size=4, context_parallel_size=1)
    with pytest.raises(ConfigError) as info:
        parallel.data_parallel_size(6)
    message = str(info.value)
    assert "parallel.tensor_model_parallel_size (4)" in message
    assert "parallel.context_parallel_size (1)" in message
    assert "world size 6" in message
    assert "valid TP x CP products for world size 6: 1, 2, 3, 6" in message


def test_data_parallel_size_with_pipeline_stages():
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert parallel.data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match=r"x parallel.pipeline_model_parallel_size \(2\) = 4 does not divide the world size 6"):
        parallel.data_parallel_size(6)


def test_data_parallel_size_bad_world_size():
    with pytest.raises(ConfigError, match="world size"):
        ParallelConfig().data_parallel_size(0)


# --- saving and hashing ------------------------------------------------------------------------


def non_default_config() -> SDZeroConfig:
    return load_config(
        EXAMPLES / "qwen3_4b_paper.yaml",
        ["data.eval_datasets=[gsm8k, math500]", "distill.optimizer.lr=1.5e-6", "distill.train_steps=40"],
    )


def test_save_load_round_trip(tmp_path):
    cfg = non_default_config()
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert path.read_text() == config_to_yaml(cfg)


def test_save_replaces_existing_file_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("stale: true\n")
    cfg = non_default_config()
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    save_config(SDZeroConfig(), path)
    before = path.read_text()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_config(non_default_config(), path)
    assert path.read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]


def test_config_hash_stable_and_sensitive():
    first, second = load_config(), load_config()
    assert config_hash(first) == config_hash(second)
    assert len(config_hash(first)) == 12 and int(config_hash(first), 16) >= 0
    assert config_hash(load_config(overrides=["distill.optimizer.lr=1e-5"])) != config_hash(first)
    assert config_hash(load_config(overrides=["data.eval_datasets=[gsm8k]"])) != config_hash(first)


# --- argparse ----------------------------------------------------------------------------------


def test_argparse_config_and_overrides(tmp_path):
    path = write(tmp_path, "parallel:\n  tensor_model_parallel_size: 2\nseed: 5\n")
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args(["--config", str(path), "seed=6", "rollout.top_k=-1", "distill.kl=forward"])
    assert args.overrides == ["seed=6", "rollout.top_k=-1", "distill.kl=forward"]
    cfg = config_from_args(args)
    assert (cfg.parallel.tensor_model_parallel_size, cfg.seed, cfg.distill.kl) == (2, 6, "forward")


def test_argparse_defaults():
    parser = argparse.ArgumentParser()
    add_config_args(parser)
    args = parser.parse_args([])
    assert args.config is None and args.overrides == []
    assert config_from_args(args) == SDZeroConfig()
    assert "parallel.tensor_model_parallel_size=2" in parser.format_help()


def test_demo_configs_load():
    for name in ("demo_cpu.yaml", "demo_gpu_small.yaml"):
        cfg = load_config(EXAMPLES / name)
        assert cfg.grpo.group_size == cfg.rft.samples_per_question == 4  # the paper: 4 rollouts / samples
        assert cfg.distill.prompts_per_step == cfg.distill.global_batch_size
