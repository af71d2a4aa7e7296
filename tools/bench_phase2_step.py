#!/usr/bin/env python3
"""One Phase 2 micro-step (teacher top-K + student forward/backward) with the dense and the sparse
LM head in the same run: time, working memory and the FLOPs of each part.

    python tools/bench_phase2_step.py --shape cpu              # hidden 512, 2 layers, V 151936, prompt 128, response 512
    python tools/bench_phase2_step.py --tiny                   # CI smoke run
    python tools/bench_phase2_step.py --shape qwen3-0.6b       # GPU: also the transformers + PyTorch baseline
    python tools/bench_phase2_step.py --shape qwen3-4b

The step is what ``distill_step`` runs per micro-batch on megatron-core models (random weights,
TP = CP = 1), with the student wrapped as the trainer wraps it (``trainer.per_token_ddp``:
megatron-core's DDP, fp32 ``main_grad`` buffers): DDP's buffers zeroed, ``teacher_targets`` on
the teacher sequence x + y + P_r + y (P_r: 20 tokens), then the student's forward on x + y,
``distill_loss`` (dense) or ``sparse_distill_loss`` (sparse) and the backward through
``trainer.forward_backward`` (megatron-core's schedule; gradients into ``main_grad``, divided by
the token count); no optimizer step. Times are medians after warm-up. Working memory is the peak
during the step minus what was held before it (weights and DDP's gradient buffers): on a GPU the
allocator's peak; on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs
before the step), each variant in a fresh subprocess. On CPU the steps measured are the timed
ones, after the warm-up (the first step's one-time allocations, thread pools and lazily loaded
libraries, are no step's working memory), and before each the C allocator returns the memory it
keeps free to the system (``malloc_trim``), so that what an earlier step freed cannot hide this
step's allocations; RSS still varies between steps (glibc's per-thread arenas), so the median
over the timed steps is reported, with each step's value in ``--json``.

FLOPs are counted analytically (2 per multiply-add; attention scores and values over the causal
half of the square, what flash attention kernels compute), per part: the teacher's and the student's transformer
trunks, and their LM heads. The FLOP table is also printed for the two GPU shapes.

On a GPU, ``--baseline`` (on by default there) also times a plain transformers + PyTorch step (as
measured on an H100 before this project, 749 ms and 21.9K tok/s at the 0.6B shape: bf16, SDPA,
gradient checkpointing, full logits, top-64, chunked renorm reverse KL, fused AdamW) for a ratio in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from bench_common import Timer  # noqa: E402 - tools/ is on sys.path when run as a script


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    prompt: int
    response: int
    batch: int = 1
    control: int = 20  # P_r tokens between the two copies of y in the teacher's context
    k: int = 64
    dtype: str = "float32"


SHAPES = {
    "tiny": Shape(hidden=64, layers=2, intermediate=96, heads=4, kv_heads=2, head_dim=32, vocab=1111, prompt=12,
                  response=24, k=8),
    "cpu": Shape(hidden=512, layers=2, intermediate=1536, heads=8, kv_heads=4, head_dim=64, vocab=151936, prompt=128,
                 response=512),
    # Qwen3-0.6B / 4B: the H100 baseline's sequences (4 x 512 + 3584) and the paper's response length
    "qwen3-0.6b": Shape(hidden=1024, layers=28, intermediate=3072, heads=16, kv_heads=8, head_dim=128, vocab=151936,
                        prompt=512, response=3584, batch=4, dtype="bfloat16"),
    "qwen3-4b": Shape(hidden=2560, layers=36, intermediate=9728, heads=32, kv_heads=8, head_dim=128, vocab=151936,
                      prompt=512, response=8192, batch=1, dtype="bfloat16"),
}


def sequence_lengths(shape: Shape) -> tuple[int, int]:
    """(student x + y, teacher x + y + P_r + y) tokens per sequence."""
    return shape.prompt + shape.response, shape.prompt + 2 * shape.response + shape.control


# ------------------------------------------------------------------------------------------
# FLOPs


def trunk_flops(shape: Shape, tokens: int) -> float:
    """Forward FLOPs of the decoder (no LM head) on one sequence of ``tokens``."""
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_token = 2 * (h * (q + 2 * kv) + q * h + 3 * h * shape.intermediate)  # qkv, out proj, SwiGLU
    attention = 2 * tokens * tokens * q  # scores and values over the causal half
    return shape.layers * (tokens * per_token + attention)


def flop_table(shape: Shape, tail: str = "renorm") -> dict[str, dict[str, float]]:
    """Per part, FLOPs of one micro-step (the batch) for each head."""
    student_len, teacher_len = sequence_lengths(shape)
    b, h, v, k, r = shape.batch, shape.hidden, shape.vocab, shape.k, shape.response
    parts = {
        "teacher trunk (fwd)": (b * trunk_flops(shape, teacher_len),) * 2,
        "student trunk (fwd+bwd)": (3 * b * trunk_flops(shape, student_len),) * 2,
        "teacher LM head (fwd)": (2 * b * teacher_len * v * h, 2 * b * r * v * h),
        "student LM head (fwd+bwd)": (
            6 * b * student_len * v * h,
            6 * b * r * k * h if tail == "renorm" else 8 * b * r * v * h,  # bucket: the chunk logits recomputed
        ),
    }
    table = {name: {"dense": dense, "sparse": sparse} for name, (dense, sparse) in parts.items()}
    table["total"] = {head: sum(row[head] for row in table.values()) for head in ("dense", "sparse")}
    return table


def print_flops(name: str, shape: Shape, tail: str) -> None:
    table = flop_table(shape, tail)
    print(f"\nFLOPs of one micro-step, shape {name} (batch {shape.batch}, student {sequence_lengths(shape)[0]}, "
          f"teacher {sequence_lengths(shape)[1]} tokens, tail={tail}):")
    print("| part | dense GFLOP | sparse GFLOP | reduction |")
    print("|---|---|---|---|")
    for part, row in table.items():
        ratio = row["dense"] / row["sparse"] if row["sparse"] else float("inf")
        print(f"| {part} | {row['dense'] / 1e9:.4g} | {row['sparse'] / 1e9:.4g} | {ratio:.1f}x |")
    heads = [p for p in table if "LM head" in p]
    dense_head = sum(table[p]["dense"] for p in heads)
    sparse_head = sum(table[p]["sparse"] for p in heads)
    print(f"LM head: {dense_head / table['total']['dense']:.0%} of the dense step's FLOPs; "
          f"the sparse head does {dense_head / sparse_head:.1f}x fewer LM-head FLOPs")


# ------------------------------------------------------------------------------------------
# One variant, measured in this process


def build(shape: Shape, device: torch.device):
    from sdzero_mcore.models.builder import build_gpt_model
    from sdzero_mcore.models.hf_config import ModelArch
    from sdzero_mcore.models.tiny import tiny_hf_config

    config = tiny_hf_config(
        "Qwen3ForCausalLM", vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=max(sequence_lengths(shape)) + 8,
    )
    arch = ModelArch.from_hf_config(config.to_dict())
    dtype = getattr(torch, shape.dtype)
    torch.manual_seed(0)
    on_cpu = device.type == "cpu"
    student = build_gpt_model(arch, params_dtype=dtype, transformer_impl="local", on_cpu=on_cpu)
    teacher = build_gpt_model(arch, params_dtype=dtype, transformer_impl="local", on_cpu=on_cpu)
    teacher.eval().requires_grad_(False)
    return student, teacher


def make_batch(shape: Shape):
    from sdzero_mcore.data.sample import Sample
    from sdzero_mcore.losses import collate_distill

    generator = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(0, shape.vocab, (n,), generator=generator).tolist()

    samples = []
    for i in range(shape.batch):
        x, y, control = ids(shape.prompt), ids(shape.response), ids(shape.control)
        samples.append(Sample(i, x, y, teacher_prefix_ids=x + y + control))
    return collate_distill(samples, pad_id=0)


def micro_step(ddp, teacher, batch, head: str, shape: Shape, tail: str) -> float:
    """One micro-step as the trainer runs it (``Trainer.train_step`` without the optimizer): DDP's
    gradient buffers zeroed, the teacher's targets, then the student's forward and backward
    through megatron-core's schedule (``trainer.forward_backward``) with Phase 2's forward step
    (``phases.distill.distill_forward_step``): gradients summed into ``main_grad`` and divided by
    the token count there. Returns the loss summed over the response tokens."""
    from sdzero_mcore.config import DistillConfig
    from sdzero_mcore.losses import teacher_targets
    from sdzero_mcore.phases.distill import distill_forward_step
    from sdzero_mcore.trainer import forward_backward

    ddp.zero_grad_buffer()
    targets = teacher_targets(teacher, batch, k=shape.k, lm_head=head)
    rewards = torch.zeros(shape.batch, device=targets.ids.device)
    totals = forward_backward(ddp, [(batch, targets, rewards)],
                              distill_forward_step(DistillConfig(top_k=shape.k, tail=tail, lm_head=head)))
    return totals["loss"] * totals["num_tokens"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_variant(shape: Shape, head: str, tail: str, device: torch.device, warmup: int, iters: int) -> dict:
    from sdzero_mcore.parallel import init_distributed, initialize_model_parallel

    init_distributed("nccl" if device.type == "cuda" else "gloo")
    initialize_model_parallel(1, seed=0)
    from sdzero_mcore.trainer import per_token_ddp

    student, teacher = build(shape, device)
    # as the trainer holds it: megatron-core's DDP with its fp32 main_grad buffers, allocated (and
    # zeroed) here, before the step, so that they count as held and in neither head's working memory
    ddp = per_token_ddp(student)
    batch = make_batch(shape)
    timer = Timer(device)
    result = {"head": head, "tail": tail}
    if device.type == "cuda":
        result["loss_sum"] = float(micro_step(ddp, teacher, batch, head, shape, tail))
        result["working_gib"] = timer.peak_extra_bytes(lambda: micro_step(ddp, teacher, batch, head, shape, tail)) / 2**30
        ms, samples = timer.median_ms(lambda: micro_step(ddp, teacher, batch, head, shape, tail), warmup, iters)
    else:
        result["loss_sum"] = float(micro_step(ddp, teacher, batch, head, shape, tail))  # the warm-up's first step
        for _ in range(warmup - 1):
            micro_step(ddp, teacher, batch, head, shape, tail)
        samples, working = [], []
        for _ in range(iters):
            elapsed_ms, step_bytes, result["peak_rss_reset"] = rss_measured(
                lambda: micro_step(ddp, teacher, batch, head, shape, tail))
            samples.append(elapsed_ms)
            working.append(step_bytes / 2**30)
        ms = statistics.median(samples)
        result.update(working_gib=statistics.median(working), working_gib_each=working, held_gib=rss_bytes() / 2**30,
                      peak_rss_gib=peak_rss_bytes() / 2**30)
    result.update(median_ms=ms, samples_ms=samples)
    return result


def rss_measured(fn) -> tuple[float, int, bool]:
    """``fn()``'s time in ms, its working memory (peak RSS during it minus RSS before it, the C
    allocator's free memory returned to the system first) and whether the peak could be reset."""
    trim_free_heap()
    held = rss_bytes()
    was_reset = reset_peak_rss()
    begin = time.perf_counter()
    fn()
    elapsed_ms = (time.perf_counter() - begin) * 1e3
    return elapsed_ms, peak_rss_bytes() - held, was_reset


