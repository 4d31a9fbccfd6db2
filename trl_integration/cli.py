"""The `peft-steer` command line. It sits on top of both packages, so it lives here (peft_steer never imports TRL)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import peft_steer


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def _info(args: argparse.Namespace) -> None:
    """Print what a saved steering adapter is: blocks, hidden size, base model, vector norms."""
    from peft_steer.io import read_adapter

    config, vectors = read_adapter(args.adapter)
    summary = {
        "adapter": os.path.abspath(args.adapter),
        "base_model": config.base_model_name_or_path,
        "layers": config.layers,
        "hidden_size": config.hidden_size,
        "num_blocks": config.num_blocks,
        "positions": config.positions,
        "multiplier": config.multiplier,
        "vector_norms": {str(block): round(float(vector.norm()), 6) for block, vector in sorted(vectors.items())},
    }
    print(json.dumps(summary, indent=2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-steer", description="BiPO steering vectors for PEFT models.")
    parser.add_argument("--version", action="version", version=f"peft-steer {peft_steer.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="Describe a saved steering adapter folder.")
    info.add_argument("adapter", help="Folder written by save_pretrained (adapter_config.json + safetensors).")
    info.set_defaults(run=_info)

    try:
        from .train_command import add_train_command
    except ImportError:  # the trainer is optional while it is being built
        pass
    else:
        add_train_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, FileNotFoundError, ValueError) as error:
        print(f"peft-steer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyError as error:
        if not peft_steer.is_missing_registration(error):
            raise
        print(f"peft-steer {args.command}: error: {peft_steer.MISSING_REGISTRATION}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
