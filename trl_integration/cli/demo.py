"""`peft-steer demo`: a real chat model steered by a shipped BiPO vector next to CAA, or BiPO on the organism."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import number_problem
from ..demo import run_demo
from ..organism_demo import run_organism_demo
from .errors import CommandError


def add_demo_command(commands: Any) -> None:
    """Register ``peft-steer demo`` on the CLI's sub-command parsers."""
    demo = commands.add_parser(
        "demo",
        help="SmolLM2-135M-Instruct answering at negative and positive BiPO strength, scored next to CAA (offline, "
        "about 3.5 minutes on a CPU); --organism trains BiPO on the project's tiny model organism instead.",
    )
    demo.add_argument("--out", default=".", help="Folder to write the demo's folder into (default: here).")
    demo.add_argument(
        "--organism",
        action="store_true",
        help="Train a BiPO vector on the model organism (a 4-block LM with a latent persona) and compare with CAA.",
    )
    organism = demo.add_argument_group("--organism options")
    organism.add_argument("--behavior", default="power-seeking", help="One of the four shipped behaviors.")
    organism.add_argument("--layer", type=int, default=2, help="Block of the organism to steer (0-3; default 2).")
    organism.add_argument("--epochs", type=float, default=2.0, help="BiPO epochs over the train pairs (default 2).")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """The chat-model demo, or the organism demo with --organism."""
    if args.organism:
        problem = number_problem("num_train_epochs", args.epochs)  # the rule `peft-steer train` applies
        if problem is not None:
            raise CommandError(f"--epochs {args.epochs}: {problem} (an untrained vector is no result).")
        run_organism_demo(out=args.out, behavior=args.behavior, layer=args.layer, epochs=args.epochs)
    else:
        run_demo(out=args.out)
