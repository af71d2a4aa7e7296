"""The ``sglang`` rollout backend (SGLang >= 0.5.5): colocated in-process engine, or a remote server.

Colocated (:class:`SGLangRolloutEngine`): ``sglang.Engine`` in the training process's node, on the
same GPUs, with ``enable_memory_saver`` so that its weights and KV cache can be released while the
trainer runs. Weights are synced bucket by bucket through ``update_weights_from_tensor`` with
``load_format="flattened_bucket"``: each bucket's tensors are flattened into one tensor per dtype,
serialized as a CUDA IPC handle, and the engine receives one payload per engine TP rank (its
scheduler for TP rank i deserializes entry i). The memory order is slime's: release everything
for training; before the sync take back the weights only; after the sync (and ``flush_cache``)
take back the KV cache and CUDA graphs.

Remote (:class:`RemoteSGLangEngine`): an SGLang server or router URL. Generation over
``/generate``; weights by NCCL broadcast from training rank 0 after ``/init_weights_update_group``,
announced per bucket with ``/update_weights_from_distributed``; then ``/flush_cache``.

Every request (one per sample) carries its own ``sampling_seed``, from the call's seed, the prompt
and the sample index: under SGLang's deterministic sampling, requests with the same seed sample the
same tokens, and n samples of a prompt must differ.

SGLang cannot be installed on the machines this project is developed on; this module is written
against SGLang's documented API and checked by contract tests with a recording fake engine and a
fake server (tests/sglang_fakes.py, tests/unit/test_rollout_sglang.py), not run against SGLang itself.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections import OrderedDict
from datetime import timedelta
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import Backend, PrefixStore, _new_process_group_helper, _world, rendezvous

from sdzero_mcore.rollout.base import Completion, NamedTensors, SamplingParams, check_prompts, request_seed

# sglang.srt.constants: GPU_MEMORY_TYPE_WEIGHTS, GPU_MEMORY_TYPE_KV_CACHE, GPU_MEMORY_TYPE_CUDA_GRAPH
TAG_WEIGHTS, TAG_KV_CACHE, TAG_CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
ALL_TAGS = (TAG_WEIGHTS, TAG_KV_CACHE, TAG_CUDA_GRAPH)


def import_sglang():
    """The sglang module, or an error that says how to get it."""
    try:
        import sglang
    except ImportError as error:
        raise ImportError(
            "rollout.backend='sglang' needs SGLang >= 0.5.5 (pip install 'sdzero-mcore[gpu]' or "
            "pip install 'sglang>=0.5.5'); it is not importable here. Use rollout.backend='hf' for the "
            f"in-process transformers engine. ({error})"
        ) from error
    return sglang


def sampling_params_dict(sampling: SamplingParams, seed: Optional[int] = None) -> dict:
    """SGLang's ``sampling_params`` of one request (one sample per request; see ``_expand``)."""
    params = {
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "max_new_tokens": sampling.max_new_tokens,
        "stop_token_ids": list(sampling.stop_token_ids),
        "skip_special_tokens": False,
        "no_stop_trim": True,  # keep the stop token in output_ids: the trainer learns it too
    }
    if seed is not None:
        params["sampling_seed"] = seed
    return params


def request_sampling_params(sampling: SamplingParams, requests: list[tuple[int, int, list[int]]]) -> list[dict]:
    """One ``sampling_params`` per request, each with its own seed (module docstring)."""
    return [
        sampling_params_dict(sampling, None if sampling.seed is None else request_seed(sampling.seed, p, s))
        for p, s, _ in requests
    ]


def _expand(prompts: list[list[int]], n: int) -> list[tuple[int, int, list[int]]]:
    # n samples as n requests with the same prompt: the order of outputs is then ours to define,
    # and SGLang's radix cache shares the prompt's KV between them.
    return [(p, s, prompts[p]) for p in range(len(prompts)) for s in range(n)]


