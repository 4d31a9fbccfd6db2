"""`peft-steer demo`: BiPO vs CAA on the model organism, offline."""

from __future__ import annotations

import argparse
from typing import Any

from ..demo import run_demo


def add_demo_command(commands: Any) -> None:
    """Register ``peft-steer demo`` on the CLI's sub-command parsers."""
    demo = commands.add_parser(
        "demo",
        help="Train a BiPO vector on the project's model organism and compare it with CAA (offline, minutes on a CPU).",
    )
    demo.add_argument("--behavior", default="power-seeking", help="One of the four shipped behaviors.")
    demo.add_argument("--out", default=".", help="Folder to write peft-steer-demo-<behavior>/ into (default: here).")
    demo.add_argument("--layer", type=int, default=2, help="Block of the organism to steer (0-3; default 2).")
    demo.add_argument("--epochs", type=float, default=2.0, help="BiPO epochs over the train pairs (default 2).")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """BiPO vs CAA on the model organism, offline."""
    run_demo(out=args.out, behavior=args.behavior, layer=args.layer, epochs=args.epochs)
