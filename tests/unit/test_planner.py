"""`sdzero plan`: the formula against the CPU allocator on tiny models, against megatron-core's published
bytes-per-parameter table and Megatron-LM's weight-and-optimizer formula, and the CLI on the examples."""

import json
import math
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from sdzero_mcore.planner import (
    KNOWN_SHAPES,
    Layout,
    PhaseInputs,
    bytes_per_param,
    estimate_phase,
    layer_activation_bytes,
    stage_params,
)

GIB = 2**30


def _run_python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter from the repository root (tools/ importable)."""
    env_path = f"{REPO_ROOT}:{REPO_ROOT / 'tools'}"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "PYTHONPATH": env_path, "OMP_NUM_THREADS": "1"})


# ---------------------------------------------------------------------------------------------
# (a) the estimate against the allocator's measured peak (tools/measure_step_memory.py)

MEASURED_CASES = [
    # the tiny Qwen3 of the tests (tied, GQA, per-head QK-norm, vocab 1111): logits ~ a fifth of the peak
    dict(batch=2, seq=256, recompute="none"),
    dict(batch=1, seq=512, recompute="selective"),
    # wider and deeper, untied-free MHA with a small vocabulary: the layers dominate
    dict(batch=2, seq=128, recompute="none", vocab_size=300, hidden_size=128, intermediate_size=384,
         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, head_dim=32),
]


CLI_RUNS = (
    ["plan", "examples/qwen3_4b_release.yaml", "--gpus", "8"],
    ["plan", "examples/qwen2.5_72b_release.yaml", "--gpus", "32"],
    ["plan", "examples/qwen2.5_72b_release.yaml", "model.hf_dir=checkpoints/NoSuchModel"],
)


@pytest.fixture(scope="module")
def fresh_process():
    """One fresh interpreter (its allocator untouched by other tests) for the measurements and the CLI runs."""
    code = (
        "import contextlib, io, json, tempfile, measure_step_memory as m\n"
        "from sdzero_mcore.cli import main\n"
        f"for case in {MEASURED_CASES!r}:\n"
        "    with tempfile.TemporaryDirectory() as d:\n"
        "        print('RESULT', json.dumps(m.measure(run_dir=d, **case)), flush=True)\n"
        f"for argv in {list(CLI_RUNS)!r}:\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
        "        rc = main(argv)\n"
        "    print('=== rc', rc)\n"
        "    print(out.getvalue() + err.getvalue())\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr[-3000:]
    measurements, _, cli = result.stdout.partition("=== rc ")
    rows = [json.loads(line[len("RESULT "):]) for line in measurements.splitlines() if line.startswith("RESULT ")]
    return rows, ("=== rc " + cli).split("=== rc ")[1:]


@pytest.fixture(scope="module")
def measured(fresh_process):
    return fresh_process[0]


def test_estimate_is_within_10_percent_of_the_measured_peak(measured):
    assert len(measured) == len(MEASURED_CASES)
    for row in measured:
        print(f"estimate / measured peak {row['estimated_peak'] / row['measured_peak']:.4f}, static "
              f"{row['estimated_static'] / row['measured_static']:.4f}, activations "
              f"{row['estimated_activations'] / row['measured_step_extra']:.4f}: {row}")
        # the step's activations must be a real part of what is compared, not a rounding error beside the state
        assert row["measured_step_extra"] > 0.5 * row["measured_static"], row
        assert row["estimated_peak"] == pytest.approx(row["measured_peak"], rel=0.10), row
        assert row["estimated_static"] == pytest.approx(row["measured_static"], rel=0.05), row
        assert row["estimated_activations"] == pytest.approx(row["measured_step_extra"], rel=0.10), row


def test_measured_activations_grow_with_tokens_as_the_formula_says(measured):
    # same model, 512 tokens each: none and selective differ by the log-sum-exp only (4 bytes x heads)
    none, selective = measured[0], measured[1]
    assert none["batch"] * none["seq"] == selective["batch"] * selective["seq"]
    assert abs(none["measured_step_extra"] - selective["measured_step_extra"]) < 0.05 * none["measured_step_extra"]


# ---------------------------------------------------------------------------------------------
# (b) megatron-core's published formulas


@pytest.mark.parametrize("dp", [1, 2, 4, 8, 64])
def test_bytes_per_parameter_are_megatron_cores_table(dp):
    # docs.nvidia.com/megatron-core "Distributed Optimizer": bf16 params + fp32 grads 18 | 6 + 12/d,
    # fp32 params + fp32 grads 16 | 8 + 8/d (d = data-parallel size)
    assert bytes_per_param(2, distributed=False, shards=dp) == 18
    assert bytes_per_param(2, distributed=True, shards=dp) == pytest.approx(6 + 12 / dp, rel=1e-15)
    assert bytes_per_param(4, distributed=False, shards=dp) == 16
    assert bytes_per_param(4, distributed=True, shards=dp) == pytest.approx(8 + 8 / dp, rel=1e-15)


def _megatron_lm_weight_and_optimizer_bytes(shape, tp, pp, dp, distributed, padded_vocab):
    """Megatron-LM's megatron/training/theoretical_memory_usage.py, compute_weight_and_optimizer_memory,
    for a dense GQA SwiGLU RMSNorm model: the most loaded shard's parameters x 18 or 6 + 12/d bytes."""
    h, heads, groups, f = shape.hidden_size, shape.num_attention_heads, shape.num_query_groups, shape.ffn_hidden_size
    query_projection_to_hidden = shape.q_width / h
    self_attn = 2 * h * h * ((1 + groups / heads) * query_projection_to_hidden)
    layer = 2 * h * (f * 3 / 2 + 1) + self_attn
    embedding = h * padded_vocab
    block = layer * shape.num_layers + h
    most_loaded = (block / pp + embedding) / tp
    if not shape.tie_word_embeddings and pp == 1:
        most_loaded += embedding / tp
    return most_loaded * (6 + 12 / dp if distributed else 18)


