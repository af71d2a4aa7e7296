"""Contract tests of the sglang backend, without SGLang (it cannot be installed here).

The colocated engine runs against a recording fake of ``sglang.Engine`` (tests/sglang_fakes.py).
The remote backend talks to a fake SGLang server in its own process, which joins a real (gloo)
weight-update group the way SGLang's server joins the NCCL one.
"""

from __future__ import annotations

import json
import multiprocessing
import sys
import threading
import urllib.request

import pytest
import torch
from helpers import VOCAB
from sglang_fakes import install_fake_sglang, serve_fake_sglang

from sdzero_mcore.checkpoint.hf_io import copy_non_weight_files
from sdzero_mcore.config import RolloutConfig
from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.parallel.launch import free_port
from sdzero_mcore.rollout import make_rollout_engine
from sdzero_mcore.rollout.base import SamplingParams, request_seed
from sdzero_mcore.rollout.hf import HFRolloutEngine
from sdzero_mcore.rollout.sglang import RemoteSGLangEngine, SGLangRolloutEngine

PROMPTS = [[5, 17, 301, 42], [900, 12]]


@pytest.fixture
def fake_sglang(monkeypatch):
    """Installs a fake ``sglang`` package exposing Engine and the two weight-sync helpers."""
    return install_fake_sglang(lambda name, module: monkeypatch.setitem(sys.modules, name, module))


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("sg") / "hf", vocab_size=VOCAB, seed=3)


def megatron_buckets(hf_dir, bucket_bytes=48 * 1024):
    """A megatron model (TP=1) built from ``hf_dir`` and its HF weight buckets, as the trainer streams them."""
    from sdzero_mcore.checkpoint.loading import build_model_from_hf
    from sdzero_mcore.parallel.resharding import iter_hf_buckets

    model = build_model_from_hf(hf_dir, params_dtype=torch.float32, transformer_impl="local")
    return model, list(iter_hf_buckets(model, bucket_bytes))


def test_missing_sglang_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError, match="needs SGLang >= 0.5.5.*rollout.backend='hf'"):
        SGLangRolloutEngine("some/model")


def test_colocated_engine_construction_and_memory_order(fake_sglang, hf_model_dir, megatron_single_rank):
    engine = SGLangRolloutEngine(str(hf_model_dir), tp_size=2, base_gpu_id=4, mem_fraction_static=0.6)
    fake = engine.engine
    assert fake.kwargs == dict(model_path=str(hf_model_dir), tp_size=2, base_gpu_id=4, mem_fraction_static=0.6,
                               enable_memory_saver=True, skip_tokenizer_init=True)
    model, buckets = megatron_buckets(hf_model_dir)
    engine.sleep()  # the trainer's turn
    engine.update_weights(buckets)
    engine.wake()
    names = [name for name, _ in fake.calls]
    n_payloads = sum(len({t.dtype for _, t in bucket}) for bucket in buckets)
    assert names == (["release_memory_occupation", "resume_memory_occupation"] + ["update_weights_from_tensor"] * n_payloads
                     + ["flush_cache", "resume_memory_occupation"])
    assert fake.calls[0][1] == {"tags": ["weights", "kv_cache", "cuda_graph"]}
    assert fake.calls[1][1] == {"tags": ["weights"]}  # weights first, before the sync
    assert all(kw == {"load_format": "flattened_bucket", "flush_cache": False, "n": 2} for name, kw in fake.calls if name == "update_weights_from_tensor")
    assert fake.calls[-1][1] == {"tags": ["kv_cache", "cuda_graph"]}  # KV cache after the sync
    # every weight arrived once per engine TP rank, and the engine now holds megatron's weights
    params = dict(fake.oracle.model.named_parameters())
    assert fake.loaded == {name: 2 for name in params}
    for bucket in buckets:
        for name, tensor in bucket:
            assert torch.equal(params[name], tensor), name
    assert len(buckets) > 3


