"""Contract tests of the sglang backend, without SGLang (it cannot be installed here).

A recording fake of ``sglang.Engine`` with the real methods' signatures (wrong keyword names fail
with TypeError) records every call, reconstructs every weight payload the way SGLang's scheduler
does (one payload per engine TP rank, deserialized, un-flattened by its metadata) and serves
generations from a transformers model holding the weights it received. The remote backend talks
to a real HTTP server on localhost that joins a real (gloo) process group for the weight
broadcast, as an SGLang server joins the NCCL one.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from helpers import VOCAB

from sdzero_mcore.models.tiny import save_tiny_hf_model
from sdzero_mcore.rollout.base import SamplingParams
from sdzero_mcore.rollout.hf import HFRolloutEngine
from sdzero_mcore.rollout.sglang import (
    ALL_TAGS,
    TAG_WEIGHTS,
    RemoteSGLangEngine,
    SGLangRolloutEngine,
    nccl_group_over_tcp,
)

PROMPTS = [[5, 17, 301, 42], [900, 12]]


# --- fakes of SGLang's weight-sync helpers (same API as sglang.srt.utils / weight_sync.tensor_bucket) ---


class FakeMultiprocessingSerializer:
    """By value instead of CUDA IPC handles; same call shape: serialize(obj, output_str) / deserialize."""

    @staticmethod
    def serialize(obj, output_str: bool = False):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
        return base64.b64encode(data).decode() if output_str else data

    @staticmethod
    def deserialize(data):
        raw = base64.b64decode(data) if isinstance(data, str) else data
        return torch.load(io.BytesIO(raw), weights_only=False)


class FakeFlattenedTensorBucket:
    """One dtype's tensors flattened into one tensor, with the metadata to cut them back out."""

    def __init__(self, named_tensors=None, flattened_tensor=None, metadata=None):
        if named_tensors is not None:
            dtypes = {t.dtype for _, t in named_tensors}
            assert len(dtypes) == 1, f"a flattened bucket holds one dtype, got {dtypes}"
            self.metadata, start = [], 0
            for name, tensor in named_tensors:
                self.metadata.append({"name": name, "shape": tuple(tensor.shape), "dtype": tensor.dtype, "start": start, "numel": tensor.numel()})
                start += tensor.numel()
            self.flattened = torch.cat([t.reshape(-1) for _, t in named_tensors])
        else:
            self.flattened, self.metadata = flattened_tensor, metadata

    def get_flattened_tensor(self):
        return self.flattened

    def get_metadata(self):
        return self.metadata

    def reconstruct_tensors(self):
        return [(m["name"], self.flattened[m["start"] : m["start"] + m["numel"]].view(m["shape"])) for m in self.metadata]


