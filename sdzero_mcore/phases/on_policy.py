"""The on-policy loop that Phase 2, SDFT, the Phase-2-only ablation and GRPO share.

Each step: the step's questions, a rollout from the engine holding the policy's current weights
(generation and scoring on global rank 0, the scored samples handed to every rank), the phase's
own training on them, and the new weights back into the engine. The loop owns what is the same
for all of them: the engine and the reward workers, the generation counters (resumed with the
trainer's state), progress, metrics, checkpoints, validation with best-k checkpoint retention when
the phase's ``validation`` section sets an interval (``phases/validation.py``), the budget record
before the final checkpoint, and releasing everything at the end, also on failure.

    loop = OnPolicyLoop(cfg, PHASE, trainer=trainer, policy=model, source=source, tokenizer=tokenizer,
                        questions=questions, prompts=prompts)
    final = loop.run(lambda step: my_step(loop, step), rollout_steps=N)
"""

from __future__ import annotations

import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from tqdm import tqdm

from sdzero_mcore.checkpoint.source import ModelSource
from sdzero_mcore.config import SDZeroConfig, ValidationConfig
from sdzero_mcore.data.prompts import default_stop_ids
from sdzero_mcore.data.sample import Sample
from sdzero_mcore.eval.budget import record_budget
from sdzero_mcore.parallel.rank0 import broadcast_object, is_rank0
from sdzero_mcore.phases.validation import Validator
from sdzero_mcore.rewards import reward_fn_for, reward_target
from sdzero_mcore.rollout import sampling_from_config
from sdzero_mcore.rollout.colocation import TrainStateOffload, engine_turn, offloads_train_state, release_cached_blocks
from sdzero_mcore.rollout.weight_sync import sync_engine, training_engine
from sdzero_mcore.run_setup import run_prompts
from sdzero_mcore.trainer import Trainer


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


def release(*resources) -> None:
    """Close progress bars, trainers and reward pools, shut engines down (None skipped)."""
    errors = []
    for resource in resources:
        if resource is not None:
            try:
                (resource.shutdown if hasattr(resource, "shutdown") else resource.close)()
            except Exception as error:  # the others are still released; the first failure is raised
                errors.append(error)
    if errors:
        raise errors[0]


