"""Phase 2: on-policy self-distillation (``sdzero distill``), DESIGN.md "Data flow of one Phase 2 step".

Per step: sample one response per question from the rollout engine (holding the student's
current weights), score it, build the teacher context x + y + sep + P_r + sep + y on token ids,
take the frozen teacher's top-K at the response positions, and train the student on ``topk_kl``
against it. Then push the new weights into the engine; every ``teacher_sync_interval`` steps
(and at each epoch end) copy the student into the teacher: the paper's iterative self-evolution.

Rank 0 owns the rollout engine and the reward workers; the step's samples are broadcast, every
data-parallel rank trains on its share, and every rank joins the weight sync (TP collectives).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.losses.distill import DistillSample, collate_distill, distill_loss, teacher_targets
from sdzero_mcore.models.forward import cp_size_rank, model_device
from sdzero_mcore.parallel.context_parallel import split_for_cp
from sdzero_mcore.phases import common

logger = logging.getLogger(__name__)
PHASE = "distill"


@dataclass
class Rollout:
    """One scored student sample, as token ids."""

    question_index: int
    prompt_ids: list[int]
    response_ids: list[int]
    reward: int
    finish_reason: str


def truncate_for_teacher(x_ids: Sequence[int], y_ids: Sequence[int], reward: int, tokenizer, preset, max_teacher_tokens: int):
    """The longest prefix of ``y`` whose teacher context fits ``max_teacher_tokens`` (None if none does)."""
    from sdzero_mcore.data.prompts import teacher_context

    length = len(y_ids)
    while length > 0:
        context = teacher_context(x_ids, y_ids[:length], reward, tokenizer, preset)
        if len(context.ids) <= max_teacher_tokens:
            return context, list(y_ids[:length])
        length = min(length - 1, (max_teacher_tokens - (len(context.ids) - 2 * length)) // 2)
    return None, []


def check_teacher_budget(prompts: Sequence[Sequence[int]], tokenizer, preset, max_teacher_tokens: int,
                         *, with_separator: bool = True) -> None:
    """Fail before any work when a prompt leaves no room for even one response token.

    ``prompts`` are the student prompts (SD-Zero: the teacher adds P_r and the response twice) or,
    with ``with_separator=False``, complete teacher prefixes (SDFT: the response follows once)."""
    from sdzero_mcore.data.prompts import control_ids

    separator = max(len(control_ids(tokenizer, r, preset)) for r in (0, 1)) if with_separator else 0
    response = 2 if with_separator else 1
    worst = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    needed = len(prompts[worst]) + separator + response
    if needed > max_teacher_tokens:
        what = "prompt" if with_separator else "teacher prefix (prompt + gold solution + P_r)"
        raise ConfigError(
            f"distill.max_teacher_tokens ({max_teacher_tokens}) is smaller than the teacher context of phase-2 "
            f"question {worst}: {len(prompts[worst])} {what} tokens + {separator} P_r tokens + {response} response tokens"
        )


def gold_solution_prefixes(questions: Sequence, prompts: Sequence[Sequence[int]], tokenizer, preset) -> list[list[int]]:
    """SDFT's teacher prefixes: x + the gold solution + P_r(correct); every question needs a solution."""
    from sdzero_mcore.data.prompts import revision_context
    from sdzero_mcore.phases.sft import solution_ids

    missing = [q.id for q in questions if not q.solution]
    if missing:
        raise ConfigError(
            f"distill.teacher_context=gold_solution needs a solution for every phase-2 question; {len(missing)} have none "
            f"(first: {missing[0]}); set data.solution_field or use a synthetic task"
        )
    return [revision_context(x, solution_ids(tokenizer, q.solution), 1, tokenizer, preset) for q, x in zip(questions, prompts)]


def epoch_order(num_questions: int, epoch: int, seed: int) -> list[int]:
    order = list(range(num_questions))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


