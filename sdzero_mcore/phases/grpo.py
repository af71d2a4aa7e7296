"""``sdzero grpo``: the GRPO baseline in the DAPO style (PAPER.md "Baselines").

Per rollout step: ``grpo.prompts_per_step`` questions from both phases, ``group_size`` samples
each from the rollout engine (holding the policy's current weights), binary rewards, advantages
normalised within each group, then ``updates_per_batch`` optimizer steps on the clipped surrogate
with token-level aggregation, a low-variance KL to the frozen starting model and an entropy bonus
(``losses.policy``). With one update per batch the old policy is the current one (ratio 1).
Then the new weights go to the engine. ``grpo.max_generations`` caps the generations so that the
baseline can be run at the same budget as SD-Zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.phases import common

PHASE = "grpo"


@dataclass
class GroupSample:
    """One scored sample of a group, as token ids, with its advantage."""

    prompt_ids: list[int]
    response_ids: list[int]
    reward: int
    advantage: float


def grpo_steps(cfg: SDZeroConfig, num_questions: int) -> int:
    per_step = cfg.grpo.prompts_per_step * cfg.grpo.group_size
    if cfg.grpo.max_generations is None:
        return max(1, num_questions // cfg.grpo.prompts_per_step)
    if cfg.grpo.max_generations < per_step:
        raise ConfigError(f"grpo.max_generations ({cfg.grpo.max_generations}) is less than one step's "
                          f"prompts_per_step x group_size ({per_step})")
    return cfg.grpo.max_generations // per_step


def collate_policy(samples: Sequence[GroupSample], pad_id: int) -> dict:
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


def _policy_logprobs(model, mb: dict, vocab_size: int):
    from megatron.core import parallel_state

    from sdzero_mcore.losses.policy import vocab_parallel_logprobs_entropy

    logits = model(mb["input_ids"], mb["position_ids"], None)
    return vocab_parallel_logprobs_entropy(logits, mb["labels"], parallel_state.get_tensor_model_parallel_group(), vocab_size)


def run_grpo(cfg: SDZeroConfig, init_from: Optional[str] = None, *, max_steps: Optional[int] = None) -> Path:
    """Train with GRPO from ``init_from`` (default: model.hf_dir / model.mcore_dir); returns the final checkpoint."""
    from tqdm import tqdm

    from sdzero_mcore.data.prompts import default_stop_ids, prompt_ids
    from sdzero_mcore.losses.policy import group_advantages
    from sdzero_mcore.phases.self_distill import step_questions
    from sdzero_mcore.rollout import make_rollout_engine, sampling_from_config
    from sdzero_mcore.trainer import Trainer

    gcfg = cfg.grpo
    source = common.start_source(cfg, init_from)
    common.check_layout(cfg, source)
    tokenizer = common.load_tokenizer(source)
    phase1, phase2 = common.phase_questions(cfg)
    questions = phase1 + phase2
    prompts = [prompt_ids(tokenizer, q.question, template=cfg.data.prompt_template) for q in questions]
    rollout_steps = grpo_steps(cfg, len(questions))
    updates = gcfg.updates_per_batch
    if max_steps is not None:  # optimizer steps, as for every phase: whole rollout batches of them
        rollout_steps = min(rollout_steps, math.ceil(max_steps / updates))

    common.setup_parallel(cfg)
    policy = common.build_model(cfg, source)
    reference = common.build_model(cfg, source).eval().requires_grad_(False) if gcfg.kl_coef > 0 else None
    vocab_size = policy.hf_arch.vocab_size
    run_dir = Path(cfg.output_dir)
    trainer = Trainer(policy, gcfg.optimizer, total_steps=rollout_steps * updates, run_dir=run_dir, phase=PHASE,
                      hf_files_dir=source.hf_files_dir, logging_cfg=cfg.logging, checkpoint_cfg=cfg.checkpoint)
    if cfg.checkpoint.resume and trainer.latest_checkpoint() is not None:
        trainer.load_checkpoint(trainer.latest_checkpoint())
    stop_ids = sorted(default_stop_ids(tokenizer))
    engine = reward_fn = None
    if common.is_rank0():
        engine = make_rollout_engine(cfg.rollout, source.hf_files_dir, tokenizer=tokenizer, dtype=common.params_dtype(cfg))
        reward_fn = common.make_reward_fn(cfg, questions)
    common.sync_engine(engine, policy, cfg.rollout.weight_sync_bucket_mb)
    counters = trainer.state.data.setdefault("counters", {"generations": 0, "generated_tokens": 0})
    progress = tqdm(total=rollout_steps, initial=trainer.state.step // updates, desc="grpo",
                    disable=not (cfg.logging.progress and common.is_rank0()))
    try:
        while trainer.state.step < rollout_steps * updates:
            step = trainer.state.step // updates
            _, indices, _ = step_questions(step, gcfg.prompts_per_step, len(questions), cfg.seed)
            scored = None
            if engine is not None:
                engine.wake()
                sampling = replace(sampling_from_config(cfg.rollout, stop_token_ids=stop_ids, seed=cfg.rollout.seed + step),
                                   n=gcfg.group_size, max_new_tokens=min(gcfg.max_response_tokens, cfg.rollout.max_new_tokens))
                completions = engine.generate([prompts[i] for i in indices], sampling)
                targets = [common.reward_target(questions[i]) for i in indices for _ in range(gcfg.group_size)]
                results = reward_fn.score_batch([c.text for c in completions], targets)
                scored = [(c.token_ids, int(r.reward)) for c, r in zip(completions, results)]
                engine.sleep()
            scored = common.broadcast_object(scored)
            counters["generations"] += len(scored)
            counters["generated_tokens"] += sum(len(ids) for ids, _ in scored)
            rewards = torch.tensor([r for _, r in scored], dtype=torch.float32).view(len(indices), gcfg.group_size)
            advantages = group_advantages(rewards).flatten().tolist()
            samples = [
                GroupSample(prompts[indices[j // gcfg.group_size]], ids, r, a)
                for j, ((ids, r), a) in enumerate(zip(scored, advantages)) if ids
            ]
            metrics = {}
            if samples:
                metrics = train_on_groups(trainer, reference, samples, vocab_size, common.pad_id(tokenizer), gcfg)
            else:  # every response empty: nothing to train on, the step still counts (same on all ranks)
                for _ in range(updates):
                    trainer.state.step += 1
                    trainer.scheduler.step()
            metrics.update(
                reward_rate=float(rewards.mean()),
                zero_advantage_groups=float((rewards.std(dim=1) == 0).float().mean()),
                response_length=sum(len(ids) for ids, _ in scored) / max(1, len(scored)),
                **counters,
            )
            common.sync_engine(engine, policy, cfg.rollout.weight_sync_bucket_mb)
            trainer.log(metrics, tokens=metrics.get("response_tokens"))
            progress.update(1)
            progress.set_postfix(reward=f"{metrics['reward_rate']:.2f}")
            if cfg.checkpoint.save_interval and (step + 1) % cfg.checkpoint.save_interval == 0:
                trainer.save_checkpoint()
        if common.is_rank0():  # before the final checkpoint, which marks the phase complete
            common.record_budget(run_dir, PHASE, counters["generations"], counters["generated_tokens"])
        final = trainer.save_checkpoint(final=True)
    finally:
        common.release(progress, trainer, reward_fn, engine)
    return final


def train_on_groups(trainer, reference, samples: Sequence[GroupSample], vocab_size: int, pad_id: int, gcfg) -> dict:
    """``updates_per_batch`` optimizer steps over the rollout batch, each on an equal slice of it."""
    from megatron.core import parallel_state

    from sdzero_mcore.losses.policy import grpo_loss
    from sdzero_mcore.models.forward import cp_local_batch, model_device
    from sdzero_mcore.parallel.context_parallel import global_token_count

    device = model_device(trainer.model)
    dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_cp_size = dist.get_world_size(dp_cp)
    per_update = math.ceil(len(samples) / gcfg.updates_per_batch)

    def prepare(chunk: Sequence[GroupSample], filler: bool) -> dict:
        batch = collate_policy(chunk, pad_id)
        if filler:
            batch["mask"].zero_()
        extra = {k: v.to(device) for k, v in batch.items() if k not in ("input_ids", "advantages")}
        mb = cp_local_batch(batch["input_ids"].to(device), extra)
        mb["advantages"] = batch["advantages"].to(device)
        return mb

    slices = [samples[i : i + per_update] for i in range(0, len(samples), per_update)]
    prepared_slices = []
    for chunk in slices:  # old and reference log-probs first: both are fixed for the whole batch
        mine = common.data_parallel_shard(chunk)
        micro = [(c, False) for c in common.split_micro_batches(
            mine, gcfg.micro_batch_size, gcfg.max_tokens_per_micro_batch, lambda s: len(s.prompt_ids) + len(s.response_ids))]
        micro = common.pad_micro_batches(micro, lambda: (chunk[:1], True))
        prepared = [prepare(c, filler) for c, filler in micro]
        with torch.no_grad():
            for mb in prepared:
                if gcfg.updates_per_batch > 1:
                    mb["old_logprobs"] = _policy_logprobs(trainer.model, mb, vocab_size)[0]
                if reference is not None:
                    mb["ref_logprobs"] = _policy_logprobs(reference, mb, vocab_size)[0]
        prepared_slices.append(prepared)
    while len(prepared_slices) < gcfg.updates_per_batch:  # fewer samples than updates: repeat the last slice
        prepared_slices.append(prepared_slices[-1])

    totals: dict = {}
    for prepared in prepared_slices:
        num_tokens = global_token_count(torch.cat([mb["mask"].flatten() for mb in prepared]))

        def loss_fn(ddp, mb):
            logprobs, entropy = _policy_logprobs(ddp, mb, vocab_size)
            loss = grpo_loss(
                logprobs, mb.get("old_logprobs", logprobs.detach()), mb["advantages"], mb["mask"].bool(),
                clip_low=gcfg.clip_low, clip_high=gcfg.clip_high, ref_logprobs=mb.get("ref_logprobs"),
                kl_coef=gcfg.kl_coef, entropy=entropy, entropy_coef=gcfg.entropy_coef, num_tokens=num_tokens,
            )
            # each value is this rank's share of a global token mean: summed over ranks for the log
            parts = [loss.pg_loss, loss.clip_fraction, loss.entropy]
            if loss.kl is not None:
                parts.append(loss.kl)
            logged = torch.stack([p.detach().float() for p in parts])
            if dp_cp_size > 1:
                dist.all_reduce(logged, group=dp_cp)
            names = ["pg_loss", "clip_fraction", "entropy", "kl"][: len(parts)]
            # megatron-core's DDP averages gradients over DP x CP; the objective is a global-mean share
            return loss.objective * dp_cp_size, dict(zip(names, logged.tolist()))

        metrics = trainer.train_step(prepared, loss_fn)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0.0) + value / len(prepared_slices)
    totals["response_tokens"] = float(sum(len(s.response_ids) for s in samples))
    return totals