class OnPolicyLoop:
    """Rollout engine, rewards, counters and the step loop of an on-policy phase (module docstring)."""

    def __init__(self, cfg: SDZeroConfig, phase: str, *, trainer: Trainer, policy, source: ModelSource, tokenizer,
                 questions: Sequence, prompts: Sequence[list[int]], save_models: Optional[dict] = None,
                 validation: Optional[ValidationConfig] = None):
        """``validation``: the phase's validation section; Phase 2 ("distill", also SDFT and the
        Phase-2-only ablation) reads ``distill.validation`` when none is given."""
        self.cfg = cfg
        self.phase = phase
        self.trainer = trainer
        self.policy = policy
        self.questions = questions
        self.prompts = prompts
        self.save_models = save_models
        self.stop_ids = sorted(default_stop_ids(tokenizer))
        self.counters = trainer.state.data.setdefault("counters", {"generations": 0, "generated_tokens": 0})
        if validation is None and phase == "distill":
            validation = cfg.distill.validation
        self.reward_fn = reward_fn_for(cfg, questions) if is_rank0() else None
        self.validator = self.engine = None
        # where the engine shares the GPUs, the trainer's state waits in host memory while it runs
        self.train_state_offload = TrainStateOffload(trainer) if offloads_train_state(cfg.rollout) else None
        try:
            if validation is not None and validation.interval > 0:  # before the engine: data errors fail fast
                self.validator = Validator(cfg, validation, key=f"{phase}.validation", trainer=trainer,
                                           prompts=run_prompts(cfg, source, tokenizer), stop_ids=self.stop_ids, training_questions=questions,
                                           reward_fn=self.reward_fn)
            self.engine = self._start_engine(source, tokenizer)
        except BaseException:
            release(self.validator, self.reward_fn, self.engine)
            raise

    def _start_engine(self, source: ModelSource, tokenizer):
        """Rank 0's engine, holding the policy's weights (every rank streams them), started while
        the trainer's state is in host memory: an engine that sizes its KV cache from the free
        memory at start (SGLang, vLLM) finds what it will have at each rollout. Asleep afterwards."""
        if self.train_state_offload is not None:
            self.train_state_offload.offload()
        try:
            release_cached_blocks()
            engine = training_engine(self.cfg, source, tokenizer, self.policy)
            if engine is not None:
                engine.sleep()
            return engine
        finally:
            if self.train_state_offload is not None:
                self.train_state_offload.restore()

    def questions_for(self, step: int, per_step: int) -> tuple[int, list[int], bool]:
        """(epoch, question indices, whether the step ends the epoch)."""
        return step_questions(step, per_step, len(self.questions), self.cfg.seed)

    def rollout(self, indices: Sequence[int], *, seed: int, max_new_tokens: int, n: int = 1) -> list[Sample]:
        """``n`` scored samples per question (question-major), generated and scored on rank 0 and
        handed to every rank; the generation counters count them."""
        samples = None
        with engine_turn(self.engine, self.train_state_offload):  # every rank: the GPUs are the engine's
            if self.engine is not None:
                sampling = sampling_from_config(self.cfg.rollout, stop_token_ids=self.stop_ids, n=n, seed=seed)
                sampling = replace(sampling, max_new_tokens=min(max_new_tokens, sampling.max_new_tokens))
                completions = self.engine.generate([self.prompts[i] for i in indices], sampling)
                owners = [i for i in indices for _ in range(n)]
                results = self.reward_fn.score_batch([c.text for c in completions],
                                                     [reward_target(self.questions[i]) for i in owners])
                samples = [Sample(i, list(self.prompts[i]), list(c.token_ids), int(r.reward), c.finish_reason)
                           for i, c, r in zip(owners, completions, results)]
            samples = broadcast_object(samples)
        self.counters["generations"] += len(samples)
        self.counters["generated_tokens"] += sum(len(s.response_ids) for s in samples)
        return samples

    def sync_weights(self) -> None:
        """The policy's new weights into the engine (every rank streams, rank 0 feeds)."""
        sync_engine(self.engine, self.policy, self.cfg.rollout.weight_sync_bucket_mb)

    def run(self, step_fn: Callable[[int], dict], *, rollout_steps: int, updates_per_rollout: int = 1) -> Path:
        """Call ``step_fn(rollout_step)`` until ``rollout_steps`` are done (each makes
        ``updates_per_rollout`` optimizer steps); returns the final checkpoint."""
        cfg, trainer, validator = self.cfg, self.trainer, self.validator
        total = rollout_steps * updates_per_rollout
        progress = tqdm(total=rollout_steps, initial=trainer.state.step // updates_per_rollout, desc=self.phase,
                        disable=not (cfg.logging.progress and is_rank0()))
        final_validation = None
        try:
            while trainer.state.step < total:
                before = trainer.state.step
                metrics = step_fn(before // updates_per_rollout)
                metrics.update(self.counters)
                last = trainer.state.step >= total
                # after step_fn: its weight sync has put this step's weights into the engine
                validation, validation_s = None, 0.0
                if validator is not None and validator.due(before, trainer.state.step, last):
                    start = time.perf_counter()
                    validation = validator.validate(self.engine, self.train_state_offload)
                    validation_s = time.perf_counter() - start
                    metrics.update(validation)
                    metrics["val/time_s"] = validation_s
                    if not progress.disable:
                        progress.write(f"{self.phase} step {trainer.state.step}: "
                                       + ", ".join(f"{k} {v:.4g}" for k, v in validation.items()))
                # the step's time and throughput are the training step's: validation is timed apart
                trainer.log(metrics, tokens=metrics.get("response_tokens"), untimed_s=validation_s)
                progress.update(1)
                progress.set_postfix({k: f"{metrics[k]:.4f}" for k in ("kl_per_token", "reward_rate") if k in metrics})
                done = trainer.state.step // updates_per_rollout
                if validation is not None and last:
                    final_validation = validation  # ranked with the final checkpoint: one save, not two
                elif validation is not None:
                    checkpoint = trainer.save_checkpoint(extra_models=self.save_models)
                    validator.record(trainer.state.step, checkpoint, validation)
                elif cfg.checkpoint.save_interval and done % cfg.checkpoint.save_interval == 0:
                    trainer.save_checkpoint(extra_models=self.save_models)
            if is_rank0():  # before the final checkpoint, which marks the phase complete
                record_budget(cfg.output_dir, self.phase, self.counters["generations"], self.counters["generated_tokens"])
            final = trainer.save_checkpoint(final=True, extra_models=self.save_models)
            if final_validation is not None:
                validator.record(trainer.state.step, final, final_validation)
            return final
        finally:
            release(progress, trainer, self.reward_fn, self.validator, self.engine)