def step_questions(step: int, per_step: int, num_questions: int, seed: int) -> tuple[int, list[int], bool]:
    """(epoch, question indices, whether this step ends the epoch) for a step; steps never split an epoch."""
    steps_per_epoch = max(1, num_questions // per_step)
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(num_questions, epoch, seed)
    return epoch, order[within * per_step : (within + 1) * per_step], within == steps_per_epoch - 1


@torch.no_grad()
def sync_teacher(teacher, student) -> None:
    """Copy the student's weights into the teacher (same layout, shard by shard)."""
    for (name, t), (_, s) in zip(teacher.named_parameters(), student.named_parameters()):
        t.copy_(s)


def weights_checksum(model) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def connect_remote_weight_sync(engine, rollout_cfg) -> None:
    """A remote SGLang server joins a weight-sync group with this rank (rank 0 of it) once."""
    import socket

    from sdzero_mcore.rollout.sglang import RemoteSGLangEngine

    if not isinstance(engine, RemoteSGLangEngine):
        return
    from sdzero_mcore.parallel.launch import free_port

    address = rollout_cfg.sglang_sync_address or socket.gethostbyname(socket.gethostname())
    engine.init_weights_update_group(address, rollout_cfg.sglang_sync_port or free_port(), rollout_cfg.sglang_tp_size)


def kl_by_reward(per_token: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor) -> dict:
    """Sums of KL and token counts for r = 0 and r = 1 responses (this rank's share, over CP)."""
    from megatron.core import parallel_state

    per_sample = per_token.sum(dim=1)
    if parallel_state.get_context_parallel_world_size() > 1:
        dist.all_reduce(per_sample, group=parallel_state.get_context_parallel_group())
    out = {}
    for r in (0, 1):
        chosen = rewards == r
        out[f"kl_sum_r{r}"] = float(per_sample[chosen].sum())
        out[f"tokens_r{r}"] = float(lengths.to(chosen.device)[chosen].sum())
    return out


def run_distill(cfg: SDZeroConfig, init_from: Optional[str] = None, *, max_steps: Optional[int] = None) -> Path:
    """Run Phase 2 from ``init_from`` (default: model.mcore_dir or model.hf_dir). Returns the final checkpoint."""
    from tqdm import tqdm

    from sdzero_mcore.data.prompts import control_phrases_from_config, default_stop_ids, prompt_ids
    from sdzero_mcore.rollout import make_rollout_engine, sampling_from_config
    from sdzero_mcore.trainer import Trainer

    source = common.start_source(cfg, init_from, prefer_mcore=True)
    common.check_layout(cfg, source)
    tokenizer = common.load_tokenizer(source)
    preset = control_phrases_from_config(cfg.data)
    _, questions = common.phase_questions(cfg)
    prompts = [prompt_ids(tokenizer, q.question, template=cfg.data.prompt_template) for q in questions]
    dcfg = cfg.distill
    gold_prefixes = gold_solution_prefixes(questions, prompts, tokenizer, preset) if dcfg.teacher_context == "gold_solution" else None
    check_teacher_budget(gold_prefixes or prompts, tokenizer, preset, dcfg.max_teacher_tokens, with_separator=gold_prefixes is None)
    steps_per_epoch = max(1, len(questions) // dcfg.prompts_per_step)
    total_steps = dcfg.train_steps or steps_per_epoch * dcfg.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)

    common.setup_parallel(cfg)
    student = common.build_model(cfg, source)
    teacher = common.build_model(cfg, source).eval().requires_grad_(False)
    run_dir = Path(cfg.output_dir)
    trainer = Trainer(
        student, dcfg.optimizer, total_steps=total_steps, run_dir=run_dir, phase=PHASE,
        hf_files_dir=source.hf_files_dir, logging_cfg=cfg.logging, checkpoint_cfg=cfg.checkpoint,
    )
    if cfg.checkpoint.resume and trainer.latest_checkpoint() is not None:
        # the teacher is restored too: it is the student of the last sync, not of this step
        trainer.load_checkpoint(trainer.latest_checkpoint(), extra_models={"teacher": teacher})
    stop_ids = sorted(default_stop_ids(tokenizer))
    engine = None
    reward_fn = None
    if common.is_rank0():
        engine = make_rollout_engine(cfg.rollout, source.hf_files_dir, tokenizer=tokenizer, dtype=common.params_dtype(cfg))
        connect_remote_weight_sync(engine, cfg.rollout)
        reward_fn = common.make_reward_fn(cfg, questions)
    common.sync_engine(engine, student, cfg.rollout.weight_sync_bucket_mb)
    counters = trainer.state.data.setdefault("counters", {"generations": 0, "generated_tokens": 0})

    progress = tqdm(total=total_steps, initial=trainer.state.step, desc="distill", disable=not (cfg.logging.progress and common.is_rank0()))
    try:
        while trainer.state.step < total_steps:
            step = trainer.state.step
            epoch, indices, ends_epoch = step_questions(step, dcfg.prompts_per_step, len(questions), cfg.seed)
            rollouts = None
            if engine is not None:
                engine.wake()
                sampling = replace(
                    sampling_from_config(cfg.rollout, stop_token_ids=stop_ids, seed=cfg.rollout.seed + step),
                    max_new_tokens=min(dcfg.max_response_tokens, cfg.rollout.max_new_tokens),
                )
                completions = engine.generate([prompts[i] for i in indices], sampling)
                results = reward_fn.score_batch([c.text for c in completions], [common.reward_target(questions[i]) for i in indices])
                rollouts = [
                    Rollout(i, prompts[i], c.token_ids, int(r.reward), c.finish_reason)
                    for i, c, r in zip(indices, completions, results)
                ]
                engine.sleep()
            rollouts = common.broadcast_object(rollouts)
            counters["generations"] += len(rollouts)
            counters["generated_tokens"] += sum(len(r.response_ids) for r in rollouts)

            samples, kept = [], []
            for rollout in rollouts:
                if not rollout.response_ids:
                    continue
                if gold_prefixes is not None:  # SDFT: the teacher reads the gold solution, not y
                    prefix = gold_prefixes[rollout.question_index]
                    y = rollout.response_ids[: dcfg.max_teacher_tokens - len(prefix)]
                else:
                    context, y = truncate_for_teacher(rollout.prompt_ids, rollout.response_ids, rollout.reward, tokenizer, preset, dcfg.max_teacher_tokens)
                    prefix = context.ids[: context.response_start] if context is not None else None
                if prefix is None or not y:
                    continue
                samples.append(DistillSample(rollout.prompt_ids, y, prefix))
                kept.append(rollout)
            if not samples:  # every response empty or unfittable: no data, no update (same on all ranks)
                trainer.state.step += 1
                trainer.scheduler.step()
                trainer.log({"skipped": True, "reason": "no trainable responses", **counters})
                progress.update(1)
                continue
            pairs = list(zip(samples, kept))
            metrics = train_on_samples(trainer, teacher, common.data_parallel_shard(pairs), pairs[0], tokenizer, dcfg)
            metrics.update(
                reward_rate=sum(r.reward for r in rollouts) / max(1, len(rollouts)),
                response_length=sum(len(r.response_ids) for r in rollouts) / max(1, len(rollouts)),
                epoch=epoch,
                **counters,
            )
            common.sync_engine(engine, student, cfg.rollout.weight_sync_bucket_mb)
            interval = dcfg.teacher_sync_interval
            if (interval and trainer.state.step % interval == 0) or ends_epoch:
                sync_teacher(teacher, student)
                metrics["teacher_synced"] = True
            metrics["teacher_checksum"] = weights_checksum(teacher)
            trainer.log(metrics, tokens=metrics.get("response_tokens"))
            progress.update(1)
            progress.set_postfix(kl=f"{metrics.get('kl_per_token', float('nan')):.4f}", reward=f"{metrics['reward_rate']:.2f}")
            if cfg.checkpoint.save_interval and trainer.state.step % cfg.checkpoint.save_interval == 0:
                trainer.save_checkpoint(extra_models={"teacher": teacher})
        if common.is_rank0():  # before the final checkpoint, which marks the phase complete
            common.record_budget(run_dir, PHASE, counters["generations"], counters["generated_tokens"])
        final = trainer.save_checkpoint(final=True, extra_models={"teacher": teacher})
    finally:
        common.release(progress, trainer, reward_fn, engine)
    return final


def train_on_samples(trainer, teacher, mine, filler, tokenizer, dcfg) -> dict:
    """One optimizer step on this DP rank's (sample, rollout) pairs, in micro-batches.

    ``filler`` (any sample of the step) pads this rank up to the busiest rank's micro-batch
    count, with its loss mask cleared and reward -1 so it counts nowhere.
    """
    from megatron.core import parallel_state

    # the teacher's sequence (prefix + y) is the longer one: it sets the padding
    micro = common.split_micro_batches(mine, dcfg.micro_batch_size, dcfg.max_tokens_per_micro_batch,
                                       lambda pair: len(pair[0].teacher_prefix_ids) + len(pair[0].response_ids))
    micro = [(chunk, False) for chunk in micro]
    micro = common.pad_micro_batches(micro, lambda: ([filler], True))
    prepared = []
    device = model_device(teacher)
    local_tokens = torch.zeros((), dtype=torch.float64, device=device)
    cp, cp_rank = cp_size_rank()
    for chunk, is_filler in micro:
        batch = collate_distill([s for s, _ in chunk], common.pad_id(tokenizer))
        targets = teacher_targets(teacher, batch, k=dcfg.top_k, temperature=dcfg.temperature)
        rewards = torch.tensor([r.reward for _, r in chunk], device=device)
        if is_filler:
            targets.loss_mask.zero_()
            rewards.fill_(-1)
        local_tokens += split_for_cp(targets.loss_mask, cp, cp_rank, dim=1).sum()
        prepared.append((batch, targets, rewards))
    num_tokens = local_tokens.clone()
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    if dist.get_world_size(group) > 1:
        dist.all_reduce(num_tokens, group=group)

    def loss_fn(model, item):
        batch, targets, rewards = item
        loss = distill_loss(model, batch, targets, kl=dcfg.kl, mixed_weight=dcfg.mixed_weight, tail=dcfg.tail,
                            temperature=dcfg.temperature, num_tokens=num_tokens)
        return loss.objective, {"kl_per_token": loss.value, **kl_by_reward(loss.per_token, rewards, batch.response_len)}

    metrics = trainer.train_step(prepared, loss_fn)
    for r in (0, 1):
        sums = torch.tensor([metrics.pop(f"kl_sum_r{r}", 0.0), metrics.pop(f"tokens_r{r}", 0.0)], dtype=torch.float64, device=device)
        dp = parallel_state.get_data_parallel_group()
        if dist.get_world_size(dp) > 1:
            dist.all_reduce(sums, group=dp)
        metrics[f"kl_per_token_r{r}"] = float(sums[0] / sums[1]) if sums[1] > 0 else math.nan
    metrics["response_tokens"] = float(num_tokens)
    return metrics
