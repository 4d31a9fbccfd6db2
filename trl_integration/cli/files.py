"""`peft-steer info | import-official | export-gguf | import-gguf`: saved steering adapters and vector files."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from peft_steer.interop import export_gguf, import_gguf, import_official, read_adapter


def add_file_commands(commands: Any) -> None:
    """Register the commands on the CLI's sub-command parsers."""
    info = commands.add_parser("info", help="Describe a saved steering adapter folder.")
    info.add_argument("adapter", help="Folder written by save_pretrained (adapter_config.json + safetensors).")
    info.set_defaults(run=run_info)

    official = commands.add_parser(
        "import-official", help="Turn an official BiPO vector file (vec_ep*_layer*.pt) into an adapter folder."
    )
    official.add_argument("file", help="The .pt file: one float tensor, loaded with weights_only=True.")
    official.add_argument("--base-model", required=True, help="Hub id or local folder of the base model.")
    official.add_argument(
        "--layer", type=int, default=None, help="Block index, negative from the end (default: from the file name)."
    )
    official.add_argument("--out", required=True, help="Adapter folder to write (must not exist or be empty).")
    official.set_defaults(run=run_import_official)

    export = commands.add_parser("export-gguf", help="Write an adapter folder as a llama.cpp control vector.")
    export.add_argument("adapter", help="Adapter folder (save_pretrained output).")
    export.add_argument("out", help="The .gguf file to write.")
    export.add_argument("--model-hint", default=None, help="controlvector.model_hint (default: the base's type).")
    export.add_argument("--overwrite", action="store_true", help="Replace OUT if it exists (it is refused otherwise).")
    export.add_argument(
        "--all-positions",
        action="store_true",
        help="Export a positions='completion' adapter anyway: llama.cpp and repeng steer every position.",
    )
    export.set_defaults(run=run_export_gguf)

    gguf_in = commands.add_parser("import-gguf", help="Turn a llama.cpp control vector into an adapter folder.")
    gguf_in.add_argument("file", help="The .gguf control vector.")
    gguf_in.add_argument("--base-model", required=True, help="Hub id or local folder of the base model.")
    gguf_in.add_argument("--out", required=True, help="Adapter folder to write (must not exist or be empty).")
    gguf_in.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=None,
        metavar="N",
        help="Import only these blocks (negative: from the end), as repeng's ControlModel(model, layer_ids) steers "
        "only its layer_ids; llama.cpp's --control-vector-layer-range A B is --layers A ... B (default: all).",
    )
    gguf_in.add_argument(
        "--multiplier",
        type=float,
        default=1.0,
        help="The adapter's default strength: repeng's coeff, llama.cpp's --control-vector-scaled scale (default 1).",
    )
    gguf_in.set_defaults(run=run_import_gguf)


def run_info(args: argparse.Namespace) -> None:
    """Print what a saved steering adapter is: blocks, hidden size, base model, vector norms."""
    config, vectors = read_adapter(args.adapter)  # refuses NaN / inf vectors, which JSON cannot print
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


def run_import_official(args: argparse.Namespace) -> None:
    """Official BiPO vector file -> steering adapter folder."""
    config = import_official(args.file, args.base_model, args.out, layer=args.layer)
    print(f"wrote {args.out}: block {config.layers[0]} of {config.num_blocks}, hidden size {config.hidden_size}")


def run_export_gguf(args: argparse.Namespace) -> None:
    """Steering adapter folder -> llama.cpp control vector."""
    export_gguf(
        args.adapter, args.out, model_hint=args.model_hint, overwrite=args.overwrite, all_positions=args.all_positions
    )
    print(f"wrote {args.out}")


def run_import_gguf(args: argparse.Namespace) -> None:
    """llama.cpp control vector -> steering adapter folder."""
    config = import_gguf(args.file, args.base_model, args.out, layers=args.layers, multiplier=args.multiplier)
    print(f"wrote {args.out}: blocks {config.layers} of {config.num_blocks}, hidden size {config.hidden_size}")
