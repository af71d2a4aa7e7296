"""The `sdzero` command."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from sdzero_mcore import __version__
from sdzero_mcore.warnings_filter import quiet_dependency_warnings


def build_parser() -> argparse.ArgumentParser:
    from sdzero_mcore.checkpoint.convert import add_convert_arguments
    from sdzero_mcore.demo import add_demo_arguments

    parser = argparse.ArgumentParser(prog="sdzero", description="SD-Zero on megatron-core")
    parser.add_argument("--version", action="version", version=f"sdzero-mcore {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_convert_arguments(
        commands.add_parser("convert", help="convert checkpoints between HF and megatron-core")
    )
    add_demo_arguments(
        commands.add_parser("demo", help="the embedded demo: tiny model, CPU, no downloads")
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    quiet_dependency_warnings()
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from sdzero_mcore.checkpoint.convert import run_convert

        return run_convert(args)
    if args.command == "demo":
        from sdzero_mcore.demo import run_demo

        return 0 if run_demo(args.out_dir, args.architecture, args.tp) else 1
    raise AssertionError(args.command)


if __name__ == "__main__":  # `python -m sdzero_mcore.cli`; spawned workers re-import this module
    sys.exit(main())
