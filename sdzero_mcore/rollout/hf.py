"""The ``hf`` rollout backend: a transformers model in-process. The embedded default and the test oracle.

Batched sampling with a KV cache (``model.generate`` over left-padded prompts), on CPU or GPU.
Weights arrive from the trainer as full HF-named tensors (``parallel.resharding``) and are copied
into the model's parameters in place, so the engine never holds a second copy of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sdzero_mcore.rollout.base import Completion, NamedTensors, SamplingParams, check_prompts


class HFRolloutEngine:
    """``RolloutEngine`` over a ``transformers`` causal LM."""

    def __init__(self, model, tokenizer=None, *, device: Optional[torch.device] = None, max_batch_size: int = 64):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        if device is None:  # the trainer's GPU when there is one: generating on the CPU would be hopeless
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        self.device = torch.device(device)
        self.model.to(self.device)
        self.max_batch_size = max_batch_size
        self.asleep = False
        self.vocab_size = model.config.vocab_size
        self.pad_id = self._pad_id()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device=None, **kwargs):
        """Load weights, config and tokenizer from a HF directory."""
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return cls(model, _load_tokenizer(path), device=device, **kwargs)

    @classmethod
    def from_config(cls, path: str | Path, *, dtype: torch.dtype = torch.float32, device=None, **kwargs):
        """The architecture (and tokenizer) of a HF directory with uninitialised weights, to be filled
        by :meth:`update_weights`. A megatron checkpoint's ``hf/`` subdirectory is such a directory."""
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls(model, _load_tokenizer(path), device=device, **kwargs)

    def _pad_id(self) -> int:
        for source in (self.tokenizer, self.model.generation_config, self.model.config):
            for attr in ("pad_token_id", "eos_token_id"):
                value = getattr(source, attr, None) if source is not None else None
                if isinstance(value, (list, tuple)):
                    value = value[0] if value else None
                if value is not None:
                    return int(value)
        return 0

    # --- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Completion]:
        if self.asleep:
            raise RuntimeError("the hf rollout engine is asleep; call wake() before generate()")
        prompts = check_prompts(prompt_ids, self.vocab_size)
        # One row per (prompt, sample), batched by max_batch_size rows.
        rows = [(p, s) for p in range(len(prompts)) for s in range(sampling.n)]
        completions: list[Completion] = []
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            for start in range(0, len(rows), self.max_batch_size):
                chunk = rows[start : start + self.max_batch_size]
                completions += self._generate_rows([prompts[p] for p, _ in chunk], chunk, sampling)
        return completions

    def _generate_rows(self, prompts: list[list[int]], rows, sampling: SamplingParams) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):  # left padding: every row's next token is at the end
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[i, width - len(prompt) :] = 1

        stop = list(sampling.stop_token_ids)
        # A fresh GenerationConfig rather than the model's: only the given stop ids end a sample.
        config = GenerationConfig(
            max_new_tokens=sampling.max_new_tokens,
            do_sample=not sampling.greedy,
            temperature=sampling.temperature if not sampling.greedy else None,
            top_p=sampling.top_p if not sampling.greedy else None,
            top_k=(sampling.top_k if sampling.top_k > 0 else 0) if not sampling.greedy else None,
            eos_token_id=stop or None,
            pad_token_id=self.pad_id,
            output_logits=sampling.return_logprobs,
            return_dict_in_generate=True,
            use_cache=True,
        )
        kwargs = dict(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            generation_config=config,
        )
        out = self.model.generate(**kwargs)
        generated = out.sequences[:, width:].cpu()
        logprobs = None
        if sampling.return_logprobs:
            # Log-probs of the sampled tokens under the model's distribution at the sampling
            # temperature (before top-k / top-p truncation), as SGLang reports them.
            scale = sampling.temperature if not sampling.greedy else 1.0
            steps = torch.stack(out.logits, dim=1).float() / scale  # [rows, new, V]
            logprobs = torch.log_softmax(steps, dim=-1).gather(-1, generated[:, : steps.shape[1], None].to(steps.device))
            logprobs = logprobs[..., 0].cpu()
        completions = []
        stop_set = set(stop)
        for i, (prompt_index, sample_index) in enumerate(rows):
            tokens = generated[i].tolist()
            finish = "length"
            for j, token in enumerate(tokens):
                if token in stop_set:
                    tokens, finish = tokens[: j + 1], "stop"
                    break
            tokens = tokens[: sampling.max_new_tokens]
            completions.append(
                Completion(
                    prompt_index=prompt_index,
                    sample_index=sample_index,
                    token_ids=tokens,
                    text=self.decode(tokens),
                    finish_reason=finish,
                    logprobs=logprobs[i, : len(tokens)].tolist() if logprobs is not None else None,
                )
            )
        return completions

    def decode(self, token_ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # --- weights and memory ------------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, buckets: Iterable[NamedTensors]) -> None:
        """Copy streamed HF tensors into the parameters in place; every weight must arrive exactly once."""
        params = dict(self.model.named_parameters())  # tied weights appear once, under their first name
        seen: set[str] = set()
        for bucket in buckets:
            for name, tensor in bucket:
                if name not in params:
                    raise ValueError(f"update_weights: unknown tensor {name!r} for {type(self.model).__name__}")
                if name in seen:
                    raise ValueError(f"update_weights: tensor {name!r} arrived twice")
                target = params[name]
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"update_weights: {name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
                    )
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))
                seen.add(name)
        missing = sorted(set(params) - seen)
        if missing:
            raise ValueError(f"update_weights: {len(missing)} weights were not sent, e.g. {missing[:5]}")

    def sleep(self) -> None:
        """On a GPU, move the weights to host memory so that training can use the device."""
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self.asleep = True

    def wake(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
        self.asleep = False

    def shutdown(self) -> None:
        """Drop the model (and its accelerator memory); the engine cannot be used afterwards."""
        self.model = None
        self.asleep = True
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _load_tokenizer(path: str | Path):
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None  # a directory without tokenizer files: completions carry ids, and empty text
