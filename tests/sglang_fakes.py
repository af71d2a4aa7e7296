"""Stand-ins for SGLang (it cannot be installed here), shared by the sglang backend's tests.

A recording fake of ``sglang.Engine`` with the real methods' signatures (wrong keyword names fail
with TypeError) records every call, reconstructs every weight payload the way SGLang's scheduler
does (one payload per engine TP rank, deserialized, un-flattened by its metadata) and serves
generations from a transformers model holding the weights it received. A fake SGLang HTTP server,
run in its own process, joins the weight-update group the way SGLang's server does and receives
the broadcast weights.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import types
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

from sdzero_mcore.rollout.base import SamplingParams
from sdzero_mcore.rollout.hf import HFRolloutEngine

# sglang.srt.constants' memory tags
ALL_TAGS = ("weights", "kv_cache", "cuda_graph")
# the files SGLang's default loader reads weights from
SGLANG_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt")


# --- fakes of SGLang's weight-sync helpers (same API as sglang.srt.utils / weight_sync.tensor_bucket) ---


class FakeMultiprocessingSerializer:
    """By value instead of CUDA IPC handles; same call shape: serialize(obj, output_str) / deserialize.

    A CUDA IPC handle points into the memory of the process that serialized it, and whoever opens it
    creates a CUDA context on that process's GPU: the envelope records which training rank that was.
    """

    @staticmethod
    def serialize(obj, output_str: bool = False):
        buffer = io.BytesIO()
        torch.save({"origin_rank": dist.get_rank() if dist.is_initialized() else 0, "obj": obj}, buffer)
        data = buffer.getvalue()
        return base64.b64encode(data).decode() if output_str else data

    @staticmethod
    def _envelope(data) -> dict:
        raw = base64.b64decode(data) if isinstance(data, str) else data
        return torch.load(io.BytesIO(raw), weights_only=False)

    @classmethod
    def deserialize(cls, data):
        return cls._envelope(data)["obj"]

    @classmethod
    def origin_rank(cls, data) -> int:
        return cls._envelope(data)["origin_rank"]


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


def oracle_sampling(params: dict, return_logprobs: bool = False) -> SamplingParams:
    """Our SamplingParams for one SGLang request's ``sampling_params``. The seed is honoured, as
    SGLang's deterministic sampling does: requests with the same seed sample the same tokens."""
    return SamplingParams(temperature=params["temperature"], max_new_tokens=params["max_new_tokens"],
                          stop_token_ids=tuple(params.get("stop_token_ids", ())), seed=params.get("sampling_seed"),
                          return_logprobs=return_logprobs)


class RecordingEngine:
    """``sglang.Engine`` with the signatures of SGLang 0.5.x; serves from a transformers model."""

    def __init__(self, **kwargs):
        model_path = Path(kwargs["model_path"])
        # SGLang's loader reads the weights from model_path unless told to make dummy (random) ones
        if kwargs.get("load_format", "auto") == "dummy":
            self.oracle = HFRolloutEngine.from_config(model_path)
        elif any(next(model_path.glob(pattern), None) for pattern in SGLANG_WEIGHT_PATTERNS):
            self.oracle = HFRolloutEngine.from_pretrained(model_path)
        else:
            raise RuntimeError(f"Cannot find any model weights with `{model_path}`")
        self.kwargs = kwargs
        self.calls: list[tuple[str, dict]] = []
        self.released: set[str] = set()
        self.loaded: dict[str, int] = {}  # weight name -> how many engine TP ranks loaded it
        self.payload_origins: list[list[int]] = []  # per update: the training rank behind each TP rank's payload

    def generate(self, prompt=None, sampling_params=None, input_ids=None, image_data=None, return_logprob=False,
                 logprob_start_len=None, top_logprobs_num=None, token_ids_logprob=None, lora_path=None,
                 custom_logit_processor=None, return_hidden_states=False, stream=False, bootstrap_host=None,
                 bootstrap_port=None, bootstrap_room=None, data_parallel_rank=None):
        self.calls.append(("generate", dict(input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob)))
        assert prompt is None and input_ids is not None and not self.released
        assert isinstance(sampling_params, list) and len(sampling_params) == len(input_ids)
        outputs = []
        for ids, params in zip(input_ids, sampling_params):
            done = self.oracle.generate([ids], oracle_sampling(params, return_logprob))[0]
            meta = {"finish_reason": {"type": done.finish_reason}}
            if return_logprob:
                meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(done.logprobs, done.token_ids)]
            outputs.append({"text": "", "output_ids": done.token_ids, "meta_info": meta})
        return outputs

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.calls.append(("update_weights_from_tensor", dict(load_format=load_format, flush_cache=flush_cache, n=len(named_tensors))))
        assert "weights" not in self.released, "weights must be resumed before a sync"
        assert load_format == "flattened_bucket" and len(named_tensors) == self.kwargs["tp_size"]
        self.payload_origins.append([FakeMultiprocessingSerializer.origin_rank(payload) for payload in named_tensors])
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