def trim_free_heap() -> None:
    """glibc's ``malloc_trim(0)``: free heap pages back to the system (a no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------
# The plain transformers + PyTorch step (GPU baseline)


def measure_hf_baseline(shape: Shape, device: torch.device, warmup: int, iters: int) -> dict:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    student_len, teacher_len = sequence_lengths(shape)
    config = Qwen3Config(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                         intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, tie_word_embeddings=True,
                         max_position_embeddings=teacher_len + 8, attn_implementation="sdpa")
    dtype = getattr(torch, shape.dtype)
    torch.manual_seed(0)
    student = Qwen3ForCausalLM(config).to(device=device, dtype=dtype)
    teacher = Qwen3ForCausalLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    student.gradient_checkpointing_enable()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6, fused=device.type == "cuda")
    generator = torch.Generator().manual_seed(1)
    x = torch.randint(0, shape.vocab, (shape.batch, shape.prompt), generator=generator).to(device)
    y = torch.randint(0, shape.vocab, (shape.batch, shape.response), generator=generator).to(device)
    control = torch.randint(0, shape.vocab, (shape.batch, shape.control), generator=generator).to(device)
    student_ids = torch.cat([x, y], dim=1)
    teacher_ids = torch.cat([x, y, control, y], dim=1)
    s0, t0 = shape.prompt, teacher_len - shape.response

    def step():
        with torch.no_grad():
            t_logits = teacher(teacher_ids).logits[:, t0 - 1 : t0 - 1 + shape.response]
            t_top = torch.log_softmax(t_logits.float(), dim=-1).topk(shape.k, dim=-1)
            del t_logits
        s_logits = student(student_ids).logits[:, s0 - 1 : s0 - 1 + shape.response]
        total = 0.0
        for rows in range(0, shape.response, 1024):  # chunked renorm reverse KL
            chunk = slice(rows, rows + 1024)
            log_p = torch.log_softmax(s_logits[:, chunk].float().gather(-1, t_top.indices[:, chunk]), dim=-1)
            log_q = torch.log_softmax(t_top.values[:, chunk], dim=-1)
            total = total + (log_p.exp() * (log_p - log_q)).sum()
        (total / (shape.batch * shape.response)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    timer = Timer(device)
    working = timer.peak_extra_bytes(step)
    ms, samples = timer.median_ms(step, warmup, iters)
    tokens = shape.batch * student_len
    return {"head": "transformers + PyTorch", "tail": "renorm", "median_ms": ms, "samples_ms": samples,
            "working_gib": working / 2**30 if working is not None else None,
            "student_tokens_per_s": tokens / (ms / 1e3)}


# ------------------------------------------------------------------------------------------


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the CI smoke shape (same as --shape tiny)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--tail", choices=["renorm", "bucket"], default="renorm")
    parser.add_argument("--heads", default="dense,sparse", help="comma-separated: dense, sparse")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the transformers + PyTorch step (default: on a GPU)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: the shape's")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # one measurement, in a subprocess
    args = parser.parse_args(argv)
    name = "tiny" if args.tiny else args.shape
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    shape = SHAPES[name] if args.dtype is None else replace(SHAPES[name], dtype=args.dtype)
    if device.type == "cpu" and args.dtype is None:
        shape = replace(shape, dtype="float32")  # bf16 matmuls on CPU measure nothing useful
    if device.type == "cpu":
        args.warmup = max(1, args.warmup)  # the first step's one-time allocations are not measured (module doc)

    if args.variant is not None:  # child: one variant, one JSON line on stdout
        print(json.dumps(measure_variant(shape, args.variant, args.tail, device, args.warmup, args.iters)))
        return 0

    heads = [h for h in args.heads.split(",") if h]
    unknown = set(heads) - {"dense", "sparse"}
    if unknown:
        parser.error(f"--heads: unknown head(s) {sorted(unknown)}; choose from dense, sparse")
    results = []
    for head in heads:
        if device.type == "cpu":  # a fresh process per variant: its own peak RSS
            command = [sys.executable, __file__, "--shape", name, "--device", "cpu", "--tail", args.tail,
                       "--variant", head, "--warmup", str(args.warmup), "--iters", str(args.iters)]
            if args.dtype:
                command += ["--dtype", args.dtype]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                sys.stderr.write(done.stderr)
                return done.returncode
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        else:
            results.append(measure_variant(shape, head, args.tail, device, args.warmup, args.iters))
    if args.baseline or (args.baseline is None and device.type == "cuda"):
        results.append(measure_hf_baseline(shape, device, args.warmup, args.iters))

    student_len, teacher_len = sequence_lengths(shape)
    print(f"Phase 2 micro-step, shape {name}: {asdict(shape)}; device {device}; student {student_len}, "
          f"teacher {teacher_len} tokens per sequence; tail={args.tail}; medians of {args.iters} after {args.warmup} "
          "warm-up")
    memory = "working GiB (peak - held)" + (" [peak RSS]" if device.type == "cpu" else " [allocator]")
    print(f"| head | median ms | {memory} | loss sum |")
    print("|---|---|---|---|")
    for r in results:
        working = f"{r['working_gib']:.3f}" if r.get("working_gib") is not None else "-"
        loss = f"{r['loss_sum']:.4f}" if "loss_sum" in r else "-"
        print(f"| {r['head']} | {r['median_ms']:.1f} | {working} | {loss} |")
    by_head = {r["head"]: r for r in results}
    if "dense" in by_head and "sparse" in by_head:
        dense, sparse = by_head["dense"], by_head["sparse"]
        print(f"sparse vs dense: {dense['median_ms'] / sparse['median_ms']:.2f}x faster, working memory "
              f"{dense['working_gib'] / max(sparse['working_gib'], 1e-9):.2f}x lower")
    if "transformers + PyTorch" in by_head and "sparse" in by_head:
        base = by_head["transformers + PyTorch"]
        print(f"sparse vs transformers + PyTorch: {base['median_ms'] / by_head['sparse']['median_ms']:.2f}x faster")
    print_flops(name, shape, args.tail)
    for other in ("qwen3-0.6b", "qwen3-4b"):
        if other != name:
            print_flops(other, SHAPES[other], args.tail)
    if args.json:
        args.json.write_text(json.dumps({"shape": name, "config": asdict(shape), "device": str(device),
                                         "results": results, "flops": flop_table(shape, args.tail)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
