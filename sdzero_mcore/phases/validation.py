"""Validation during an on-policy phase, and the best checkpoints it keeps (``<phase>.validation``).

Every ``interval`` optimizer steps and at the last step, the rollout engine (holding the policy's
weights since :meth:`OnPolicyLoop.sync_weights`) samples ``k`` responses per validation question,
the run's reward scores them, and avg@k, pass@k and the mean response length join the step's
metrics as ``val/*``. The step is checkpointed, and the best ``keep_best`` checkpoints by
``metric`` (higher is better; a tie goes to the earlier step) are protected from
``checkpoint.keep_last`` pruning; a checkpoint that leaves the best set is deleted unless
keep_last still keeps it. The set is ``<run>/checkpoints/<phase>/best_checkpoints.json``, rewritten
atomically after every validation, so a resumed run continues it.

As for rollouts, global rank 0 (the engine's owner) generates and scores and every rank receives
the metrics. Validation samples are not training data: the generation counters and the recorded
budget leave them out.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from sdzero_mcore.config import ConfigError, SDZeroConfig, ValidationConfig
from sdzero_mcore.data.prompts import RunPrompts
from sdzero_mcore.eval.evaluate import eval_questions
from sdzero_mcore.eval.metrics import avg_at_k, pass_at_k_dataset
from sdzero_mcore.fileio import atomic_write_text
from sdzero_mcore.parallel.rank0 import broadcast_object, is_rank0
from sdzero_mcore.rewards import reward_fn_for, reward_target
from sdzero_mcore.rewards.select import reward_name
from sdzero_mcore.rollout import SamplingParams
from sdzero_mcore.rollout.colocation import TrainStateOffload, engine_turn
from sdzero_mcore.trainer import Trainer, prune_checkpoints

BEST_FILE = "best_checkpoints.json"
PREFIX = "val/"
METRICS = ("avg_at_k", "pass_at_k", "mean_response_tokens")


def validation_questions(cfg: SDZeroConfig, vcfg: ValidationConfig, key: str) -> list:
    """The validation questions: ``vcfg.dataset`` read as ``sdzero eval`` reads a dataset, or a synthetic
    task's held-out questions; at most ``vcfg.questions``. ``key`` names the section in errors."""
    if vcfg.dataset is None and not cfg.data.dataset.startswith("synthetic:"):
        raise ConfigError(
            f"{key}.dataset is null, which means a synthetic task's held-out questions, but data.dataset is "
            f"{cfg.data.dataset!r}; set {key}.dataset to a validation set (the authors' release: AIME 2024)"
        )
    questions = eval_questions(replace(cfg, eval=replace(cfg.eval, questions=vcfg.questions)), vcfg.dataset)
    if not questions:
        raise ConfigError(f"{key}.dataset: no questions in {vcfg.dataset or cfg.data.dataset}")
    return questions


def validation_prompts(prompts: RunPrompts, questions: Sequence) -> list[list[int]]:
    """The prompt ids the policy is validated on, one per question: the eval layout (``prompts.eval``)."""
    return [prompts.prompt("eval", q.question) for q in questions]


