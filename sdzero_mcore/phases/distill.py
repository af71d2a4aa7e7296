"""Phase 2: on-policy self-distillation (``sdzero distill``); also SDFT and the Phase-2-only ablation.

:func:`distill_step` is one step, in the order of docs/design.md "Data flow of one Phase 2 step":
sample one response per question from the rollout engine (holding the student's current
weights), score it, build the teacher context x + y + sep + P_r + sep + y on token ids, take the
frozen teacher's top-K at the response positions, train the student on ``topk_kl`` against it,
copy the student into the teacher every ``teacher_sync_interval`` steps (and at each epoch end:
the paper's iterative self-evolution), and push the new weights into the engine.

Rank 0 owns the rollout engine and the reward workers (:class:`~sdzero_mcore.phases.on_policy.OnPolicyLoop`);
every data-parallel rank trains on its share of the step's samples, and every rank joins the
weight sync (TP collectives).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch

from sdzero_mcore.checkpoint.source import start_source
from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.data.prompts import RunPrompts, control_ids, solution_ids
from sdzero_mcore.data.question_sets import phase_questions
from sdzero_mcore.data.sample import Sample
from sdzero_mcore.float64_reductions import float64_sum
from sdzero_mcore.losses.distill import (
    DistillLoss,
    collate_distill,
    distill_loss,
    sparse_distill_loss,
    student_logits,
    student_response_hidden,
    teacher_targets_for,
)
from sdzero_mcore.models.forward import model_device
from sdzero_mcore.parallel.rank0 import data_parallel_shard
from sdzero_mcore.phases.on_policy import OnPolicyLoop
from sdzero_mcore.run_setup import build_model, check_layout, load_tokenizer, pad_id, run_prompts, setup_parallel
from sdzero_mcore.trainer import Trainer, chunk_parameters, counted_once, split_micro_batches, sum_over_model_parallel

PHASE = "distill"


def truncate_for_teacher(teacher_x: Sequence[int], y_ids: Sequence[int], reward: int, prompts: RunPrompts,
                         max_teacher_tokens: int):
    """The longest prefix of ``y`` whose teacher context fits ``max_teacher_tokens`` (None if none does)."""
    length = len(y_ids)
    while length > 0:
        context = prompts.teacher("", y_ids[:length], reward, x_ids=teacher_x)
        if len(context.ids) <= max_teacher_tokens:
            return context, list(y_ids[:length])
        length = min(length - 1, (max_teacher_tokens - (len(context.ids) - 2 * length)) // 2)
    return None, []


def check_teacher_budget(prefixes: Sequence[Sequence[int]], prompts: RunPrompts, max_teacher_tokens: int,
                         *, with_separator: bool = True) -> None:
    """Fail before any work when a teacher prompt leaves no room for even one response token.

    ``prefixes`` are the teacher prompts (SD-Zero: the teacher adds the response, P_r and the response
    again) or, with ``with_separator=False``, complete teacher prefixes (SDFT: the response follows once)."""
    separator = max(len(control_ids(prompts.tokenizer, r, prompts.phrases)) for r in (0, 1)) if with_separator else 0
    response = 2 if with_separator else 1
    worst = max(range(len(prefixes)), key=lambda i: len(prefixes[i]))
    needed = len(prefixes[worst]) + separator + response
    if needed > max_teacher_tokens:
        what = "prompt" if with_separator else "teacher prefix (prompt + gold solution + P_r)"
        raise ConfigError(
            f"distill.max_teacher_tokens ({max_teacher_tokens}) is smaller than the teacher context of phase-2 "
            f"question {worst}: {len(prefixes[worst])} {what} tokens + {separator} P_r tokens + {response} response tokens"
        )


def gold_solution_prefixes(questions: Sequence, teacher_prompts: Sequence[Sequence[int]], prompts: RunPrompts) -> list[list[int]]:
    """SDFT's teacher prefixes: x + the gold solution + P_r(correct); every question needs a solution."""
    missing = [q.id for q in questions if not q.solution]
    if missing:
        raise ConfigError(
            f"distill.teacher_context=gold_solution needs a solution for every phase-2 question; {len(missing)} have none "
            f"(first: {missing[0]}); set data.solution_field or use a synthetic task"
        )
    return [prompts.revision("teacher", q.question, solution_ids(prompts.tokenizer, q.solution), 1, x_ids=x)
            for q, x in zip(questions, teacher_prompts)]


