"""``sdzero grpo``: the GRPO baseline in the DAPO style (docs/method.md "Baselines").

Per rollout step: ``grpo.prompts_per_step`` questions from both phases, ``group_size`` samples
each from the rollout engine (holding the policy's current weights), binary rewards, advantages
normalised within each group, then ``updates_per_batch`` optimizer steps on the clipped surrogate
with token-level aggregation, a low-variance KL to the frozen starting model and an entropy bonus
(``losses.policy``). With one update per batch the old policy is the current one (ratio 1).
Then the new weights go to the engine. ``grpo.max_generations`` caps the generations so that the
baseline can be run at the same budget as SD-Zero.

``grpo.lm_head``: ``dense`` runs the whole model to logits [B, s, V/TP] and takes the log-probs and
the entropy from them (``vocab_parallel_logprobs_entropy``); ``sparse`` runs it to the final norm
and applies the output layer only at the positions that predict response tokens, over vocabulary
chunks (``sparse_logprobs_entropy``), in the training step and in the old / reference log-prob
passes alike, at every pipeline-parallel size (before the last stage both heads run the stage's
layers only).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state

from sdzero_mcore.checkpoint.source import start_source
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.question_sets import phase_questions
from sdzero_mcore.data.sample import Sample
from sdzero_mcore.losses.distill import local_response_rows, response_hidden, response_rows_and_head
from sdzero_mcore.losses.masked import masked_token_sum
from sdzero_mcore.losses.policy import (
    group_advantages,
    grpo_loss,
    sparse_logprobs_entropy,
    vocab_parallel_logprobs_entropy,
)
from sdzero_mcore.models.forward import cp_local_batch, final_hidden_states, model_device
from sdzero_mcore.parallel.pipeline import forward_only_outputs, pipeline_parallel_size
from sdzero_mcore.parallel.rank0 import data_parallel_shard
from sdzero_mcore.phases.on_policy import OnPolicyLoop
from sdzero_mcore.run_setup import build_model, check_layout, load_tokenizer, pad_id, run_prompts, setup_parallel
from sdzero_mcore.trainer import Trainer, split_micro_batches

PHASE = "grpo"


def grpo_steps(cfg: SDZeroConfig, num_questions: int) -> int:
    per_step = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    if cfg.grpo.max_generations is None:
        return max(1, num_questions // cfg.grpo.prompts_per_step)
    if cfg.grpo.max_generations < per_step:
        raise ConfigError(f"grpo.max_generations ({cfg.grpo.max_generations}) is less than one step's "
                          f"prompts_per_step x group_size ({per_step})")
    return cfg.grpo.max_generations // per_step


def collate_policy(samples: Sequence[Sample], pad_id: int) -> dict:
    """ids / labels [B, S], the response mask (positions predicting y), advantages [B]."""
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.bool)
    for row, s in enumerate(samples):
        seq = list(s.prompt_ids) + list(s.response_ids)
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(seq) - 1] = torch.tensor(seq[1:])
        mask[row, len(s.prompt_ids) - 1 : len(seq) - 1] = True
    return {"input_ids": ids, "labels": labels, "mask": mask,
            "advantages": torch.tensor([s.advantage for s in samples], dtype=torch.float32)}


def _policy_logprobs(logits: torch.Tensor, mb: dict, vocab_size: int):
    """(logprobs, entropy) [B, s_local] from the dense head's vocab-parallel ``logits``."""
    return vocab_parallel_logprobs_entropy(logits, mb["labels"], parallel_state.get_tensor_model_parallel_group(), vocab_size)


def _sparse_policy_logprobs(hidden: torch.Tensor, head, mb: dict):
    """(logprobs, entropy) [B, s_local] from the sparse head: the final-norm ``hidden`` states
    [T_local, H] at the micro-batch's ``response_rows`` and their ``head``, 0 elsewhere."""
    return sparse_logprobs_entropy(hidden, head, mb["labels"], parallel_state.get_tensor_model_parallel_group())


def _fixed_logprobs_forward(model, mb: dict, *, sparse: bool) -> torch.Tensor:
    """A frozen pass's stage output (the logits, or the final-norm hidden states for the sparse
    head; before the last pipeline stage, the activation the schedule sends on)."""
    if sparse:
        return final_hidden_states(model, mb)
    return model(mb["input_ids"], mb["position_ids"], None)


def _fixed_logprobs(model, mb: dict, output: torch.Tensor, *, sparse: bool, vocab_size: int) -> torch.Tensor:
    """The log-probs [B, s_local] of ``model`` (an old policy or the reference) from its last
    stage's ``output`` (:func:`_fixed_logprobs_forward`)."""
    if sparse:
        return _sparse_policy_logprobs(*response_rows_and_head(model, output, *mb["response_rows"]), mb)[0]
    return _policy_logprobs(output, mb, vocab_size)[0]