def validation_due(interval: int, step_before: int, step_after: int, last: bool) -> bool:
    """Whether a rollout step that took the optimizer from ``step_before`` to ``step_after`` validates:
    it reached a multiple of ``interval`` (0 = never), or it is the phase's last step."""
    return interval > 0 and (last or step_after // interval > step_before // interval)


def rank_best(entries: Sequence[dict], keep_best: int) -> tuple[list[dict], list[dict]]:
    """(the ``keep_best`` best entries, the others), each best first: higher ``value`` first, and of
    equal values the earlier ``step``, which reached the value with less training."""
    ranked = sorted(entries, key=lambda entry: (-entry["value"], entry["step"]))
    return ranked[:keep_best], ranked[keep_best:]


class BestCheckpoints:
    """The best-k set of one phase's checkpoint directory, kept in ``BEST_FILE`` beside the checkpoints.

    Entries: ``{"step", "checkpoint" (the directory's name), "value" (the ranked metric), *METRICS}``.
    """

    def __init__(self, root: Path, *, metric: str, keep_best: int, keep_last: int, resumed_step: int = 0):
        self.root = Path(root)
        self.metric = metric
        self.keep_best = keep_best
        self.keep_last = keep_last
        self.entries = self._load(resumed_step)

    @property
    def path(self) -> Path:
        return self.root / BEST_FILE

    @property
    def names(self) -> set[str]:
        return {entry["checkpoint"] for entry in self.entries}

    def _load(self, resumed_step: int) -> list[dict]:
        # a fresh run ignores a file left by an earlier one; a resumed run drops entries of steps it
        # will train again (their directories get rewritten) and of directories that are gone
        if resumed_step == 0 or not self.path.is_file():
            return []
        saved = json.loads(self.path.read_text())["checkpoints"]
        alive = [{**entry, "value": entry[self.metric]} for entry in saved
                 if entry["step"] <= resumed_step and (self.root / entry["checkpoint"]).is_dir()]
        return rank_best(alive, self.keep_best)[0]  # the metric or keep_best may have changed since

    def add(self, step: int, checkpoint: Path, values: dict) -> list[Path]:
        """Rank ``checkpoint`` (the one saved at ``step`` with validation ``values``), rewrite the file,
        and delete what neither the best set nor keep_last keeps; returns the deleted directories."""
        entry = {"step": step, "checkpoint": Path(checkpoint).name, "value": values[self.metric],
                 **{name: values[name] for name in METRICS}}
        self.entries = rank_best([e for e in self.entries if e["step"] != step] + [entry], self.keep_best)[0]
        # the file first: after a crash between the two, loading skips entries whose directory is gone
        atomic_write_text(self.path, json.dumps({"metric": self.metric, "keep_best": self.keep_best,
                                                 "checkpoints": self.entries}, indent=2) + "\n")
        return prune_checkpoints(self.root, self.keep_last, self.names)


class Validator:
    """Validation of an on-policy phase: due steps, metrics from the engine, best-k retention (module docstring)."""

    def __init__(self, cfg: SDZeroConfig, vcfg: ValidationConfig, *, key: str, trainer: Trainer, prompts: RunPrompts,
                 stop_ids: Sequence[int], training_questions: Sequence, reward_fn=None):
        """``reward_fn``: the phase's own (rank 0), reused when the validation questions need the same
        verifier; ``key``: the config section's dotted name, for errors."""
        self.vcfg = vcfg
        self.trainer = trainer
        self.questions = validation_questions(cfg, vcfg, key)
        self.prompts = validation_prompts(prompts, self.questions)
        self.targets = [reward_target(q) for q in self.questions]
        self.sampling = SamplingParams(temperature=vcfg.temperature, max_new_tokens=vcfg.max_new_tokens,
                                       stop_token_ids=tuple(stop_ids), n=vcfg.k, seed=vcfg.seed)
        self.own_reward_fn = None
        self.reward_fn = None
        self.best: Optional[BestCheckpoints] = None
        if is_rank0():
            # the verifier follows the validation set (its rows, or its synthetic task), not the training set
            reward_cfg = cfg if vcfg.dataset is None else replace(cfg, data=replace(cfg.data, dataset=vcfg.dataset))
            same_verifier = reward_name(reward_cfg, self.questions) == reward_name(cfg, training_questions)
            if reward_fn is not None and same_verifier:
                self.reward_fn = reward_fn
            else:
                self.reward_fn = self.own_reward_fn = reward_fn_for(reward_cfg, self.questions)
            keep_last = getattr(trainer.ckpt_cfg, "keep_last", 2)
            self.best = BestCheckpoints(trainer.checkpoint_root, metric=vcfg.metric, keep_best=vcfg.keep_best,
                                        keep_last=keep_last, resumed_step=trainer.state.step)
            trainer.protected = set(self.best.names)

    def due(self, step_before: int, step_after: int, last: bool) -> bool:
        return validation_due(self.vcfg.interval, step_before, step_after, last)

    def validate(self, engine, train_state_offload: Optional[TrainStateOffload] = None) -> dict:
        """Collective: the ``val/*`` metrics of the engine's current weights, computed on rank 0 (the
        engine's owner, ``engine`` is None elsewhere) and returned on every rank; the trainer's state
        waits in host memory meanwhile when ``train_state_offload`` is given."""
        metrics = completions = None
        with engine_turn(engine, train_state_offload):
            if engine is not None:
                completions = engine.generate(self.prompts, self.sampling)  # ordered by (question, sample)
        if completions is not None:
            k = self.vcfg.k
            results = self.reward_fn.score_batch([c.text for c in completions],
                                                 [target for target in self.targets for _ in range(k)])
            rewards = [[int(r.reward) for r in results[i * k : (i + 1) * k]] for i in range(len(self.questions))]
            metrics = {
                f"{PREFIX}avg_at_k": avg_at_k(rewards),
                f"{PREFIX}pass_at_k": pass_at_k_dataset(rewards, k),
                f"{PREFIX}mean_response_tokens": sum(len(c.token_ids) for c in completions) / len(completions),
            }
        return broadcast_object(metrics)

    def record(self, step: int, checkpoint: Path, metrics: dict) -> None:
        """After ``checkpoint`` (the one of ``step``) is saved: rank it by the step's ``val/*`` metrics
        and update what the trainer's pruning protects (rank 0 prunes, the others have nothing to do)."""
        if self.best is None:
            return
        self.best.add(step, checkpoint, {name: metrics[PREFIX + name] for name in METRICS})
        self.trainer.protected = set(self.best.names)

    def close(self) -> None:
        if self.own_reward_fn is not None:
            self.own_reward_fn.close()
