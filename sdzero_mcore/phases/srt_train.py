"""Phase 1 training (``sdzero srt-train``): L_SRT = L_revision + L_generation on D_revision.

For each kept record (x, y_init, P_r, y_rev) the sequence is x + y_init + sep(P_r) + y_rev (the
trailing EOS of y_init removed, ``data.prompts.srt_examples``):

* L_revision: NLL of y_rev given x + y_init + P_r (loss on the y_rev tokens only);
* L_generation: NLL of [y_init, P_r, y_rev] given x (loss on everything after x).

Both are completion-only token means over the global batch, summed (``srt_train.mode=joint``,
the paper), or trained one after the other as two SFT stages, generation then revision
(``mode=sequential``, the released code's variant). One forward pass scores both terms.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence

import torch

from sdzero_mcore.config import ConfigError, SDZeroConfig
from sdzero_mcore.parallel.context_parallel import global_token_count, token_mean_loss
from sdzero_mcore.phases import common

PHASE = "srt"


def load_examples(path: Path, tokenizer, preset, max_len: int) -> list:
    """SRT examples from a D_revision file; records longer than ``max_len`` tokens are dropped (counted)."""
    from sdzero_mcore.data.prompts import srt_examples

    if not path.is_file():
        raise ConfigError(f"srt-train: D_revision file {path} does not exist (run srt-collect first)")
    examples, too_long = [], 0
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            pair = srt_examples(record["x_ids"], record["y_init_ids"], record["r_init"], record["y_rev_ids"], tokenizer, preset)
        except (json.JSONDecodeError, KeyError, ValueError) as error:
            raise ConfigError(f"{path}:{line_no}: not a D_revision record ({error})") from None
        if len(pair.revision.ids) > max_len:
            too_long += 1
            continue
        examples.append(pair)
    if not examples:
        raise ConfigError(f"{path}: no SRT examples ({too_long} longer than srt_train.max_seq_length={max_len})")
    return examples


def collate_srt(pairs: Sequence, pad_id: int, terms: Sequence[str]) -> dict:
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


def _without_targets(batch: dict) -> dict:
    """A micro-batch that only keeps a data-parallel rank in step with the others (no loss tokens)."""
    return {k: (v.zero_() if k.startswith("mask_") else v) for k, v in batch.items()}


def srt_stages(mode: str) -> list[tuple[str, tuple[str, ...]]]:
    if mode == "joint":
        return [("srt", ("revision", "generation"))]
    return [("srt_generation", ("generation",)), ("srt_revision", ("revision",))]


def run_srt_train(cfg: SDZeroConfig, init_from: Optional[str] = None, d_revision: Optional[str] = None,
                  *, max_steps: Optional[int] = None) -> Path:
    """Train on D_revision; returns the final checkpoint of the last stage."""
    from sdzero_mcore.data.prompts import control_phrases_from_config
    from sdzero_mcore.phases.srt_collect import REVISION_FILE, collect_dir

    tcfg = cfg.srt_train
    source = common.start_source(cfg, init_from)
    common.check_layout(cfg, source)
    tokenizer = common.load_tokenizer(source)
    examples = load_examples(Path(d_revision or collect_dir(cfg) / REVISION_FILE), tokenizer,
                             control_phrases_from_config(cfg.data), tcfg.max_seq_length)
    pad_id = common.pad_id(tokenizer)
    common.setup_parallel(cfg)
    final = None
    for stage, terms in srt_stages(tcfg.mode):
        final = train_completion_stage(cfg, source, examples, terms, stage, tcfg, pad_id, max_steps=max_steps)
        source = common.ModelSource(final, "mcore")
    return final


def train_completion_stage(cfg: SDZeroConfig, source, examples: Sequence, terms: Sequence[str], stage: str, tcfg,
                           pad_id: int, *, max_steps: Optional[int] = None) -> Path:
    """Completion-only NLL training of ``examples`` (NamedTuples of CompletionExample per term) from
    ``source``: one fresh module and Trainer, checkpoints under ``stage``. Returns the final checkpoint.
    ``tcfg`` gives epochs, global/micro batch sizes and the optimizer (an SRTTrainConfig)."""
    from tqdm import tqdm

    from sdzero_mcore.models.forward import cp_local_batch, model_device
    from sdzero_mcore.trainer import Trainer, final_checkpoint, latest_checkpoint

    root = Path(cfg.output_dir) / "checkpoints" / stage
    if cfg.checkpoint.resume and final_checkpoint(root) is not None:
        return final_checkpoint(root)  # this stage is complete
    previous = latest_checkpoint(root)
    steps_per_epoch = max(1, len(examples) // tcfg.global_batch_size)
    # each stage trains a fresh module (one DDP wrapper per module), from the previous stage's result
    model = common.build_model(cfg, source)
    total = steps_per_epoch * tcfg.epochs if max_steps is None else min(max_steps, steps_per_epoch * tcfg.epochs)
    trainer = Trainer(model, tcfg.optimizer, total_steps=total, run_dir=cfg.output_dir, phase=stage,
                      hf_files_dir=source.hf_files_dir, logging_cfg=cfg.logging, checkpoint_cfg=cfg.checkpoint)
    if cfg.checkpoint.resume and previous is not None:
        trainer.load_checkpoint(previous)
    progress = tqdm(total=total, initial=trainer.state.step, desc=stage, disable=not (cfg.logging.progress and common.is_rank0()))
    while trainer.state.step < total:
        epoch, within = divmod(trainer.state.step, steps_per_epoch)
        order = list(range(len(examples)))
        random.Random(cfg.seed * 7919 + epoch).shuffle(order)
        chosen = [examples[i] for i in order[within * tcfg.global_batch_size : (within + 1) * tcfg.global_batch_size]]
        mine = common.data_parallel_shard(chosen)
        micro = [collate_srt(chunk, pad_id, terms) for chunk in common.split_micro_batches(
            mine, tcfg.micro_batch_size, tcfg.max_tokens_per_micro_batch, lambda pair: len(getattr(pair, terms[0]).ids))]
        micro = common.pad_micro_batches(micro, lambda: _without_targets(collate_srt(chosen[:1], pad_id, terms)))
        device = model_device(model)
        local = [cp_local_batch(mb["input_ids"].to(device), {k: v.to(device) for k, v in mb.items() if k != "input_ids"})
                 for mb in micro]
        counts = {t: global_token_count(torch.cat([mb[f"mask_{t}"].flatten() for mb in local])) for t in terms}

        def loss_fn(ddp, mb):
            per_token = ddp(mb["input_ids"], mb["position_ids"], None, labels=mb["labels"])
            objective, logs = 0.0, {}
            for term in terms:
                term_objective, value = token_mean_loss(per_token, mb[f"mask_{term}"], counts[term])
                objective = objective + term_objective
                logs[f"loss_{term}"] = value
            return objective, logs

        metrics = trainer.train_step(local, loss_fn)
        metrics["loss"] = sum(metrics[f"loss_{t}"] for t in terms)
        metrics.update({f"tokens_{t}": float(counts[t]) for t in terms}, epoch=epoch)
        trainer.log(metrics, tokens=max(float(counts[t]) for t in terms))
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.4f}")
        if cfg.checkpoint.save_interval and trainer.state.step % cfg.checkpoint.save_interval == 0:
            trainer.save_checkpoint()
    progress.close()
    final = trainer.save_checkpoint(final=True)
    trainer.close()
    return final