def grpo_step(loop: OnPolicyLoop, reference, step: int, *, vocab_size: int, pad_id: int, gcfg) -> dict:
    """One rollout step: ``group_size`` samples per question, group-normalised advantages, then
    ``updates_per_batch`` optimizer steps, and the new weights into the engine."""
    _, indices, _ = loop.questions_for(step, gcfg.prompts_per_step)
    scored = loop.rollout(indices, n=gcfg.group_size, seed=loop.cfg.rollout.seed + step,
                          max_new_tokens=gcfg.max_response_tokens)
    rewards = torch.tensor([s.reward for s in scored], dtype=torch.float32).view(len(indices), gcfg.group_size)
    advantages = group_advantages(rewards).flatten().tolist()
    samples = [replace(s, advantage=a) for s, a in zip(scored, advantages) if s.response_ids]
    metrics = {}
    if samples:
        metrics = train_on_groups(loop.trainer, reference, samples, vocab_size, pad_id, gcfg)
    else:  # every response empty: nothing to train on, the steps still count (same on all ranks)
        for _ in range(gcfg.updates_per_batch):
            loop.trainer.skip_step()
    metrics.update(
        reward_rate=float(rewards.mean()),
        zero_advantage_groups=float((rewards.std(dim=1) == 0).float().mean()),
        response_length=sum(len(s.response_ids) for s in scored) / max(1, len(scored)),
    )
    loop.sync_weights()
    return metrics


def run_grpo(cfg: SDZeroConfig, init_from: Optional[str] = None, *, max_steps: Optional[int] = None) -> Path:
    """Train with GRPO from ``init_from`` (default: model.hf_dir / model.mcore_dir); returns the final checkpoint."""
    gcfg = cfg.grpo
    source = start_source(cfg, init_from)
    check_layout(cfg, source)
    tokenizer = load_tokenizer(source)
    phase1, phase2 = phase_questions(cfg, tokenizer)
    questions = phase1 + phase2
    run = run_prompts(cfg, source, tokenizer)
    prompts = [run.prompt("student", q.question) for q in questions]
    rollout_steps = grpo_steps(cfg, len(questions))
    updates = gcfg.updates_per_batch
    if max_steps is not None:  # optimizer steps, as for every phase: whole rollout batches of them
        rollout_steps = min(rollout_steps, math.ceil(max_steps / updates))

    setup_parallel(cfg)
    policy = build_model(cfg, source)
    reference = build_model(cfg, source).eval().requires_grad_(False) if gcfg.kl_coef > 0 else None
    trainer = Trainer(policy, gcfg.optimizer, total_steps=rollout_steps * updates, run_dir=cfg.output_dir, phase=PHASE,
                      hf_files_dir=source.hf_files_dir, logging_cfg=cfg.logging, checkpoint_cfg=cfg.checkpoint)
    if cfg.checkpoint.resume and trainer.latest_checkpoint() is not None:
        trainer.load_checkpoint(trainer.latest_checkpoint())
    loop = OnPolicyLoop(cfg, PHASE, trainer=trainer, policy=policy, source=source, tokenizer=tokenizer,
                        questions=questions, prompts=prompts)
    step_fn = lambda step: grpo_step(loop, reference, step, vocab_size=policy.hf_arch.vocab_size,  # noqa: E731
                                     pad_id=pad_id(tokenizer), gcfg=gcfg)
    return loop.run(step_fn, rollout_steps=rollout_steps, updates_per_rollout=updates)


def grpo_forward_step(gcfg, vocab_size: int):
    """The policy's forward step: logits, then the clipped surrogate (+ KL, - entropy) summed over
    this rank's response tokens; the logs are the parts' sums. With ``grpo.lm_head=sparse`` the
    output is the final-norm hidden states at the response positions and the loss applies the
    output layer to them (``sparse_logprobs_entropy``). At pipeline-parallel size > 1 ``model`` is
    one stage (one chunk, with virtual stages); before the last its output goes to the next stage
    and the loss function is never called."""
    sparse = gcfg.lm_head == "sparse"

    def forward_step(model, mb):
        def policy_loss(logprobs, entropy):
            loss = grpo_loss(
                logprobs, mb.get("old_logprobs", logprobs.detach()), mb["advantages"], mb["mask"].bool(),
                clip_low=gcfg.clip_low, clip_high=gcfg.clip_high, ref_logprobs=mb.get("ref_logprobs"),
                kl_coef=gcfg.kl_coef, entropy=entropy, entropy_coef=gcfg.entropy_coef,
                num_tokens=1,  # sums: the trainer's per-token contract divides by the global count
            )
            _, num_tokens = masked_token_sum(logprobs.detach(), mb["mask"])
            logs = {"pg_loss": loss.pg_loss, "clip_fraction": loss.clip_fraction, "entropy": loss.entropy}
            if loss.kl is not None:
                logs["kl"] = loss.kl
            return loss.objective, num_tokens, logs

        if sparse:
            hidden, head = response_hidden(model, mb, *mb["response_rows"])
            return hidden, lambda hidden: policy_loss(*_sparse_policy_logprobs(hidden, head, mb))
        return (model(mb["input_ids"], mb["position_ids"], None),
                lambda logits: policy_loss(*_policy_logprobs(logits, mb, vocab_size)))

    return forward_step


