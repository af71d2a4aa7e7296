"""`sdzero run` runs its phases in one process: each phase's model, DDP wrapper and optimizer must be
gone before the next phase builds its own (on a GPU two phases' models and optimizer states do not
fit together). Checked with weak references to every model the pipeline builds, with Python's
automatic garbage collector off, so that only the pipeline's own release can free them (megatron's
DDP wrapper and its model reference each other, and reference counting alone never frees them)."""

import gc
import json
import weakref

import pytest
from helpers import REPO_ROOT

from sdzero_mcore.parallel import run_local_workers

TINY = REPO_ROOT / "examples" / "tiny_cpu.yaml"
FAST = [
    "data.phase1_questions=4", "data.phase2_questions=4", "logging.progress=false",
    "srt_train.mode=sequential", "srt_train.epochs=1", "srt_train.global_batch_size=4", "srt_train.micro_batch_size=4",
    "distill.prompts_per_step=4", "distill.global_batch_size=4", "distill.micro_batch_size=4", "distill.train_steps=1",
    "rollout.max_new_tokens=8", "distill.max_response_tokens=8",
]


@pytest.fixture(scope="module", autouse=True)
def torch_kernels():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDZERO_KERNELS_BACKEND", "torch")
        yield


def write_collection(cfg, tokenizer) -> None:
    """A complete Phase 1 collection (one corrected attempt per question), so that the pipeline goes
    straight to SRT training: a random model's own collection would keep no verified revision."""
    from sdzero_mcore.data.question_sets import phase_questions
    from sdzero_mcore.phases.srt_collect import (
        COMPLETE_FILE, RECORDS_FILE, collect_dir, config_hash, write_outputs,
    )

    questions, _ = phase_questions(cfg, tokenizer)
    out = collect_dir(cfg)
    out.mkdir(parents=True)
    lines = []
    for question in questions:
        attempt, revision = "1", str(question.answer)
        lines.append({"type": "revision", "question_id": question.id, "attempt_id": 0, "revision_id": 0,
                      "x": question.question, "y_init_ids": tokenizer.encode(attempt, add_special_tokens=False),
                      "y_init": attempt, "r_init": 0, "y_rev_ids": tokenizer.encode(revision, add_special_tokens=False),
                      "y_rev": revision, "r_rev": 1, "init_tokens": 1, "rev_tokens": len(revision)})
        lines.append({"type": "done", "question_id": question.id, "attempts": [{"r": 0, "tokens": 1}]})
    (out / RECORDS_FILE).write_text("".join(json.dumps(line) + "\n" for line in lines))
    write_outputs(out)
    (out / COMPLETE_FILE).write_text(json.dumps({"config_hash": config_hash(cfg), "kept": len(questions)}) + "\n")


def pipeline_worker(base: str, overrides: list) -> None:
    from sdzero_mcore.config import load_config
    from sdzero_mcore.phases import completion, distill, pipeline
    from sdzero_mcore.rollout import weight_sync

    cfg = load_config(TINY, overrides)
    built: list[tuple[str, weakref.ref]] = []

    def recording(module, phase_of_build):
        original = module.build_model

        def build_model(cfg, source):
            phase = phase_of_build()
            alive = [earlier for earlier, model in built if earlier != phase and model() is not None]
            assert not alive, f"{phase} builds its model while the models of {alive} are alive"
            model = original(cfg, source)
            built.append((phase, weakref.ref(model)))
            return model

        module.build_model = build_model

    stages = iter(range(100))
    recording(completion, lambda: f"srt stage {next(stages)}")  # each SRT stage builds one model
    recording(distill, lambda: "distill")  # the student, then the teacher
    evaluations = iter(range(100))
    recording(weight_sync, lambda: f"eval {next(evaluations)}")  # an mcore checkpoint streamed to the engine
    gc.disable()
    try:
        report = pipeline.run_pipeline(cfg, base, eval_questions=2)
    finally:
        gc.enable()
    # the base is a HF directory, which the engine loads itself; the SRT and SD-Zero checkpoints are not
    assert [phase for phase, _ in built] == ["srt stage 0", "srt stage 1", "distill", "distill", "eval 0", "eval 1"]
    assert report["eval_sd_zero"]["questions"] == 2


@pytest.mark.parametrize("tp", [1, 2])
def test_each_phase_is_released_before_the_next_builds(tmp_path, tp):
    from transformers import AutoTokenizer

    from sdzero_mcore.config import load_config
    from sdzero_mcore.models.tiny import save_tiny_hf_model

    base = save_tiny_hf_model(tmp_path / "base", vocab_size=128)
    overrides = [f"output_dir={tmp_path / 'run'}", f"parallel.tensor_model_parallel_size={tp}", *FAST]
    write_collection(load_config(TINY, overrides), AutoTokenizer.from_pretrained(base))
    run_local_workers(pipeline_worker, tp, str(base), overrides)
