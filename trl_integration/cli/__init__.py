"""The `peft-steer` command line. It sits on top of both packages, so it lives here (peft_steer never imports TRL).

One module per group of commands: `files` (saved adapters and vector files), `demo`, `train`, `measure` (eval,
generate), `sweep`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import peft_steer

from .demo import add_demo_command
from .errors import CommandError
from .files import add_file_commands
from .measure import add_measure_commands
from .sweep import add_sweep_command
from .train import add_train_command

__all__ = ["CommandError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every `peft-steer` command; each sets ``run``, the function that carries it out."""
    parser = argparse.ArgumentParser(prog="peft-steer", description="BiPO steering vectors for PEFT models.")
    parser.add_argument("--version", action="version", version=f"peft-steer {peft_steer.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    add_file_commands(commands)
    add_demo_command(commands)
    add_train_command(commands)
    add_measure_commands(commands)
    add_sweep_command(commands)
    return parser


def _joined_multipliers(argv: list[str]) -> list[str]:
    """``--multipliers -1,0,1`` as ``--multipliers=-1,0,1`` (argparse takes a value starting with - for an option)."""
    joined = []
    for arg in argv:
        if joined and joined[-1] == "--multipliers" and arg.startswith("-"):
            joined[-1] = f"--multipliers={arg}"
        else:
            joined.append(arg)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``peft-steer`` with ``argv`` (default: the process's arguments); returns the exit code."""
    args = build_parser().parse_args(_joined_multipliers(sys.argv[1:] if argv is None else list(argv)))
    try:
        args.run(args)
    except (CommandError, OSError, ValueError) as error:
        print(f"peft-steer {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyError as error:
        if not peft_steer.is_missing_registration(error):
            raise
        print(f"peft-steer {args.command}: error: {peft_steer.MISSING_REGISTRATION}", file=sys.stderr)
        return 2
    return 0