def train_on_groups(trainer, reference, samples: Sequence[Sample], vocab_size: int, pad_id: int, gcfg) -> dict:
    """``updates_per_batch`` optimizer steps over the rollout batch, each on an equal slice of it."""
    device = model_device(trainer.model)
    per_update = math.ceil(len(samples) / gcfg.updates_per_batch)
    sparse = gcfg.lm_head == "sparse"

    def prepare(chunk: Sequence[Sample], filler: bool) -> dict:
        batch = collate_policy(chunk, pad_id)
        if filler:
            batch["mask"].zero_()
        extra = {k: v.to(device) for k, v in batch.items() if k not in ("input_ids", "advantages")}
        mb = cp_local_batch(batch["input_ids"].to(device), extra)
        mb["advantages"] = batch["advantages"].to(device)
        if sparse:  # this rank's positions of the mask (collate_policy's), from host tensors
            starts = torch.tensor([len(s.prompt_ids) for s in chunk])
            lengths = torch.tensor([0 if filler else len(s.response_ids) for s in chunk])
            mb["response_rows"] = local_response_rows(starts, lengths, batch["input_ids"].shape[1])
        return mb

    slices = [samples[i : i + per_update] for i in range(0, len(samples), per_update)]
    prepared_slices = []
    for chunk in slices:  # old and reference log-probs first: both are fixed for the whole batch
        micro = [(c, False) for c in split_micro_batches(
            data_parallel_shard(chunk), gcfg.micro_batch_size, gcfg.max_tokens_per_micro_batch,
            lambda s: len(s.prompt_ids) + len(s.response_ids))]
        prepared = [prepare(c, filler) for c, filler in micro or [(chunk[:1], True)]]
        _add_fixed_logprobs(trainer.model, reference, prepared, vocab_size, gcfg)
        prepared_slices.append(prepared)
    while len(prepared_slices) < gcfg.updates_per_batch:  # fewer samples than updates: repeat the last slice
        prepared_slices.append(prepared_slices[-1])

    totals: dict = {}
    for prepared in prepared_slices:
        metrics = trainer.train_step(prepared, grpo_forward_step(gcfg, vocab_size))
        for key in ("pg_loss", "clip_fraction", "entropy", "kl"):  # sums over the slice's tokens -> means
            if key in metrics:
                metrics[key] = metrics[key] / metrics["num_tokens"] if metrics["num_tokens"] > 0 else math.nan
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0.0) + value / len(prepared_slices)
    totals["response_tokens"] = float(sum(len(s.response_ids) for s in samples))
    return totals


def _add_fixed_logprobs(policy, reference, prepared: Sequence[dict], vocab_size: int, gcfg) -> None:
    """The old policy's (with more than one update per batch) and the reference's log-probs of every
    micro-batch, kept in it as ``old_logprobs`` / ``ref_logprobs``. At pipeline-parallel size > 1
    they go through megatron-core's forward-only schedule and are kept on the last stage, where the
    loss reads them (the other stages never run the loss)."""
    models = {}
    if gcfg.updates_per_batch > 1:
        models["old_logprobs"] = policy
    if reference is not None:
        models["ref_logprobs"] = reference
    options = dict(sparse=gcfg.lm_head == "sparse", vocab_size=vocab_size)
    forward = partial(_fixed_logprobs_forward, sparse=options["sparse"])
    for key, model in models.items():
        if pipeline_parallel_size() > 1:
            logprobs = forward_only_outputs(model, prepared, forward,
                                            lambda output, mb, m=model: _fixed_logprobs(m, mb, output, **options))
        else:
            with torch.no_grad():
                logprobs = [_fixed_logprobs(model, mb, forward(model, mb), **options) for mb in prepared]
        for mb, value in zip(prepared, logprobs):  # at PP > 1 empty on all but the last stage
            mb[key] = value