@torch.no_grad()
def sync_teacher(teacher, student) -> None:
    """Copy the student's weights into the teacher (same layout, shard by shard)."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):  # a model or its chunks
        t.copy_(s)


def weights_checksum(model) -> float:
    """The sum of the whole model's weights, the same number at every layout: each weight once
    (``trainer.counted_once``), summed over TP and the pipeline stages. A collective over both."""
    parameters = chunk_parameters(model)
    counted = counted_once(parameters)
    total = sum(float64_sum(param)  # chunked: no float64 copy of a weight
                for name, _, _, param in parameters if name in counted)
    return float(sum_over_model_parallel(torch.as_tensor(total, dtype=torch.float64, device=model_device(model))))


def teacher_sample(rollout: Sample, teacher_prompts: Sequence[Sequence[int]], gold_prefixes: Optional[list],
                   prompts: RunPrompts, max_teacher_tokens: int) -> Optional[Sample]:
    """``rollout`` with what the teacher reads before y: x + y + sep + P_r + sep (SDFT: the gold
    prefix), y cut so that the teacher context fits; None when nothing of y is left."""
    if not rollout.response_ids:
        return None
    if gold_prefixes is not None:  # SDFT: the teacher reads the gold solution, not y
        prefix = gold_prefixes[rollout.question_index]
        y = rollout.response_ids[: max_teacher_tokens - len(prefix)]
    else:
        context, y = truncate_for_teacher(teacher_prompts[rollout.question_index], rollout.response_ids, rollout.reward,
                                          prompts, max_teacher_tokens)
        prefix = context.ids[: context.response_start] if context is not None else None
    return rollout.with_teacher(prefix, y) if prefix is not None and y else None


def distill_micro_batches(teacher, samples: Sequence[Sample], tokenizer, dcfg) -> list[tuple]:
    """This DP rank's micro-batches of the step, each with the teacher's top-K targets.

    A rank whose share is empty gets one micro-batch of the step's first sample with its loss
    mask cleared: it counts nowhere, and keeps the rank in the step's collectives. At
    pipeline-parallel size > 1 the targets are on the last stage (None on the others, which never
    run the loss)."""
    device = model_device(teacher)
    # the teacher's sequence (prefix + y) is the longer one: it sets the padding
    chunks = split_micro_batches(data_parallel_shard(samples), dcfg.micro_batch_size, dcfg.max_tokens_per_micro_batch,
                                 lambda s: len(s.teacher_prefix_ids) + len(s.response_ids))
    chunks = [(c, False) for c in chunks] or [([samples[0]], True)]
    batches = [collate_distill(chunk, pad_id(tokenizer)) for chunk, _ in chunks]
    micro = []
    for (chunk, is_filler), batch, targets in zip(chunks, batches, teacher_targets_for(
            teacher, batches, k=dcfg.top_k, temperature=dcfg.temperature, lm_head=dcfg.lm_head)):
        if is_filler and targets is not None:
            targets.loss_mask.zero_()
        micro.append((batch, targets, torch.tensor([s.reward for s in chunk], device=device)))
    return micro


def kl_by_reward(loss: DistillLoss, rewards: torch.Tensor) -> dict[str, torch.Tensor]:
    """The KL summed over the tokens of responses of reward 0 and of reward 1, and their token
    counts: tensors, which the trainer reads once when the step ends. Rows are chosen with
    ``where`` (a boolean-mask index would make a shape from data: a host sync per micro-batch)."""
    logs = {}
    for r in (0, 1):
        rows = (rewards == r)[:, None]
        logs[f"kl_sum_r{r}"] = torch.where(rows, loss.per_token, 0.0).sum()
        logs[f"tokens_r{r}"] = (loss.loss_mask & rows).sum()
    return logs


def distill_forward_step(dcfg):
    """The student's forward step: logits on x + y, then ``topk_kl`` summed over its response
    tokens; the logs split the KL by the reward of the response (r = 0 / r = 1). With
    ``distill.lm_head=sparse`` the output is the final-norm hidden states at the response
    positions and the loss applies the output layer to them (losses/distill.py). At
    pipeline-parallel size > 1 ``model`` is one stage (one chunk, with virtual stages); before the
    last its output goes to the next stage and the loss function is never called."""
    options = dict(kl=dcfg.kl, mixed_weight=dcfg.mixed_weight, tail=dcfg.tail, temperature=dcfg.temperature)

    def forward_step(model, micro_batch):
        batch, targets, rewards = micro_batch
        if dcfg.lm_head == "sparse":
            hidden, head = student_response_hidden(model, batch)

            def sparse_loss_fn(hidden):
                loss = sparse_distill_loss(hidden, head, targets, **options)
                return loss.loss_sum, loss.num_tokens, kl_by_reward(loss, rewards)

            return hidden, sparse_loss_fn

        def loss_fn(logits):
            loss = distill_loss(logits, targets, **options)
            return loss.loss_sum, loss.num_tokens, kl_by_reward(loss, rewards)

        return student_logits(model, batch), loss_fn

    return forward_step


def distill_step(loop: OnPolicyLoop, teacher, step: int, *, prompts: RunPrompts, teacher_prompts: Sequence[Sequence[int]],
                 dcfg, gold_prefixes: Optional[list] = None) -> dict:
    """One Phase 2 step, top to bottom (docs/design.md)."""
    trainer, student = loop.trainer, loop.policy
    # 1. the step's questions
    epoch, indices, ends_epoch = loop.questions_for(step, dcfg.prompts_per_step)
    # 2-3. one response per question from the engine (the student's weights), scored, on every rank
    rollouts = loop.rollout(indices, seed=loop.cfg.rollout.seed + step, max_new_tokens=dcfg.max_response_tokens)
    # 3. the teacher's context on token ids: x + y + sep + P_r + sep (SDFT: x + gold solution + P_r)
    samples = [s for s in (teacher_sample(r, teacher_prompts, gold_prefixes, prompts, dcfg.max_teacher_tokens)
                           for r in rollouts) if s]
    if not samples:  # every response empty or unfittable: no data, no update (same on all ranks)
        trainer.skip_step()
        return {"skipped": True, "reason": "no trainable responses"}
    # 4. the frozen teacher's top-K log-probs at the positions of the second y
    micro = distill_micro_batches(teacher, samples, prompts.tokenizer, dcfg)
    # 5-6. the student's KL on x + y, backward and the optimizer step through megatron's schedule
    metrics = trainer.train_step(micro, distill_forward_step(dcfg))
    metrics["kl_per_token"] = metrics["loss"]
    for r in (0, 1):
        tokens = metrics.pop(f"tokens_r{r}")
        metrics[f"kl_per_token_r{r}"] = metrics.pop(f"kl_sum_r{r}") / tokens if tokens > 0 else math.nan
    metrics.update(
        response_tokens=metrics["num_tokens"],
        reward_rate=sum(r.reward for r in rollouts) / max(1, len(rollouts)),
        response_length=sum(len(r.response_ids) for r in rollouts) / max(1, len(rollouts)),
        epoch=epoch,
    )
    # 6. iterative self-evolution: the teacher becomes the current student
    interval = dcfg.teacher_sync_interval
    if (interval and trainer.state.step % interval == 0) or (ends_epoch and dcfg.teacher_sync_at_epoch_end):
        sync_teacher(teacher, student)
        metrics["teacher_synced"] = True
    metrics["teacher_checksum"] = weights_checksum(teacher)
    # 7. the new student weights into the engine
    loop.sync_weights()
    return metrics


def run_distill(cfg: SDZeroConfig, init_from: Optional[str] = None, *, max_steps: Optional[int] = None) -> Path:
    """Run Phase 2 from ``init_from`` (default: model.mcore_dir or model.hf_dir). Returns the final checkpoint."""
    dcfg = cfg.distill
    source = start_source(cfg, init_from, prefer_mcore=True)
    check_layout(cfg, source)
    tokenizer = load_tokenizer(source)
    prompts = run_prompts(cfg, source, tokenizer)
    _, questions = phase_questions(cfg, tokenizer)
    student_prompts = [prompts.prompt("student", q.question) for q in questions]
    teacher_prompts = [prompts.prompt("teacher", q.question) for q in questions]
    gold_prefixes = gold_solution_prefixes(questions, teacher_prompts, prompts) if dcfg.teacher_context == "gold_solution" else None
    check_teacher_budget(gold_prefixes or teacher_prompts, prompts, dcfg.max_teacher_tokens,
                         with_separator=gold_prefixes is None)
    steps_per_epoch = max(1, len(questions) // dcfg.prompts_per_step)
    total_steps = dcfg.train_steps or steps_per_epoch * dcfg.epochs
    if max_steps is not None:
        total_steps = min(total_steps, max_steps)

    setup_parallel(cfg)
    student = build_model(cfg, source)
    teacher = build_model(cfg, source).eval().requires_grad_(False)
    trainer = Trainer(student, dcfg.optimizer, total_steps=total_steps, run_dir=cfg.output_dir, phase=PHASE,
                      hf_files_dir=source.hf_files_dir, logging_cfg=cfg.logging, checkpoint_cfg=cfg.checkpoint)
    if cfg.checkpoint.resume and trainer.latest_checkpoint() is not None:
        # the teacher is restored too: it is the student of the last sync, not of this step
        trainer.load_checkpoint(trainer.latest_checkpoint(), extra_models={"teacher": teacher})
    loop = OnPolicyLoop(cfg, PHASE, trainer=trainer, policy=student, source=source, tokenizer=tokenizer,
                        questions=questions, prompts=student_prompts, save_models={"teacher": teacher})
    return loop.run(lambda step: distill_step(loop, teacher, step, prompts=prompts, teacher_prompts=teacher_prompts,
                                              dcfg=dcfg, gold_prefixes=gold_prefixes),
                    rollout_steps=total_steps)