class RecordingEngine:
    """``sglang.Engine`` with the signatures of SGLang 0.5.x; serves from a transformers model."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict]] = []
        self.oracle = HFRolloutEngine.from_config(kwargs["model_path"])
        self.released: set[str] = set()
        self.loaded: dict[str, int] = {}  # weight name -> how many engine TP ranks loaded it

    def generate(self, prompt=None, sampling_params=None, input_ids=None, image_data=None, return_logprob=False,
                 logprob_start_len=None, top_logprobs_num=None, token_ids_logprob=None, lora_path=None,
                 custom_logit_processor=None, return_hidden_states=False, stream=False, bootstrap_host=None,
                 bootstrap_port=None, bootstrap_room=None, data_parallel_rank=None):
        self.calls.append(("generate", dict(input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob)))
        assert prompt is None and input_ids is not None and not self.released
        assert isinstance(sampling_params, list) and len(sampling_params) == len(input_ids)
        outputs = []
        for ids, params in zip(input_ids, sampling_params):
            ours = SamplingParams(temperature=params["temperature"], max_new_tokens=params["max_new_tokens"],
                                  stop_token_ids=tuple(params["stop_token_ids"]), return_logprobs=return_logprob)
            done = self.oracle.generate([ids], ours)[0]
            meta = {"finish_reason": {"type": done.finish_reason}}
            if return_logprob:
                meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(done.logprobs, done.token_ids)]
            outputs.append({"text": "", "output_ids": done.token_ids, "meta_info": meta})
        return outputs

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", dict(load_format=load_format, flush_cache=flush_cache, n=len(named_tensors))))
        assert TAG_WEIGHTS not in self.released, "weights must be resumed before a sync"
        assert load_format == "flattened_bucket" and len(named_tensors) == self.kwargs["tp_size"]
        params = dict(self.oracle.model.named_parameters())
        for tp_rank, payload in enumerate(named_tensors):  # what scheduler tp_rank does with entry tp_rank
            data = FakeMultiprocessingSerializer.deserialize(payload)
            assert set(data) == {"flattened_tensor", "metadata"}
            for name, tensor in FakeFlattenedTensorBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"]).reconstruct_tensors():
                with torch.no_grad():
                    params[name].copy_(tensor)
                self.loaded.setdefault(name, 0)
                self.loaded[name] += 1
        return True, "Succeeded"

    def flush_cache(self):
        self.calls.append(("flush_cache", {}))

    def release_memory_occupation(self, tags=None):
        self.calls.append(("release_memory_occupation", dict(tags=tags)))
        self.released |= set(tags or ALL_TAGS)

    def resume_memory_occupation(self, tags=None):
        self.calls.append(("resume_memory_occupation", dict(tags=tags)))
        self.released -= set(tags or ALL_TAGS)

    def shutdown(self):
        self.calls.append(("shutdown", {}))


@pytest.fixture
def fake_sglang(monkeypatch):
    """Installs a fake ``sglang`` package exposing Engine and the two weight-sync helpers."""
    modules = {name: types.ModuleType(name) for name in (
        "sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.weight_sync", "sglang.srt.weight_sync.tensor_bucket")}
    modules["sglang"].Engine = RecordingEngine
    modules["sglang.srt.utils"].MultiprocessingSerializer = FakeMultiprocessingSerializer
    modules["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorBucket = FakeFlattenedTensorBucket
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    return modules


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
                                          "sampling_seed": 11}
    assert [(c.prompt_index, c.sample_index) for c in completions] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    oracle = engine.engine.oracle.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=4, stop_token_ids=(7,)))
    assert [c.token_ids for c in completions[::2]] == [c.token_ids for c in oracle]
    assert all(len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length") for c in completions)
    engine.sleep()
    with pytest.raises(RuntimeError, match="call wake"):
        engine.generate(PROMPTS, sampling)


class FakeSGLangServer(BaseHTTPRequestHandler):
    """The HTTP endpoints of an SGLang server, joining the weight-sync group as rank 1 (gloo here)."""

    state: dict = {}

    def log_message(self, *args):
        pass

    def _reply(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.state["calls"].append((self.path, None))
        self._reply({}) if self.path == "/health_generate" else self._reply({"error": "no"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.state["calls"].append((self.path, body))
        state = self.state
        if self.path == "/init_weights_update_group":
            assert body["rank_offset"] == 1 and body["backend"] == "nccl"
            state["group"] = nccl_group_over_tcp(body["master_address"], body["master_port"], body["world_size"], 1, backend="gloo")
            return self._reply({"success": True, "message": "ok"})
        if self.path == "/update_weights_from_distributed":
            assert body["group_name"] == "sdzero_weight_sync" and body["flush_cache"] is False
            params = dict(state["oracle"].model.named_parameters())
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                state["group"].broadcast(tensor, src=0)
                with torch.no_grad():
                    params[name].copy_(tensor)
            return self._reply({"success": True, "message": "ok"})
        if self.path == "/flush_cache":
            return self._reply({})
        if self.path == "/generate":
            sp = body["sampling_params"]
            outputs = []
            for ids in body["input_ids"]:
                done = state["oracle"].generate([ids], SamplingParams(temperature=sp["temperature"], max_new_tokens=sp["max_new_tokens"]))[0]
                outputs.append({"text": "", "output_ids": done.token_ids, "meta_info": {"finish_reason": {"type": done.finish_reason}}})
            return self._reply(outputs)
        self._reply({"error": "unknown"}, 404)


def test_remote_engine_weight_broadcast_and_generate(hf_model_dir, megatron_single_rank):
    from sdzero_mcore.parallel.launch import free_port

    FakeSGLangServer.state = {"calls": [], "oracle": HFRolloutEngine.from_config(hf_model_dir)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLangServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        gloo = lambda addr, port, world, rank: nccl_group_over_tcp(addr, port, world, rank, backend="gloo")  # noqa: E731
        engine = RemoteSGLangEngine(url, group_factory=gloo, timeout_s=60)
        assert engine.healthy()
        with pytest.raises(RuntimeError, match="init_weights_update_group"):
            engine.update_weights([])
        engine.init_weights_update_group("127.0.0.1", free_port(), server_world_size=1)
        model, buckets = megatron_buckets(hf_model_dir)
        engine.update_weights(buckets)
        params = dict(FakeSGLangServer.state["oracle"].model.named_parameters())
        for bucket in buckets:
            for name, tensor in bucket:
                assert torch.equal(params[name], tensor), name
        paths = [path for path, _ in FakeSGLangServer.state["calls"]]
        assert paths == ["/health_generate", "/init_weights_update_group"] + ["/update_weights_from_distributed"] * len(buckets) + ["/flush_cache"]
        announced = [body for path, body in FakeSGLangServer.state["calls"] if path == "/update_weights_from_distributed"]
        assert [n for body in announced for n in body["names"]] == [n for bucket in buckets for n, _ in bucket]
        assert announced[0]["dtypes"][0] == "float32"
        completions = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=3))
        oracle = FakeSGLangServer.state["oracle"].generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=3))
        assert [c.token_ids for c in completions] == [c.token_ids for c in oracle]
    finally:
        server.shutdown()


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