def install_fake_sglang(setitem=sys.modules.__setitem__) -> dict:
    """A fake ``sglang`` package exposing Engine and the two weight-sync helpers, installed with
    ``setitem(sys.modules, name, module)`` semantics (pytest's ``monkeypatch.setitem`` undoes it)."""
    modules = {name: types.ModuleType(name) for name in (
        "sglang", "sglang.srt", "sglang.srt.utils", "sglang.srt.weight_sync", "sglang.srt.weight_sync.tensor_bucket")}
    modules["sglang"].Engine = RecordingEngine
    modules["sglang.srt.utils"].MultiprocessingSerializer = FakeMultiprocessingSerializer
    modules["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorBucket = FakeFlattenedTensorBucket
    for name, module in modules.items():
        setitem(name, module)
    return modules


# --- a fake SGLang server ------------------------------------------------------------------------


def join_weight_update_group_as_sglang(body: dict, tp_rank: int, timeout: timedelta):
    """What SGLang's ``init_weights_update_group`` does on engine TP rank ``tp_rank``: a TCP
    rendezvous at the trainer's address, the store prefixed with the group name, and torch's group
    helper (which prefixes the store once more). A trainer whose keys differ never meets it."""
    store, rank, world_size = next(rendezvous(
        f"tcp://{body['master_address']}:{body['master_port']}", body["rank_offset"] + tp_rank, body["world_size"],
        timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(body["backend"]),
                                         PrefixStore(body["group_name"], store), group_name=body["group_name"],
                                         timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class FakeSGLangServer(BaseHTTPRequestHandler):
    """The HTTP endpoints of an SGLang server with one engine TP rank (rank 1 of the weight-update
    group). ``GET /test/calls`` (not SGLang's) lists the requests it received."""

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
        if self.path == "/test/calls":
            return self._reply(self.state["calls"])
        self.state["calls"].append((self.path, None))
        self._reply({}) if self.path == "/health_generate" else self._reply({"error": "no"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        self.state["calls"].append((self.path, body))
        state = self.state
        groups = state["groups"]
        if self.path == "/init_weights_update_group":
            try:
                groups[body["group_name"]] = join_weight_update_group_as_sglang(body, 0, state["group_timeout"])
            except Exception as error:  # SGLang answers a failed join with success False
                return self._reply({"success": False, "message": f"Failed to initialize custom process group: {error}."}, 400)
            return self._reply({"success": True, "message": "ok"})
        if self.path == "/update_weights_from_distributed":
            params = dict(state["oracle"].model.named_parameters())
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                tensor = torch.empty(shape, dtype=getattr(torch, dtype))
                dist.broadcast(tensor, src=0, group=groups[body["group_name"]])
                with torch.no_grad():
                    params[name].copy_(tensor)
            return self._reply({"success": True, "message": "ok"})
        if self.path == "/destroy_weights_update_group":
            dist.destroy_process_group(groups.pop(body["group_name"]))
            return self._reply({"success": True, "message": "ok"})
        if self.path == "/get_weights_by_name":
            tensor = dict(state["oracle"].model.named_parameters())[body["name"]]
            return self._reply(tensor.detach().tolist()[: body.get("truncate_size", 100)])
        if self.path == "/flush_cache":
            return self._reply({})
        if self.path == "/generate":
            params = body["sampling_params"]
            if isinstance(params, dict):  # SGLang applies one dict to every request of the batch
                params = [params] * len(body["input_ids"])
            outputs = []
            for ids, request_params in zip(body["input_ids"], params):
                done = state["oracle"].generate([ids], oracle_sampling(request_params))[0]
                outputs.append({"text": "", "output_ids": done.token_ids, "meta_info": {"finish_reason": {"type": done.finish_reason}}})
            return self._reply(outputs)
        self._reply({"error": "unknown"}, 404)


def serve_fake_sglang(hf_dir: str, port_queue, group_timeout_s: float) -> None:
    """Run a fake SGLang server (serving ``hf_dir``'s architecture) until terminated; its port goes into ``port_queue``."""
    FakeSGLangServer.state = {"calls": [], "oracle": HFRolloutEngine.from_config(hf_dir), "groups": {},
                              "group_timeout": timedelta(seconds=group_timeout_s)}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLangServer)
    port_queue.put(server.server_address[1])
    server.serve_forever()
