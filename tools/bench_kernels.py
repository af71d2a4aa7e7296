#!/usr/bin/env python3
"""Benchmark sdzero_kernels against PyTorch eager, torch.compile, NeMo-RL-style chunked PyTorch and
Liger-Kernel, with the device's copy bandwidth measured in the same run.

    python tools/bench_kernels.py                      # H100 shapes: T=8192, V=151936 and 32000, K=64, bf16
    python tools/bench_kernels.py --device cpu --tiny  # end-to-end smoke run on CPU (timings meaningless)

Without a GPU, the default --device auto runs the CPU smoke run.

Every op is timed forward + backward (teacher_topk forward only) with a per-token weight on the
loss, as training uses it. "GB/s" is the op's minimal bytes (below) over its median time, "of copy"
that rate over the measured device-to-device copy rate (read + write counted):

    teacher_topk             read the teacher logits once                   T*V*b
    topk_kl renorm           write the dense gradient once                  T*V*b   (target: <= 1.5x the write's time)
    topk_kl bucket           read the student twice, write the gradient     3*T*V*b
    full_kl                  three passes over [T, V]                       3*T*V*b

"peak extra" is the allocator's peak during one call above what was allocated before it (inputs).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from bench_common import Timer  # noqa: E402 - tools/ is on sys.path when run as a script
from sdzero_kernels import full_kl, full_kl_reference, teacher_topk, topk_kl, topk_kl_reference

TARGETS = {  # op -> (kind, bound): fraction of copy bandwidth, or a multiple of the write's time
    "teacher_topk": ("copy_fraction", 0.60),
    "topk_kl renorm": ("write_multiple", 1.5),
    "topk_kl bucket": ("copy_fraction", 0.70),
    "full_kl reverse": ("copy_fraction", 0.60),
}
CHUNK_TOKENS = 1024  # NeMo-RL's distillation loss works on 1024-token chunks


@dataclass
class Result:
    op: str
    impl: str
    vocab: int
    median_ms: Optional[float] = None
    gb_per_s: Optional[float] = None
    copy_fraction: Optional[float] = None
    peak_extra_gib: Optional[float] = None
    note: str = ""
    samples_ms: list = field(default_factory=list)


def measure_copy_gbps(timer: Timer, device, nbytes: int, warmup: int, iters: int) -> float:
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    target = torch.empty_like(source)
    ms, _ = timer.median_ms(lambda: target.copy_(source), warmup, iters)
    return 2 * nbytes / (ms * 1e-3) / 1e9  # bytes read + bytes written


# ------------------------------------------------------------------------------------------
# The same math in plain PyTorch: eager, compiled, and chunked the way NeMo-RL does it


def eager_teacher_topk(logits, k):
    return torch.log_softmax(logits.float(), dim=-1).topk(k, dim=-1)


def chunked_teacher_topk(logits, k):
    values, ids = [], []
    for chunk in logits.split(CHUNK_TOKENS):
        top = torch.log_softmax(chunk.float(), dim=-1).topk(k, dim=-1)
        values.append(top.values)
        ids.append(top.indices)
    return torch.cat(values), torch.cat(ids)


def chunked_backward(loss_fn, student, weights, *teacher):
    """Loss and gradient one 1024-token chunk at a time, in float32 (NeMo-RL style)."""
    grad = torch.empty_like(student)
    for start in range(0, student.shape[0], CHUNK_TOKENS):
        rows = slice(start, start + CHUNK_TOKENS)
        chunk = student[rows].detach().float().requires_grad_()
        loss = loss_fn(chunk, *(t[rows] for t in teacher))
        (chunk_grad,) = torch.autograd.grad((loss * weights[rows]).sum(), chunk)
        grad[rows] = chunk_grad.to(grad.dtype)
    return grad


def fwd_bwd(loss_fn, student, weights, *args, **kwargs):
    student = student.detach().requires_grad_()
    loss = loss_fn(student, *args, **kwargs)
    (loss * weights).sum().backward()


# ------------------------------------------------------------------------------------------


def build_cases(args, student, teacher, weights, k):
    """(op, impl, callable, note) for every comparison that applies."""
    compile_fn = (lambda fn: torch.compile(fn, dynamic=False)) if not args.no_compile else None
    teacher_logprobs, teacher_ids = teacher_topk(teacher, k)
    cases = []

    def add(op, impl, fn, note=""):
        cases.append((op, impl, fn, note))

    add("teacher_topk", "sdzero", lambda: teacher_topk(teacher, k))
    add("teacher_topk", "eager", lambda: eager_teacher_topk(teacher, k))
    if compile_fn:
        compiled_topk = compile_fn(eager_teacher_topk)
        add("teacher_topk", "torch.compile", lambda: compiled_topk(teacher, k))
    add("teacher_topk", f"chunked fp32 ({CHUNK_TOKENS})", lambda: chunked_teacher_topk(teacher, k))

    for tail in ("renorm", "bucket"):
        op = f"topk_kl {tail}"
        options = dict(kl="reverse", tail=tail)

        def reference(s, lp, ids, options=options):
            return topk_kl_reference(s, lp, ids, dtype=torch.float32, **options)

        add(op, "sdzero", lambda o=options: fwd_bwd(topk_kl, student, weights, teacher_logprobs, teacher_ids, **o))
        add(op, "eager", lambda r=reference: fwd_bwd(r, student, weights, teacher_logprobs, teacher_ids))
        if compile_fn:
            add(op, "torch.compile",
                lambda c=compile_fn(reference): fwd_bwd(c, student, weights, teacher_logprobs, teacher_ids))
        add(op, f"chunked fp32 ({CHUNK_TOKENS})",
            lambda r=reference: chunked_backward(r, student, weights, teacher_logprobs, teacher_ids))

    def full_reference(s, t):
        return full_kl_reference(s, t, kl="reverse", dtype=torch.float32)

    add("full_kl reverse", "sdzero", lambda: fwd_bwd(full_kl, student, weights, teacher, kl="reverse"))
    add("full_kl reverse", "eager", lambda: fwd_bwd(full_reference, student, weights, teacher))
    if compile_fn:
        compiled_full = compile_fn(full_reference)
        add("full_kl reverse", "torch.compile", lambda: fwd_bwd(compiled_full, student, weights, teacher))
    add("full_kl reverse", f"chunked fp32 ({CHUNK_TOKENS})",
        lambda: chunked_backward(full_reference, student, weights, teacher))
    liger = liger_full_kl()
    if liger is None:
        add("full_kl reverse", "liger jsd beta=1", None, "liger-kernel not installed")
    else:
        add("full_kl reverse", "liger jsd beta=1", lambda: fwd_bwd(liger, student, weights, teacher),
            "log_softmax in PyTorch, then Liger JSD (beta=1: reverse KL)")
    return cases


def liger_full_kl():
    """Reverse KL through Liger's JSD kernel at beta=1, which is KL(input || target) with the
    gradient on input. It takes log-probabilities, so the log-softmaxes run in PyTorch first, and it
    returns a batch mean: the per-token weights cannot be applied (its loss is scaled instead)."""
    try:
        from liger_kernel.transformers.functional import liger_jsd
    except ImportError:
        return None

    def loss(student, teacher):
        log_p = torch.log_softmax(student, dim=-1)
        log_q = torch.log_softmax(teacher, dim=-1)
        return liger_jsd(log_p, log_q, beta=1.0).expand(student.shape[0])

    return loss


def minimal_bytes(op: str, tokens: int, vocab: int, itemsize: int) -> int:
    passes = {"teacher_topk": 1, "topk_kl renorm": 1, "topk_kl bucket": 3, "full_kl reverse": 3}[op]
    return passes * tokens * vocab * itemsize


def run(args) -> list[Result]:
    device = torch.device(args.device)
    timer = Timer(device)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    results = []
    vocabs = [1000, 320] if args.tiny else args.vocab
    tokens = 64 if args.tiny else args.tokens
    k = 16 if args.tiny else args.k
    copy_gbps = measure_copy_gbps(timer, device, tokens * max(vocabs) * itemsize, args.warmup, args.iters)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; "
          f"copy bandwidth {copy_gbps:.3g} GB/s (read + write)", flush=True)
    for vocab in vocabs:
        generator = torch.Generator(device=device).manual_seed(0)
        student = (torch.randn(tokens, vocab, device=device, generator=generator) * 3).to(dtype)
        teacher = (torch.randn(tokens, vocab, device=device, generator=generator) * 3).to(dtype)
        weights = torch.rand(tokens, device=device, generator=generator)
        gradient = torch.empty_like(student)
        write_ms, _ = timer.median_ms(lambda: gradient.zero_(), args.warmup, args.iters)
        print(f"T={tokens} V={vocab} K={k} {args.dtype}: writing one [T, V] gradient takes {write_ms:.3f} ms", flush=True)
        for op, impl, fn, note in build_cases(args, student, teacher, weights, k):
            result = Result(op=op, impl=impl, vocab=vocab, note=note)
            if fn is not None:
                try:
                    result.median_ms, result.samples_ms = timer.median_ms(fn, args.warmup, args.iters)
                    peak = timer.peak_extra_bytes(fn)
                    result.peak_extra_gib = None if peak is None else peak / 2**30
                    result.gb_per_s = minimal_bytes(op, tokens, vocab, itemsize) / (result.median_ms * 1e-3) / 1e9
                    result.copy_fraction = result.gb_per_s / copy_gbps
                except torch.cuda.OutOfMemoryError:
                    result.note = "out of memory"
                    torch.cuda.empty_cache()
            results.append(result)
            print(f"  {op:<16} {impl:<20} {_fmt(result.median_ms, '.3f')} ms", flush=True)
        results.append(Result(op="write [T,V]", impl="zero_", vocab=vocab, median_ms=write_ms))
    return results, copy_gbps


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(results: list[Result], copy_gbps: float, judge_targets: bool) -> str:
    lines = [
        "| V | op | impl | median ms | GB/s (minimal bytes) | of copy | ours faster by | peak extra GiB | target | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours = {(r.vocab, r.op): r for r in results if r.impl == "sdzero"}
    writes = {r.vocab: r.median_ms for r in results if r.op == "write [T,V]"}
    for r in results:
        if r.op == "write [T,V]":
            continue
        mine = ours.get((r.vocab, r.op))
        speedup = "" if r.impl == "sdzero" or r.median_ms is None or mine is None else f"{r.median_ms / mine.median_ms:.1f}x"
        target = ""
        if r.impl == "sdzero" and r.median_ms is not None and judge_targets:
            kind, bound = TARGETS[r.op]
            if kind == "copy_fraction":
                target = f"{'met' if r.copy_fraction >= bound else 'MISSED'} (>= {bound:.0%} of copy)"
            else:
                ratio = r.median_ms / writes[r.vocab]
                target = f"{'met' if ratio <= bound else 'MISSED'} ({ratio:.2f}x the write, <= {bound}x)"
        lines.append(
            f"| {r.vocab} | {r.op} | {r.impl} | {_fmt(r.median_ms, '.3f')} | {_fmt(r.gb_per_s, '.3g')} | "
            f"{_fmt(r.copy_fraction, '.0%')} | {speedup} | {_fmt(r.peak_extra_gib, '.2f')} | {target} | {r.note} |"
        )
    lines.append(f"\nCopy bandwidth measured in this run: {copy_gbps:.3g} GB/s. Write of one [T, V] gradient: "
                 + ", ".join(f"V={v}: {ms:.3f} ms" for v, ms in writes.items()) + ".")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"], help="auto: cuda if present, else a CPU --tiny run")
    parser.add_argument("--tiny", action="store_true", help="T=64, V=1000 and 320, K=16: a smoke run")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, nargs="+", default=[151936, 32000])
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--json", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu":
            print("no GPU visible: running the CPU smoke run (--tiny); its timings say nothing about GPUs")
            args.tiny = True
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no GPU is visible; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    results, copy_gbps = run(args)
    print()
    # Bandwidth targets are GPU targets: on a CPU the verdict column stays empty.
    print(markdown(results, copy_gbps, judge_targets=args.device == "cuda" and not args.tiny))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"copy_gbps": copy_gbps, "args": vars(args), "results": [asdict(r) for r in results]}, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
