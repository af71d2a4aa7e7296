"""Completion-only fine-tuning, the stage that SFT (step 0), SRT and RFT share.

An example holds one token sequence and, per loss term, the range of tokens the term scores
(``data.prompts.CompletionExample``). With several terms (SRT's joint L_revision + L_generation)
each is a token mean over its own global count; the stage counts every term's tokens over the
global batch once per step, and weights the terms so that megatron's single per-token
normalisation gives their sum.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm import tqdm

from sdzero_mcore.checkpoint.source import ModelSource, final_checkpoint, latest_checkpoint
from sdzero_mcore.config import SDZeroConfig
from sdzero_mcore.losses.masked import masked_token_sum
from sdzero_mcore.models.forward import cp_local_batch, model_device
from sdzero_mcore.parallel.context_parallel import global_sum
from sdzero_mcore.parallel.rank0 import data_parallel_shard, is_rank0
from sdzero_mcore.run_setup import build_model
from sdzero_mcore.trainer import Trainer, split_micro_batches


def collate_completion(pairs: Sequence, pad_id: int, terms: Sequence[str]) -> dict:
    """ids [B, S], labels [B, S] (next tokens) and one loss mask per term, aligned to the labels."""
    width = max(len(getattr(p, terms[0]).ids) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    masks = {term: torch.zeros((len(pairs), width), dtype=torch.bool) for term in terms}
    for row, pair in enumerate(pairs):
        seq = getattr(pair, terms[0]).ids  # every term of an example shares one sequence
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(seq) - 1] = torch.tensor(seq[1:])
        for term in terms:
            example = getattr(pair, term)
            # position i predicts token i + 1: target tokens [start, end) are scored at [start-1, end-1)
            masks[term][row, example.loss_start - 1 : example.loss_end - 1] = True
    return {"input_ids": ids, "labels": labels, **{f"mask_{t}": m for t, m in masks.items()}}


def without_targets(batch: dict) -> dict:
    """A micro-batch that keeps a data-parallel rank without examples in step (no loss tokens)."""
    return {k: (v.zero_() if k.startswith("mask_") else v) for k, v in batch.items()}


def term_weights(counts: dict[str, float]) -> tuple[str, dict[str, float]]:
    """(reference term, weight per term) such that sum_t weight_t * sum_t / N_ref = sum_t sum_t / N_t:
    the per-token contract normalises by the reference term's count, the largest one (non-zero
    unless the whole batch has no loss tokens)."""
    reference = max(counts, key=lambda t: counts[t])
    return reference, {t: (counts[reference] / n if n > 0 else 0.0) for t, n in counts.items()}


def completion_forward_step(terms: Sequence[str], reference: str, weights: dict[str, float]):
    def forward_step(model, mb):
        per_token = model(mb["input_ids"], mb["position_ids"], None, labels=mb["labels"])

        def loss_fn(per_token):
            loss_sum, logs = 0.0, {}
            for term in terms:
                term_sum, term_tokens = masked_token_sum(per_token, mb[f"mask_{term}"])
                loss_sum = loss_sum + weights[term] * term_sum
                logs[f"nll_sum_{term}"] = term_sum.detach()
                logs[f"tokens_{term}"] = term_tokens
            return loss_sum, logs[f"tokens_{reference}"], logs

        return per_token, loss_fn

    return forward_step


def train_completion_stage(cfg: SDZeroConfig, source: ModelSource, examples: Sequence, terms: Sequence[str], stage: str,
                           tcfg, pad_id: int, *, max_steps: Optional[int] = None) -> Path:
    """Completion-only NLL training of ``examples`` (NamedTuples of CompletionExample per term) from
    ``source``: one fresh module and Trainer, checkpoints under ``stage``. Returns the final checkpoint.
    ``tcfg`` gives epochs, global/micro batch sizes and the optimizer (an SRTTrainConfig)."""
    root = Path(cfg.output_dir) / "checkpoints" / stage
    if cfg.checkpoint.resume and final_checkpoint(root) is not None:
        return final_checkpoint(root)  # this stage is complete
    previous = latest_checkpoint(root)
    steps_per_epoch = max(1, len(examples) // tcfg.global_batch_size)
    # each stage trains a fresh module (one DDP wrapper per module), from the previous stage's result
    model = build_model(cfg, source)
    device = model_device(model)
    total = steps_per_epoch * tcfg.epochs if max_steps is None else min(max_steps, steps_per_epoch * tcfg.epochs)
    trainer = Trainer(model, tcfg.optimizer, total_steps=total, run_dir=cfg.output_dir, phase=stage,
                      hf_files_dir=source.hf_files_dir, logging_cfg=cfg.logging, checkpoint_cfg=cfg.checkpoint)
    if cfg.checkpoint.resume and previous is not None:
        trainer.load_checkpoint(previous)
    progress = tqdm(total=total, initial=trainer.state.step, desc=stage, disable=not (cfg.logging.progress and is_rank0()))
    while trainer.state.step < total:
        epoch, within = divmod(trainer.state.step, steps_per_epoch)
        order = list(range(len(examples)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        chosen = [examples[i] for i in order[within * tcfg.global_batch_size : (within + 1) * tcfg.global_batch_size]]
        mine = data_parallel_shard(chosen)
        micro = [collate_completion(chunk, pad_id, terms) for chunk in split_micro_batches(
            mine, tcfg.micro_batch_size, tcfg.max_tokens_per_micro_batch, lambda pair: len(getattr(pair, terms[0]).ids))]
        micro = micro or [without_targets(collate_completion(chosen[:1], pad_id, terms))]
        local = [cp_local_batch(mb["input_ids"].to(device), {k: v.to(device) for k, v in mb.items() if k != "input_ids"})
                 for mb in micro]
        # the batch's token count per term: one all-reduce for all terms
        counts = global_sum(torch.stack([
            torch.cat([mb[f"mask_{t}"].flatten() for mb in local]).sum() for t in terms
        ])).tolist()
        reference, weights = term_weights(dict(zip(terms, counts)))
        metrics = trainer.train_step(local, completion_forward_step(terms, reference, weights))
        for term in terms:
            tokens = metrics[f"tokens_{term}"]
            metrics[f"loss_{term}"] = metrics.pop(f"nll_sum_{term}") / tokens if tokens > 0 else float("nan")
        metrics["epoch"] = epoch
        trainer.log(metrics, tokens=max(metrics[f"tokens_{t}"] for t in terms))
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if cfg.checkpoint.save_interval and trainer.state.step % cfg.checkpoint.save_interval == 0:
            trainer.save_checkpoint()
    progress.close()
    final = trainer.save_checkpoint(final=True)
    trainer.close()
    return final