def completion_from_output(output: dict, prompt_index: int, sample_index: int, decode) -> Completion:
    """A :class:`Completion` from one SGLang result dict (``output_ids``, ``meta_info``)."""
    meta = output.get("meta_info", {})
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else finish
    if kind not in ("stop", "length"):
        raise RuntimeError(f"SGLang request ({prompt_index}, {sample_index}) finished with {finish!r}")
    token_ids = list(output["output_ids"])
    logprobs = None
    if "output_token_logprobs" in meta:
        # entries are (logprob, token_id, text_or_None)
        logprobs = [float(entry[0]) for entry in meta["output_token_logprobs"]]
    text = output.get("text") or decode(token_ids)
    return Completion(prompt_index, sample_index, token_ids, text, kind, logprobs, meta={"sglang": meta})


def check_engine_result(method: str, result: Any) -> None:
    """SGLang reports a failed weight update as ``(False, message)`` (or ``{"success": False}``)
    instead of raising; an engine left with stale weights must not go unnoticed."""
    if isinstance(result, tuple) and result and result[0] is False:
        raise RuntimeError(f"SGLang {method} failed: {result[1] if len(result) > 1 else result}")
    if isinstance(result, dict) and result.get("success") is False:
        raise RuntimeError(f"SGLang {method} failed: {result.get('message', result)}")


def bucket_payloads_by_dtype(bucket: NamedTensors) -> "OrderedDict[torch.dtype, list[tuple[str, torch.Tensor]]]":
    """Group a bucket's tensors by dtype: a flattened bucket holds a single dtype."""
    groups: "OrderedDict[torch.dtype, list]" = OrderedDict()
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return groups