def test_colocated_generate_payload_and_results(fake_sglang, hf_model_dir, megatron_single_rank):
    engine = SGLangRolloutEngine(str(hf_model_dir), tokenizer=None)
    sampling = SamplingParams(temperature=0.0, top_k=5, max_new_tokens=4, stop_token_ids=(7,), n=2, seed=11, return_logprobs=True)
    completions = engine.generate(PROMPTS, sampling)
    name, call = engine.engine.calls[-1]
    assert name == "generate"
    assert call["input_ids"] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]  # n samples as n requests
    assert call["return_logprob"] is True
    assert call["sampling_params"][0] == {"temperature": 0.0, "top_p": 1.0, "top_k": 5, "max_new_tokens": 4,
                                          "stop_token_ids": [7], "skip_special_tokens": False, "no_stop_trim": True,
                                          "sampling_seed": request_seed(11, 0, 0)}
    assert [(c.prompt_index, c.sample_index) for c in completions] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    oracle = engine.engine.oracle.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4, stop_token_ids=(7,)))
    assert [c.token_ids for c in completions[::2]] == [c.token_ids for c in oracle]
    assert all(len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length") for c in completions)
    engine.sleep()
    with pytest.raises(RuntimeError, match="call wake"):
        engine.generate(PROMPTS, sampling)


def test_every_request_gets_its_own_sampling_seed(fake_sglang, hf_model_dir, megatron_single_rank):
    engine = SGLangRolloutEngine(str(hf_model_dir))
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, n=4, seed=11)
    first = engine.generate(PROMPTS, sampling)
    seeds = [params["sampling_seed"] for params in engine.engine.calls[-1][1]["sampling_params"]]
    assert seeds == [request_seed(11, prompt, sample) for prompt in range(2) for sample in range(4)]
    assert len(set(seeds)) == len(seeds)  # one per (prompt, sample)
    # the fake samples deterministically from a request's seed, as SGLang's deterministic sampling
    # does: with one seed per prompt its n samples would all be the same
    for prompt in range(len(PROMPTS)):
        assert len({tuple(c.token_ids) for c in first if c.prompt_index == prompt}) > 1
    again = engine.generate(PROMPTS, sampling)
    assert [params["sampling_seed"] for params in engine.engine.calls[-1][1]["sampling_params"]] == seeds
    assert [c.token_ids for c in again] == [c.token_ids for c in first]  # a rerun (a resume) samples the same
    engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=6, n=4, seed=12))
    assert not set(seeds) & {params["sampling_seed"] for params in engine.engine.calls[-1][1]["sampling_params"]}


def test_a_checkpoint_hf_folder_without_weights_starts_on_dummy_weights(fake_sglang, hf_model_dir, tmp_path,
                                                                         megatron_single_rank):
    weightless = tmp_path / "ckpt" / "hf"  # what an sdzero-mcore checkpoint holds: config and tokenizer only
    copy_non_weight_files(hf_model_dir, weightless)
    engine = make_rollout_engine(RolloutConfig(backend="sglang"), weightless)  # as training_engine starts it
    assert engine.engine.kwargs["load_format"] == "dummy"
    _, buckets = megatron_buckets(hf_model_dir)
    engine.update_weights(buckets)  # the first sync fills the dummy weights
    sampling = SamplingParams(temperature=0.0, max_new_tokens=4)
    expected = HFRolloutEngine.from_pretrained(hf_model_dir).generate(PROMPTS, sampling)
    assert [c.token_ids for c in engine.generate(PROMPTS, sampling)] == [c.token_ids for c in expected]
    # a HF directory served as it is still loads its weights
    served = make_rollout_engine(RolloutConfig(backend="sglang"), hf_model_dir, load_weights=True)
    assert "load_format" not in served.engine.kwargs
    assert [c.token_ids for c in served.generate(PROMPTS, sampling)] == [c.token_ids for c in expected]


def finish_within(seconds: float, what: str, fn) -> None:
    """``fn()`` in a thread: a hang fails the test after ``seconds`` instead of stalling the run."""
    outcome: dict = {}

    def target():
        try:
            fn()
        except BaseException as error:  # re-raised in the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"{what} did not finish in {seconds:.0f} s")
    if "error" in outcome:
        raise outcome["error"]


@pytest.fixture
def fake_server(hf_model_dir):
    """The URL of a fake SGLang server in its own process (as a real one is: the weight-update
    group's name is registered once per process)."""
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=serve_fake_sglang, args=(str(hf_model_dir), ports, 20.0), daemon=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{ports.get(timeout=300)}"
    finally:
        server.terminate()
        server.join(30)


