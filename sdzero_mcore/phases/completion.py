"""Completion-only fine-tuning, the stage that SFT (step 0), SRT and RFT share.

An example holds one token sequence and, per loss term, the range of tokens the term scores
(``data.prompts.CompletionExample``). With several terms (SRT's joint L_revision + L_generation)
each is a token mean over its own global count; the stage counts every term's tokens over the
global batch once per step, and weights the terms so that megatron's single per-token
normalisation gives their sum.

With ``validation_fraction`` on the phase's section, that fraction of the examples (seeded) is
held out and its per-term NLL is measured (forward only) before training and at every epoch end,
logged as ``val_loss`` (the terms' token means summed, the training loss's definition) and
``val_loss_<term>``: a fine-tuning run that overfits shows it as a rising validation loss.
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


def split_heldout(examples: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(training examples, held-out examples): ``fraction`` of them, at least one, chosen by ``seed``."""
    if not fraction:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(f"heldout:{seed}").shuffle(order)
    count = max(1, round(fraction * len(examples)))
    if count >= len(examples):
        raise ValueError(f"validation_fraction {fraction} of {len(examples)} examples leaves none to train on")
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def local_micro_batches(examples: Sequence, terms: Sequence[str], tcfg, pad_id: int, device) -> list[dict]:
    """This rank's share of ``examples`` as collated, CP-local micro-batches (one empty one when it has none)."""
    mine = data_parallel_shard(examples)
    micro = [collate_completion(chunk, pad_id, terms) for chunk in split_micro_batches(
        mine, tcfg.micro_batch_size, tcfg.max_tokens_per_micro_batch, lambda pair: len(getattr(pair, terms[0]).ids))]
    micro = micro or [without_targets(collate_completion(examples[:1], pad_id, terms))]
    return [cp_local_batch(mb["input_ids"].to(device), {k: v.to(device) for k, v in mb.items() if k != "input_ids"})
            for mb in micro]


def term_losses(metrics: dict, terms: Sequence[str], prefix: str = "") -> dict:
    """Each term's token mean from the summed logs (``nan`` for a term with no tokens)."""
    out = {}
    for term in terms:
        tokens = metrics[f"tokens_{term}"]
        out[f"{prefix}loss_{term}"] = metrics[f"nll_sum_{term}"] / tokens if tokens > 0 else float("nan")
    return out


def validation_loss(trainer: Trainer, heldout: Sequence, terms: Sequence[str], tcfg, pad_id: int, device) -> dict:
    """``val_loss`` (the terms' means summed) and ``val_loss_<term>`` on the held-out examples."""
    totals = trainer.evaluate(local_micro_batches(heldout, terms, tcfg, pad_id, device),
                              completion_forward_step(terms, terms[0], {t: 1.0 for t in terms}))
    losses = term_losses(totals, terms, prefix="val_")
    return {"val_loss": sum(losses.values()), **losses}


def train_completion_stage(cfg: SDZeroConfig, source: ModelSource, examples: Sequence, terms: Sequence[str], stage: str,
                           tcfg, pad_id: int, *, max_steps: Optional[int] = None) -> Path:
    """Completion-only NLL training of ``examples`` (NamedTuples of CompletionExample per term) from
    ``source``: one fresh module and Trainer, checkpoints under ``stage``. Returns the final checkpoint.
    ``tcfg`` gives epochs, global/micro batch sizes and the optimizer (an SRTTrainConfig)."""
    root = Path(cfg.output_dir) / "checkpoints" / stage
    if cfg.checkpoint.resume and final_checkpoint(root) is not None:
        return final_checkpoint(root)  # this stage is complete
    previous = latest_checkpoint(root)
    examples, heldout = split_heldout(examples, getattr(tcfg, "validation_fraction", 0.0), cfg.seed)
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
    before = {}
    if heldout and trainer.state.step == 0:
        before = {f"{k}_before": v for k, v in validation_loss(trainer, heldout, terms, tcfg, pad_id, device).items()}
    while trainer.state.step < total:
        epoch, within = divmod(trainer.state.step, steps_per_epoch)
        order = list(range(len(examples)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        chosen = [examples[i] for i in order[within * tcfg.global_batch_size : (within + 1) * tcfg.global_batch_size]]
        local = local_micro_batches(chosen, terms, tcfg, pad_id, device)
        # the batch's token count per term: one all-reduce for all terms
        counts = global_sum(torch.stack([
            torch.cat([mb[f"mask_{t}"].flatten() for mb in local]).sum() for t in terms
        ])).tolist()
        reference, weights = term_weights(dict(zip(terms, counts)))
        metrics = trainer.train_step(local, completion_forward_step(terms, reference, weights))
        metrics.update(term_losses(metrics, terms), **before)
        for term in terms:
            metrics.pop(f"nll_sum_{term}")
        before = {}
        metrics["epoch"] = epoch
        if heldout and (trainer.state.step % steps_per_epoch == 0 or trainer.state.step == total):
            metrics.update(validation_loss(trainer, heldout, terms, tcfg, pad_id, device))
        trainer.log(metrics, tokens=max(metrics[f"tokens_{t}"] for t in terms))
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if cfg.checkpoint.save_interval and trainer.state.step % cfg.checkpoint.save_interval == 0:
            trainer.save_checkpoint()
    progress.close()
    final = trainer.save_checkpoint(final=True)
    trainer.close()
    return final
