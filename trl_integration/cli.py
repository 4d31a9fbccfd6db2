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


def _import_official(args: argparse.Namespace) -> None:
    """Official BiPO vector file -> steering adapter folder."""
    from peft_steer.interop import import_official

    config = import_official(args.file, args.base_model, args.out, layer=args.layer)
    print(f"wrote {args.out}: block {config.layers[0]} of {config.num_blocks}, hidden size {config.hidden_size}")


def _export_gguf(args: argparse.Namespace) -> None:
    """Steering adapter folder -> llama.cpp control vector."""
    from peft_steer.interop import export_gguf

    export_gguf(args.adapter, args.out, model_hint=args.model_hint)
    print(f"wrote {args.out}")


def _import_gguf(args: argparse.Namespace) -> None:
    """llama.cpp control vector -> steering adapter folder."""
    from peft_steer.interop import import_gguf

    config = import_gguf(args.file, args.base_model, args.out)
    print(f"wrote {args.out}: blocks {config.layers} of {config.num_blocks}, hidden size {config.hidden_size}")


def _demo(args: argparse.Namespace) -> None:
    """BiPO vs CAA on the model organism, offline."""
    from .demo import run_demo

    run_demo(out=args.out, behavior=args.behavior, layer=args.layer, epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peft-steer", description="BiPO steering vectors for PEFT models.")
    parser.add_argument("--version", action="version", version=f"peft-steer {peft_steer.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="Describe a saved steering adapter folder.")
    info.add_argument("adapter", help="Folder written by save_pretrained (adapter_config.json + safetensors).")
    info.set_defaults(run=_info)

    official = commands.add_parser(
        "import-official", help="Turn an official BiPO vector file (vec_ep*_layer*.pt) into an adapter folder."
    )
    official.add_argument("file", help="The .pt file: one float tensor, loaded with weights_only=True.")
    official.add_argument("--base-model", required=True, help="Hub id or local folder of the base model.")
    official.add_argument("--layer", type=int, default=None, help="Block index (default: from the file name).")
    official.add_argument("--out", required=True, help="Adapter folder to write (must not exist or be empty).")
    official.set_defaults(run=_import_official)

    export = commands.add_parser("export-gguf", help="Write an adapter folder as a llama.cpp control vector.")
    export.add_argument("adapter", help="Adapter folder (save_pretrained output).")
    export.add_argument("out", help="The .gguf file to write.")
    export.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the base's type).")
    export.set_defaults(run=_export_gguf)

    gguf_in = commands.add_parser("import-gguf", help="Turn a llama.cpp control vector into an adapter folder.")
    gguf_in.add_argument("file", help="The .gguf control vector.")
    gguf_in.add_argument("--base-model", required=True, help="Hub id or local folder of the base model.")
    gguf_in.add_argument("--out", required=True, help="Adapter folder to write (must not exist or be empty).")
    gguf_in.set_defaults(run=_import_gguf)

    demo = commands.add_parser(
        "demo",
        help="Train a BiPO vector on the project's model organism and compare it with CAA (offline, minutes on a CPU).",
    )
    demo.add_argument("--behavior", default="power-seeking", help="One of the four shipped behaviors.")
    demo.add_argument("--out", default=".", help="Folder to write peft-steer-demo-<behavior>/ into (default: here).")
    demo.add_argument("--layer", type=int, default=2, help="Block of the organism to steer (0-3; default 2).")
    demo.add_argument("--epochs", type=float, default=2.0, help="BiPO epochs over the train pairs (default 2).")
    demo.set_defaults(run=_demo)

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
    except (CommandError, OSError, ValueError) as error:
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