class SGLangRolloutEngine:
    """Colocated ``sglang.Engine``. Call every method on every rank of ``ipc_group``.

    ``ipc_group`` holds the training ranks that share this engine's GPUs (one per engine TP rank;
    slime's "IPC gather group"); its first rank owns the engine. Each rank serializes the bucket
    from its own GPU and the payloads are gathered to the owner, so engine TP rank i reads
    tensors that already sit on its GPU. With ``ipc_group=None`` (one training process per
    engine) the owner's payload serves every engine TP rank.

    ``load_weights=False`` starts the engine on dummy weights instead of reading ``model_path``'s
    (an sdzero-mcore checkpoint's ``hf/`` folder has none): the first :meth:`update_weights` fills them.
    """

    def __init__(
        self,
        model_path: str,
        *,
        tp_size: int = 1,
        base_gpu_id: int = 0,
        mem_fraction_static: float = 0.5,
        tokenizer=None,
        ipc_group: Optional[dist.ProcessGroup] = None,
        load_weights: bool = True,
        engine: Any = None,
        engine_kwargs: Optional[dict] = None,
        serializer: Any = None,
        bucket_cls: Any = None,
    ):
        self.ipc_group = ipc_group
        self.is_owner = ipc_group is None or dist.get_rank(ipc_group) == 0
        self.tokenizer = tokenizer
        self.tp_size = tp_size
        self.released: set[str] = set()
        if serializer is None or bucket_cls is None:
            serializer, bucket_cls = self._weight_sync_classes()
        self.serializer, self.bucket_cls = serializer, bucket_cls
        self.engine = engine
        if self.engine is None and self.is_owner:
            sglang = import_sglang()
            options = dict(
                model_path=model_path,
                tp_size=tp_size,
                base_gpu_id=base_gpu_id,
                mem_fraction_static=mem_fraction_static,
                enable_memory_saver=True,
                skip_tokenizer_init=True,
            )
            if not load_weights:
                options["load_format"] = "dummy"
            self.engine = sglang.Engine(**options, **(engine_kwargs or {}))

    @staticmethod
    def _weight_sync_classes():
        import_sglang()
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

        return MultiprocessingSerializer, FlattenedTensorBucket

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True) if self.tokenizer else ""

    # --- generation (owner rank only) ---------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        if not self.is_owner:
            raise RuntimeError("generate() runs on the rank that owns the SGLang engine (ipc_group rank 0)")
        if self.released:
            raise RuntimeError(f"the SGLang engine has released {sorted(self.released)}; call wake() first")
        requests = _expand(check_prompts(prompt_ids), sampling.n)
        outputs = self.engine.generate(
            input_ids=[prompt for _, _, prompt in requests],
            sampling_params=request_sampling_params(sampling, requests),
            return_logprob=sampling.return_logprobs,
        )
        if len(outputs) != len(requests):
            raise RuntimeError(f"SGLang returned {len(outputs)} results for {len(requests)} requests")
        return [completion_from_output(out, p, s, self.decode) for out, (p, s, _) in zip(outputs, requests)]

    # --- weights and memory -------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Stream buckets into the engine; weights memory is taken back first if it was released."""
        if self.is_owner and TAG_WEIGHTS in self.released:
            self.engine.resume_memory_occupation(tags=[TAG_WEIGHTS])
            self.released.discard(TAG_WEIGHTS)
        for bucket in buckets:
            for named in bucket_payloads_by_dtype(bucket).values():
                flat = self.bucket_cls(named_tensors=named)
                payload = self.serializer.serialize(
                    {"flattened_tensor": flat.get_flattened_tensor(), "metadata": flat.get_metadata()},
                    output_str=True,
                )
                payloads = self._gather_payloads(payload)
                if self.is_owner:
                    check_engine_result(
                        "update_weights_from_tensor",
                        self.engine.update_weights_from_tensor(
                            named_tensors=payloads, load_format="flattened_bucket", flush_cache=False
                        ),
                    )
                if self.ipc_group is not None:
                    # the owner's engine has read the IPC handles before any rank frees its tensors
                    dist.barrier(group=self.ipc_group)
        if self.is_owner:
            self.engine.flush_cache()

    def _gather_payloads(self, payload: str) -> Optional[list[str]]:
        if self.ipc_group is None:
            return [payload] * self.tp_size
        size = dist.get_world_size(self.ipc_group)
        if size != self.tp_size:
            raise ValueError(f"ipc_group has {size} ranks but the engine has tp_size={self.tp_size}")
        gathered = [None] * size if self.is_owner else None
        dist.gather_object(payload, gathered, dst=dist.get_global_rank(self.ipc_group, 0), group=self.ipc_group)
        return gathered

    def sleep(self) -> None:
        """Release weights, KV cache and CUDA graphs (the trainer's turn on the GPU)."""
        if self.is_owner and set(ALL_TAGS) - self.released:
            self.engine.release_memory_occupation(tags=list(ALL_TAGS))
            self.released = set(ALL_TAGS)

    def wake(self) -> None:
        """Take back what is still released: weights first (if no sync did), then KV cache and graphs."""
        if not self.is_owner:
            return
        if TAG_WEIGHTS in self.released:
            self.engine.resume_memory_occupation(tags=[TAG_WEIGHTS])
            self.released.discard(TAG_WEIGHTS)
        rest = [tag for tag in (TAG_KV_CACHE, TAG_CUDA_GRAPH) if tag in self.released]
        if rest:
            self.engine.resume_memory_occupation(tags=rest)
            self.released -= set(rest)

    def shutdown(self) -> None:
        if self.is_owner and self.engine is not None:
            self.engine.shutdown()


# --- remote server ------------------------------------------------------------------------------


