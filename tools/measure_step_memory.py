"""Measure a tiny model's training-step memory on CPU and compare it with ``sdzero plan``'s formula.

One process, gloo world of one, a megatron-core GPTModel of the project's local spec (SDPA), the
project's Trainer (AdamW over fp32 weights, fp32 ``main_grad`` buffers) and the completion loss that
SRT and RFT use (megatron-core's vocab-parallel cross-entropy through ``labels``).

Measured, from torch's profiler memory events (every allocation and free of the CPU allocator, in
time order; their running sum is the bytes held by tensors created since the profile began):

* ``static``: the running sum after building the model and Trainer and running one full step (so
  that Adam's moments exist), i.e. the weights, gradient buffers and optimizer state;
* ``peak``: ``static`` + the highest running sum during the next step's forward and backward
  (``trainer.train_step`` minus its optimizer update: on CPU AdamW runs ``foreach`` with
  whole-model temporaries, where CUDA runs it fused, so the update is not what a GPU plan counts).

Estimated: :func:`sdzero_mcore.planner.estimate_phase` for the same shape, layout (TP = PP = CP =
DP = 1), tokens and dtype (fp32), without the GPU reserve. Prints one JSON object.

    PYTHONPATH=. python tools/measure_step_memory.py --batch 2 --seq 256 --recompute none
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile

import torch

from sdzero_mcore.warnings_filter import quiet_dependency_warnings

quiet_dependency_warnings()  # before megatron-core is imported: its import-time notices are noise here

from torch.profiler import ProfilerActivity, profile  # noqa: E402

from sdzero_mcore.config import OptimizerConfig  # noqa: E402
from sdzero_mcore.models.builder import build_gpt_model  # noqa: E402
from sdzero_mcore.models.hf_config import ModelArch  # noqa: E402
from sdzero_mcore.models.tiny import tiny_hf_config  # noqa: E402
from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel  # noqa: E402
from sdzero_mcore.phases.completion import completion_forward_step  # noqa: E402
from sdzero_mcore.planner import Layout, ModelShape, PhaseInputs, estimate_phase  # noqa: E402
from sdzero_mcore.trainer import Trainer, forward_backward  # noqa: E402


def running_bytes(prof) -> tuple[int, int]:
    """(final, peak) running sum of the profiler's allocator events, in time order."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return live, peak


def micro_batch(vocab: int, batch: int, seq: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return {"input_ids": ids, "position_ids": torch.arange(seq).expand(batch, seq),
            "labels": torch.roll(ids, -1, dims=1), "mask_completion": torch.ones(batch, seq, dtype=torch.bool)}


def measure(batch: int, seq: int, recompute: str, run_dir: str, **shape_overrides) -> dict:
    init_distributed("gloo")
    initialize_model_parallel(1, seed=0)
    arch = ModelArch.from_hf_config(tiny_hf_config("Qwen3ForCausalLM", **shape_overrides).to_dict())
    step = completion_forward_step(("completion",), "completion", {"completion": 1.0})
    data = [micro_batch(arch.vocab_size, batch, seq)]
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as setup:
        torch.manual_seed(0)
        model = build_gpt_model(arch, transformer_impl="local", on_cpu=True, recompute=recompute)
        trainer = Trainer(model, OptimizerConfig(lr=1e-3), total_steps=2, run_dir=run_dir, phase="memory", hf_files_dir=run_dir)
        trainer.train_step(data, step)
        gc.collect()
    static, _ = running_bytes(setup)

    def forward_and_backward():
        trainer.model.train()
        trainer.ddp.zero_grad_buffer()
        trainer.optimizer.zero_grad(set_to_none=True)
        forward_backward(trainer.ddp, data, step)

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as step_prof:
        forward_and_backward()
    _, extra = running_bytes(step_prof)
    trainer.close()
    destroy_distributed()

    shape = ModelShape.from_arch(arch, "tiny-qwen3", "tiny_hf_config")
    phase = PhaseInputs("srt_train", micro_batch_tokens=batch * seq, micro_batches=1, loss="cross_entropy")
    estimate = estimate_phase(shape, Layout(recompute=recompute), phase, param_bytes=4)
    return {
        "batch": batch, "seq": seq, "recompute": recompute, "params": sum(p.numel() for p in model.parameters()),
        "measured_static": static, "measured_step_extra": extra, "measured_peak": static + extra,
        "estimated_static": estimate.student_weights + estimate.gradients + estimate.optimizer,
        "estimated_activations": estimate.activations[recompute] + estimate.transient,
        "estimated_peak": estimate.training(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--recompute", choices=["none", "selective"], default="none")
    parser.add_argument("--run-dir", default=None, help="where the Trainer writes its metrics (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(measure(args.batch, args.seq, args.recompute, args.run_dir or tmp)))


if __name__ == "__main__":
    main()
