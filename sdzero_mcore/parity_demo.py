"""`sdzero parity-demo` / `make parity-demo`: the converters and the megatron models, end to end.

It makes a tiny HF model, converts it to a megatron-core checkpoint at TP=2, runs megatron at TP=2
and TP=1 against transformers on the same tokens, converts back to HF and compares every tensor
bit for bit (CPU, no downloads, about 20 s).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sdzero_mcore.models.hf_config import SUPPORTED_ARCHITECTURES

LOGITS_TOLERANCE = 1e-4
PROMPT = "Q: What is 12 + 7?\nA: Let me add. 12 + 7 = 19. The answer is \\boxed{19}."


def _logits_worker(mcore_dir: str, tp: int, input_ids: torch.Tensor, out_path: str) -> None:
    import torch.distributed as dist

    from sdzero_mcore.checkpoint.loading import build_model_from_mcore
    from sdzero_mcore.models.forward import causal_lm_logits
    from sdzero_mcore.parallel import destroy_distributed, init_distributed, initialize_model_parallel

    init_distributed("gloo")
    try:
        initialize_model_parallel(tensor_model_parallel_size=tp)
        model = build_model_from_mcore(mcore_dir, transformer_impl="local").eval()
        with torch.no_grad():
            logits = causal_lm_logits(model, input_ids)
        if dist.get_rank() == 0:
            torch.save({"logits": logits, "padded_vocab_size": model.padded_vocab_size}, out_path)
    finally:
        destroy_distributed()


def run_parity_demo(out_dir: str | Path, architecture: str = "Qwen3ForCausalLM", tp: int = 2) -> bool:
    """Run the round trip and print the parity table. Returns whether every check passed."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from sdzero_mcore.checkpoint.convert import hf_to_mcore, mcore_to_hf
    from sdzero_mcore.models.tiny import save_tiny_hf_model
    from sdzero_mcore.parallel import run_local_workers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_dir, mcore_dir, back_dir = out_dir / "hf", out_dir / f"mcore_tp{tp}", out_dir / "hf_from_mcore"
    rows: list[tuple[str, str, bool]] = []
    hf_logging.disable_progress_bar()  # transformers' own bars for a 1 MB model; ours show the conversion

    start = time.perf_counter()
    save_tiny_hf_model(hf_dir, architecture)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = reference(input_ids).logits
    config = reference.config
    print(
        f"sdzero parity-demo: {architecture}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"vocab {config.vocab_size}; prompt of {input_ids.shape[1]} tokens; outputs in {out_dir}"
    )

    meta = hf_to_mcore(hf_dir, mcore_dir, tp, overwrite=True)
    rows.append(
        (f"hf-to-mcore at TP={tp}", f"{time.perf_counter() - start:.1f} s, vocab {meta['vocab_size']} padded to {meta['padded_vocab_size']}", True)
    )
    for load_tp in sorted({tp, 1}, reverse=True):
        result_path = out_dir / f"logits_tp{load_tp}.pt"
        run_local_workers(_logits_worker, load_tp, str(mcore_dir), load_tp, input_ids, str(result_path))
        got = torch.load(result_path)
        diff = (got["logits"] - expected).abs().max().item()
        rows.append(
            (f"logits vs transformers, TP={load_tp}", f"max |diff| = {diff:.2e} (bound {LOGITS_TOLERANCE:.0e})", diff < LOGITS_TOLERANCE)
        )

    mcore_to_hf(mcore_dir, back_dir, overwrite=True)
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(back_dir / "model.safetensors"))
    same = sum(name in back and torch.equal(back[name], tensor) for name, tensor in original.items())
    exact = same == len(original) and back.keys() == original.keys()
    rows.append(("mcore-to-hf round trip", f"{same}/{len(original)} tensors bit-exact", exact))

    width = max(len(name) for name, _, _ in rows)
    for name, detail, ok in rows:
        print(f"  {name:<{width}}  {detail:<48} {'PASS' if ok else 'FAIL'}")
    passed = all(ok for _, _, ok in rows)
    print(f"demo {'passed' if passed else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    return passed


def add_parity_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", default="runs/parity-demo", help="where the demo writes its checkpoints")
    parser.add_argument(
        "--architecture",
        default="Qwen3ForCausalLM",
        choices=sorted(SUPPORTED_ARCHITECTURES),
    )
    parser.add_argument("--tp", type=int, default=2, choices=[1, 2], help="tensor-parallel size to convert at")
