"""``peft-steer-vllm serve``: vLLM's OpenAI-compatible server, steering each request as it asks.

It checks the adapters (readable, and made for the model when the model is a local folder), exports the
configuration, and replaces itself with ``python -m vllm.entrypoints.openai.api_server`` started with the plugin's
options; every other argument goes to vLLM unchanged. Bad input is one line and exit code 2, before vLLM starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from .config import LOAD_FORMAT, MIDDLEWARE, QUALNAME, ServeConfig, export


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter {text!r}: give NAME=PATH (a steering adapter folder or .gguf)")
    return name, path


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="peft-steer-vllm", description=__doc__.split("\n\n")[0])
    commands = top.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="Start vLLM's OpenAI-compatible server with steering adapters.",
        description="Any argument not listed here goes to vLLM's server (e.g. --port, --dtype, --max-model-len).",
    )
    serve.add_argument("model", help="The model vLLM serves (a local folder or a hub id).")
    serve.add_argument(
        "--adapter",
        action="append",
        type=_adapter,
        default=[],
        metavar="NAME=PATH",
        help="An adapter requests may name: a peft-steer adapter folder or a llama.cpp .gguf control vector. Repeat "
        "for several.",
    )
    serve.add_argument(
        "--default-steering",
        default="",
        metavar="NAME:MULTIPLIER,...",
        help="The steering of requests that give none (default: unsteered).",
    )
    serve.add_argument(
        "--weights-format", default="auto", help="vLLM's load format for the model's weights (default: auto)."
    )
    serve.add_argument("--dry-run", action="store_true", help="Print the vLLM command and exit.")
    return top


def vllm_command(model: str, rest: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--enforce-eager",
        "--load-format", LOAD_FORMAT, "--logits-processors", QUALNAME, "--middleware", MIDDLEWARE, *rest,
    ]  # fmt: skip


def model_shape(model: str) -> tuple[int, int] | None:
    """``(hidden size, blocks)`` from a local model folder's ``config.json`` (its text model's); None otherwise."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as file:
            raw = json.load(file)
    except (OSError, ValueError, RecursionError):
        return None  # vLLM reports an unreadable config itself
    raw = raw.get("text_config", raw) if isinstance(raw, dict) else {}
    hidden = raw.get("hidden_size", raw.get("n_embd"))
    blocks = raw.get("num_hidden_layers", raw.get("n_layer"))
    return (hidden, blocks) if isinstance(hidden, int) and isinstance(blocks, int) else None


def main(argv: list[str] | None = None) -> int:
    args, rest = parser().parse_known_args(argv)
    spelled = [arg.replace("_", "-") if arg.startswith("--") else arg for arg in rest]  # vLLM takes both
    for option in ("--load-format", "--logits-processors"):
        if option in spelled or any(arg.startswith(option + "=") for arg in spelled):
            print(f"peft-steer-vllm: error: {option} is set by peft-steer-vllm serve; leave it out.", file=sys.stderr)
            return 2
    try:
        names = [name for name, _ in args.adapter]
        if len(set(names)) != len(names):
            raise ValueError(f"--adapter names {sorted(n for n in names if names.count(n) > 1)[0]!r} twice.")
        serve = ServeConfig(
            {name: os.path.abspath(path) for name, path in args.adapter}, args.default_steering, args.weights_format
        )
        adapters = serve.load()
        shape = model_shape(args.model)
        if shape is not None:
            for vectors in adapters.values():
                vectors.check_model(*shape)
    except (ValueError, OSError) as error:
        print(f"peft-steer-vllm: error: {error}", file=sys.stderr)
        return 2
    command = vllm_command(args.model, rest)
    if args.dry_run:
        print(" ".join(command))
        return 0
    export(serve)
    os.execv(command[0], command)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