@pytest.mark.parametrize("tp,pp,dp,distributed", [(8, 1, 4, False), (8, 4, 1, False), (8, 2, 2, True), (4, 4, 2, True)])
def test_model_state_matches_megatron_lms_theoretical_memory(tp, pp, dp, distributed):
    shape = KNOWN_SHAPES["Llama-3.3-70B-Instruct"]  # no biases, no QK-norm: what Megatron-LM's formula counts
    layout = Layout(tp=tp, pp=pp, dp=dp, distributed=distributed)
    phase = PhaseInputs("srt_train", micro_batch_tokens=1024, micro_batches=8, loss="cross_entropy", distributed=distributed)
    worst = max(range(pp), key=lambda stage: stage_params(shape, layout, stage))
    estimate = estimate_phase(shape, layout, phase, param_bytes=2)
    params = stage_params(shape, layout, worst)
    ours = params * bytes_per_param(2, distributed, dp)
    if estimate.stage == worst:
        assert estimate.student_weights + estimate.gradients + estimate.optimizer == pytest.approx(ours, rel=1e-12)
    padded = math.ceil(shape.vocab_size / (128 * tp)) * 128 * tp
    reference = _megatron_lm_weight_and_optimizer_bytes(shape, tp, pp, dp, distributed, padded)
    # theirs divides the norm weights (2h per layer and the final norm) by TP and PP as well; every TP rank
    # holds them whole (megatron-core replicates them), so add back what that leaves out: exact then
    h = shape.hidden_size
    replicated = (2 * h * shape.num_layers / pp + h) * (1 - 1 / tp) + h * (1 - 1 / pp) / tp * (pp > 1)
    assert ours == pytest.approx(reference + replicated * bytes_per_param(2, distributed, dp), rel=1e-9)
    assert ours == pytest.approx(reference, rel=2e-4)