class RemoteSGLangEngine:
    """An SGLang server or router at ``url``. Weight sync: NCCL broadcast from training rank 0.

    The weight-update group joins training rank 0 (rank 0) with the server's ranks (1..); this
    rank builds its side (:func:`weight_update_group`) while the server joins on its side
    (``/init_weights_update_group``), as the two must rendezvous together. ``backend`` is the
    group's (both sides use it); ``timeout_s`` bounds each request and each collective.
    """

    def __init__(
        self,
        url: str,
        *,
        tokenizer=None,
        timeout_s: float = 600.0,
        backend: str = "nccl",
        group_name: str = "sdzero_weight_sync",
    ):
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        self.timeout_s = timeout_s
        self.backend = backend
        self.group_name = group_name
        self.group: Optional[dist.ProcessGroup] = None

    def _post(self, path: str, body: Optional[dict] = None) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"SGLang server {self.url}{path} answered {error.code}: {error.read()[:500]!r}") from error
        except urllib.error.URLError as error:
            raise RuntimeError(f"cannot reach the SGLang server at {self.url}{path}: {error.reason}") from error
        return json.loads(text) if text.strip() else None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health_generate", timeout=self.timeout_s) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True) if self.tokenizer else ""

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        requests = _expand(check_prompts(prompt_ids), sampling.n)
        outputs = self._post(
            "/generate",
            {
                "input_ids": [prompt for _, _, prompt in requests],
                "sampling_params": request_sampling_params(sampling, requests),
                "return_logprob": sampling.return_logprobs,
            },
        )
        if isinstance(outputs, dict):
            outputs = [outputs]
        if len(outputs) != len(requests):
            raise RuntimeError(f"SGLang returned {len(outputs)} results for {len(requests)} requests")
        return [completion_from_output(out, p, s, self.decode) for out, (p, s, _) in zip(outputs, requests)]

    def init_weights_update_group(self, master_address: str, master_port: int, server_world_size: int) -> None:
        """Rendezvous training rank 0 (rank 0) with the server's ``server_world_size`` ranks."""
        world_size = server_world_size + 1
        body = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": 1,
            "world_size": world_size,
            "group_name": self.group_name,
            "backend": self.backend,
        }

        def join():
            self.group = weight_update_group(master_address, master_port, world_size, 0, self.group_name,
                                             self.backend, timedelta(seconds=self.timeout_s))

        self._post_during("/init_weights_update_group", body, join)

    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Announce each bucket, then broadcast its tensors from rank 0 of the weight-sync group."""
        if self.group is None:
            raise RuntimeError("call init_weights_update_group() before update_weights() on a remote engine")
        for bucket in buckets:
            named = list(bucket)
            body = {
                "names": [name for name, _ in named],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in named],
                "shapes": [list(t.shape) for _, t in named],
                "group_name": self.group_name,
                "flush_cache": False,
            }

            def broadcast():
                for _, tensor in named:
                    dist.broadcast(tensor.contiguous(), src=0, group=self.group)

            self._post_during("/update_weights_from_distributed", body, broadcast)
        self._post("/flush_cache")

    def _post_during(self, path: str, body: dict, collective: Callable[[], None]) -> None:
        """POST while running our side of a collective: the server joins it inside the request."""
        answer: dict = {}

        def request():
            try:
                answer["result"] = self._post(path, body)
            except RuntimeError as error:
                answer["error"] = error

        thread = threading.Thread(target=request, daemon=True)
        thread.start()
        collective()
        thread.join(self.timeout_s)
        result = answer.get("result")
        if "error" in answer:
            raise answer["error"]
        if thread.is_alive() or not (isinstance(result, dict) and result.get("success", True)):
            raise RuntimeError(f"{path} failed: {result!r}")

    def sleep(self) -> None:
        """A remote server keeps its own GPUs; nothing to release."""

    def wake(self) -> None:
        """A remote server keeps its own GPUs; nothing to take back."""

    def shutdown(self) -> None:
        """The server outlives the run; the weight-update group is destroyed on both sides, so that
        a later phase can create it again under the same name."""
        if self.group is None:
            return
        dist.destroy_process_group(self.group)
        self.group = None
        result = self._post("/destroy_weights_update_group", {"group_name": self.group_name})
        if isinstance(result, dict) and result.get("success") is False:
            raise RuntimeError(f"/destroy_weights_update_group failed: {result.get('message', result)}")


def weight_update_group(master_address: str, master_port: int, world_size: int, rank: int, group_name: str,
                        backend: str = "nccl", timeout: timedelta = timedelta(minutes=10)) -> dist.ProcessGroup:
    """This rank's side of a weight-update group, outside torch.distributed's default world (the
    trainer keeps its own).

    Built as SGLang builds the server's side (``init_custom_process_group``): a TCP rendezvous at
    ``master_address:master_port`` (rank 0 hosts the store), the store prefixed with the group
    name, and torch's group helper, which prefixes it once more. The two sides exchange their
    connection keys through that store, so keys built any other way are never found and the first
    collective waits forever.
    """
    ipv6 = ":" in master_address and not master_address.startswith("[")
    host = f"[{master_address}]" if ipv6 else master_address
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{master_port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    # a group outside the default world has no rank map: rank i stands for itself, so that
    # dist.broadcast(src=0, group=group) names its rank 0 and destroy_process_group finds it
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group
