"""The ``convert`` command's arguments, apart from the converters: the CLI builds its parser from
this module without importing megatron-core (``sdzero --help`` stays fast)."""

from __future__ import annotations

import argparse

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="{hf-to-mcore,mcore-to-hf}")
    to_mcore = sub.add_parser("hf-to-mcore", help="HF safetensors -> megatron-core dist checkpoint")
    to_mcore.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json, *.safetensors)")
    to_mcore.add_argument("--out-dir", required=True, help="megatron-core checkpoint directory to create")
    to_mcore.add_argument("--tp", type=int, default=1, help="tensor-parallel size to write at (default 1)")
    to_mcore.add_argument("--pp", type=int, default=1,
                          help="pipeline-parallel size to write at (default 1; each stage's process builds only its layers)")
    to_mcore.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="auto", help="parameter dtype (auto: as stored)"
    )
    to_mcore.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    to_hf = sub.add_parser("mcore-to-hf", help="megatron-core dist checkpoint -> HF safetensors")
    to_hf.add_argument("--mcore-dir", required=True, help="checkpoint written by hf-to-mcore or the trainer")
    to_hf.add_argument("--out-dir", required=True, help="HF checkpoint directory to create")
    to_hf.add_argument("--dtype", choices=DTYPE_NAMES, default="auto", help="output dtype (auto: as stored)")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    for sub_parser in (to_mcore, to_hf):
        sub_parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
        sub_parser.add_argument("--no-progress", action="store_true", help="no progress bars")