def test_activation_formula_terms():
    shape = KNOWN_SHAPES["Llama-3.3-70B-Instruct"]
    h, q, g, f = shape.hidden_size, shape.q_width, shape.kv_width, shape.ffn_hidden_size
    one_token_bf16 = layer_activation_bytes(shape, 1, 8, 2, "none")
    assert one_token_bf16 == 2 * (6 * h + (3 * q + 3 * g) / 8 + 5 * f / 8) + 4 * (2 + 64 / 8)
    assert layer_activation_bytes(shape, 1, 8, 2, "selective") == one_token_bf16 - 4 * 64 / 8
    assert layer_activation_bytes(shape, 1000, 8, 2, "full") == 1000 * 2 * h
    # linear in tokens, and only the TP-split part shrinks with TP
    assert layer_activation_bytes(shape, 4096, 8, 2, "none") == 4096 * one_token_bf16
    assert layer_activation_bytes(shape, 1, 1, 2, "none") - one_token_bf16 == pytest.approx(
        2 * (3 * q + 3 * g + 5 * f) * (1 - 1 / 8) + 4 * 64 * (1 - 1 / 8))


def test_pipeline_in_flight_micro_batches_make_stage_0_the_worst():
    shape = KNOWN_SHAPES["Qwen2.5-72B-Instruct"]
    phase = PhaseInputs("srt_train", micro_batch_tokens=8192, micro_batches=16, loss="cross_entropy")
    one = estimate_phase(shape, Layout(tp=8, pp=1), phase)
    four = estimate_phase(shape, Layout(tp=8, pp=4), phase)
    assert four.stage == 0
    layers_none = one.activations["none"] - one.loss
    # stage 0 of 4 holds 4 micro-batches of a quarter of the layers: the layers' activations of PP 1
    assert four.activations["none"] == pytest.approx(layers_none, rel=1e-12)
    assert four.student_weights < one.student_weights / 3


# ---------------------------------------------------------------------------------------------
# The CLI on the examples


@pytest.fixture(scope="module")
def cli_outputs(fresh_process):
    return fresh_process[1]


def _row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(label))
    return line[len(label):].split()


def test_plan_prints_the_4b_table(cli_outputs):
    rc, text = cli_outputs[0].split("\n", 1)
    assert rc == "0", text
    shape = KNOWN_SHAPES["Qwen3-4B-Instruct-2507"]
    assert "TP4 x PP1 x CP1 x DP2 = 8 GPUs" in text
    assert _row(text, "GiB per GPU") == ["srt_train", "distill", "rft"]
    # bf16 weights at TP 4: 36 layers / 4 + the tied embedding / 4 + the final norm
    expected = stage_params(shape, Layout(tp=4), 0) * 2 / GIB
    assert [float(v) for v in _row(text, "student weights")] == [round(expected, 1)] * 3
    assert [float(v) for v in _row(text, "teacher weights (frozen)")] == [0.0, round(expected, 1), 0.0]
    assert [float(v) for v in _row(text, "optimizer (fp32 master + Adam)")] == [round(expected * 6, 1)] * 3
    assert "smallest layouts of 8 GPUs" in text and "distributed optimizer" in text


def test_plan_prints_the_72b_table_and_its_layout_fits(cli_outputs):
    rc, text = cli_outputs[1].split("\n", 1)
    assert rc == "0", text
    assert "Qwen2.5-72B-Instruct, 72.71B parameters" in text
    assert "TP8 x PP2 x CP2 x DP1 = 32 GPUs" in text and "recompute full" in text
    assert _row(text, "distributed optimizer") == ["on", "on", "on"]
    peaks = _row(text, "peak vs GPU 80 GiB")
    assert peaks[1::2] == ["fits", "fits", "fits"] and all(float(v) <= 80 for v in peaks[0::2])
    assert "TP8 x PP2 x CP2 x DP1" in text.split("smallest layouts of 32 GPUs")[1]


def test_plan_names_the_field_when_the_model_is_unknown(cli_outputs):
    rc, text = cli_outputs[2].split("\n", 1)
    assert rc == "2"
    assert "model.hf_dir" in text and "NoSuchModel" in text and "--hf-config" in text
