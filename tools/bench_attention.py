"""Benchmark: SDPACoreAttention against megatron-core's unfused DotProductAttention (local spec).

Forward + backward of one attention core (causal, GQA, Megatron's [s, b, h, d] layout) at
sequence lengths 2K, 8K and 16K, bf16, on one GPU: median time, achieved TFLOP/s and its fraction
of the matmul ceiling, and peak extra memory. The unfused path materialises [b, h, s, s] scores
(plus an fp32 softmax), so at long sequences it runs out of memory; that is reported, not hidden.

    python tools/bench_attention.py                     # GPU: the table for docs/benchmarks.md
    python tools/bench_attention.py --device cpu --tiny  # CPU smoke run (checks the script only)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from sdzero_mcore.warnings_filter import quiet_dependency_warnings

quiet_dependency_warnings()  # before megatron-core is imported: its import-time notices are noise here

from bench_common import Timer  # noqa: E402 - tools/ is on sys.path when run as a script
from megatron.core.transformer.dot_product_attention import DotProductAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from sdzero_mcore.models.attention import SDPACoreAttention  # noqa: E402
from sdzero_mcore.parallel import init_distributed, initialize_model_parallel  # noqa: E402

IMPLS = ("sdpa", "unfused")


@dataclass
class Row:
    impl: str
    seq_len: int
    median_ms: Optional[float] = None
    tflops: Optional[float] = None
    matmul_fraction: Optional[float] = None
    peak_extra_gib: Optional[float] = None
    note: str = ""


def causal_attention_flops(batch: int, heads: int, seq: int, head_dim: int) -> float:
    """Forward + backward FLOPs of causal attention, the FlashAttention convention.

    Forward: two matmuls of 2*b*h*s*s*d each, halved by the causal mask. Backward: 2.5x forward.
    """
    forward = 4 * batch * heads * seq * seq * head_dim / 2
    return 3.5 * forward


def init_single_rank(device: torch.device) -> None:
    init_distributed("nccl" if device.type == "cuda" else "gloo")
    initialize_model_parallel(1, seed=0)


def build_core(impl: str, args, dtype: torch.dtype):
    config = TransformerConfig(
        num_layers=1,
        hidden_size=args.heads * args.head_dim,
        num_attention_heads=args.heads,
        num_query_groups=args.groups,
        kv_channels=args.head_dim,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        attention_softmax_in_fp32=True,
        masked_softmax_fusion=False,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
    )
    cls = SDPACoreAttention if impl == "sdpa" else DotProductAttention
    return cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def measure(impl: str, seq: int, args, device, dtype, timer: Timer, matmul_tflops: Optional[float]) -> Row:
    row = Row(impl=impl, seq_len=seq)
    generator = torch.Generator(device=device).manual_seed(seq)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=generator).requires_grad_()

    try:
        core = build_core(impl, args, dtype).to(device)
        q = rand(seq, args.batch, args.heads, args.head_dim)
        k = rand(seq, args.batch, args.groups, args.head_dim)
        v = rand(seq, args.batch, args.groups, args.head_dim)
        grad_out = torch.randn(seq, args.batch, args.heads * args.head_dim, device=device, dtype=dtype)

        def step():
            for t in (q, k, v):
                t.grad = None
            core(q, k, v, None).backward(grad_out)

        row.median_ms, _ = timer.median_ms(step, args.warmup, args.iters)
        peak = timer.peak_extra_bytes(step)
        row.peak_extra_gib = None if peak is None else peak / 2**30
    except torch.OutOfMemoryError as error:
        row.note = f"OOM: {str(error).splitlines()[0][:80]}"
        torch.cuda.empty_cache()
        return row
    flops = causal_attention_flops(args.batch, args.heads, seq, args.head_dim)
    row.tflops = flops / (row.median_ms * 1e-3) / 1e12
    if matmul_tflops:
        row.matmul_fraction = row.tflops / matmul_tflops
    return row


def measure_matmul_tflops(timer: Timer, device, dtype, warmup: int, iters: int, n: int = 8192) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms, _ = timer.median_ms(lambda: a @ b, warmup, iters)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(rows: list[Row], args, matmul_tflops: Optional[float]) -> str:
    lines = [
        f"attention core fwd+bwd, causal, b={args.batch}, heads={args.heads}, kv groups={args.groups}, "
        f"head_dim={args.head_dim}, {args.dtype}; matmul ceiling {_fmt(matmul_tflops, '.0f')} TFLOP/s",
        "",
        "| seq | impl | median ms | TFLOP/s | of matmul | peak extra GiB | speed-up vs unfused | note |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r.impl, r.seq_len): r for r in rows}
    for r in rows:
        base = by_key.get(("unfused", r.seq_len))
        speedup = base.median_ms / r.median_ms if base and base.median_ms and r.median_ms else None
        lines.append(
            f"| {r.seq_len} | {r.impl} | {_fmt(r.median_ms, '.3f')} | {_fmt(r.tflops, '.3g')} | "
            f"{_fmt(r.matmul_fraction, '.0%')} | {_fmt(r.peak_extra_gib, '.2f')} | {_fmt(speedup, '.2f')}x | {r.note} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32, help="query heads per GPU (Qwen3-4B at TP=1: 32)")
    parser.add_argument("--groups", type=int, default=8, help="key/value groups per GPU")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke run")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no GPU is visible")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if args.tiny:
        args.seq_lens, args.heads, args.groups, args.head_dim = [64, 256], 4, 2, 32
    args.dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    init_single_rank(device)
    timer = Timer(device)
    matmul = measure_matmul_tflops(timer, device, dtype, args.warmup, args.iters) if device.type == "cuda" else None
    rows = [
        measure(impl, seq, args, device, dtype, timer, matmul) for seq in args.seq_lens for impl in IMPLS
    ]
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}")
    print(markdown(rows, args, matmul))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": name, "args": vars(args), "matmul_tflops": matmul, "rows": [asdict(r) for r in rows]},
                      handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