def post_json(url: str, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def recorded_calls(url: str) -> list:
    with urllib.request.urlopen(url + "/test/calls", timeout=60) as response:
        return json.loads(response.read())


def test_remote_engine_weight_broadcast_and_generate(hf_model_dir, fake_server, megatron_single_rank):
    engine = RemoteSGLangEngine(fake_server, backend="gloo", timeout_s=60)
    assert engine.healthy()
    with pytest.raises(RuntimeError, match="init_weights_update_group"):
        engine.update_weights([])
    _, buckets = megatron_buckets(hf_model_dir)

    def sync():
        engine.init_weights_update_group("127.0.0.1", free_port(), server_world_size=1)
        engine.update_weights(buckets)

    # the server joins SGLang's way (store prefixed with the group name): a trainer whose keys
    # differ waits for it forever
    finish_within(90, "the weight sync to the fake SGLang server", sync)
    for bucket in buckets:
        name, tensor = bucket[0]
        served = post_json(fake_server + "/get_weights_by_name", {"name": name, "truncate_size": 10**6})
        assert torch.equal(torch.tensor(served), tensor), name
    sampling = SamplingParams(temperature=0.0, max_new_tokens=3, n=2, seed=5)
    completions = engine.generate(PROMPTS, sampling)
    expected = HFRolloutEngine.from_pretrained(hf_model_dir).generate(PROMPTS, sampling)  # the weights it was sent
    assert [c.token_ids for c in completions] == [c.token_ids for c in expected]
    engine.shutdown()
    # both sides of the group are gone: a later phase in this process can create it again
    assert engine.group is None
    finish_within(90, "a second weight-update group of the same name",
                  lambda: engine.init_weights_update_group("127.0.0.1", free_port(), server_world_size=1))
    engine.shutdown()
    calls = recorded_calls(fake_server)
    paths = [path for path, _ in calls if path != "/get_weights_by_name"]
    assert paths == (["/health_generate", "/init_weights_update_group"] + ["/update_weights_from_distributed"] * len(buckets)
                     + ["/flush_cache", "/generate", "/destroy_weights_update_group"]
                     + ["/init_weights_update_group", "/destroy_weights_update_group"])
    init = calls[1][1]
    assert init["rank_offset"] == 1 and init["world_size"] == 2 and init["backend"] == "gloo"
    assert init["group_name"] == "sdzero_weight_sync"
    announced = [body for path, body in calls if path == "/update_weights_from_distributed"]
    assert [n for body in announced for n in body["names"]] == [n for bucket in buckets for n, _ in bucket]
    assert announced[0]["dtypes"][0] == "float32" and announced[0]["flush_cache"] is False
    seeds = [params["sampling_seed"] for path, body in calls if path == "/generate" for params in body["sampling_params"]]
    assert len(seeds) == 4 and len(set(seeds)) == 4  # one seed per (prompt, sample)


def test_unreachable_server_is_named():
    engine = RemoteSGLangEngine("http://127.0.0.1:9", timeout_s=2)
    assert not engine.healthy()
    with pytest.raises(RuntimeError, match="cannot reach the SGLang server at http://127.0.0.1:9/generate"):
        engine.generate(PROMPTS, SamplingParams())


def test_config_selects_the_backend(hf_model_dir, monkeypatch):
    from sdzero_mcore.config import RolloutConfig
    from sdzero_mcore.rollout import make_rollout_engine, sampling_from_config

    assert isinstance(make_rollout_engine(RolloutConfig(backend="hf"), hf_model_dir), HFRolloutEngine)
    remote = make_rollout_engine(RolloutConfig(backend="sglang", sglang_url="http://10.0.0.1:30000/"), hf_model_dir)
    assert isinstance(remote, RemoteSGLangEngine) and remote.url == "http://10.0.0.1:30000"
    monkeypatch.setitem(sys.modules, "sglang", None)
    with pytest.raises(ImportError, match="needs SGLang"):
        make_rollout_engine(RolloutConfig(backend="sglang"), hf_model_dir)
    params = sampling_from_config(RolloutConfig(temperature=0.7, top_p=0.95, max_new_tokens=99, seed=4), stop_token_ids=[2], n=3)
    assert params == SamplingParams(temperature=0.7, top_p=0.95, top_k=-1, max_new_tokens=99, stop_token_ids=(2,), n=3, seed=4)


def test_a_failed_weight_update_raises(fake_sglang, hf_model_dir, megatron_single_rank):
    engine = SGLangRolloutEngine(str(hf_model_dir))
    engine.engine.update_weights_from_tensor = lambda **kwargs: (False, "Failed to update parameter online: shape mismatch")
    _, buckets = megatron_buckets(hf_model_dir)
    with pytest.raises(RuntimeError, match="update_weights_from_tensor failed: Failed to update parameter online"):
        engine.update_weights(buckets)
