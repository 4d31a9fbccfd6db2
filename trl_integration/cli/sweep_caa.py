"""`peft-steer sweep`'s CAA baseline: the mean activation difference of the CAA pairs at each block of a range
(one pass over the pairs per block), rescaled to the BiPO vector's norm, scored at the sweep's strengths; the block
that moves the behavior most is the one compared with BiPO."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from peft_steer import SteeringConfig
from peft_steer.data import DataError, PairFormatter, load_behavior, load_preference_data
from peft_steer.evaluate import caa_vector

from .errors import CommandError
from .eval_scores import margins_at, score_of

CAA_PAIRS = 64


def add_caa_options(parser: argparse.ArgumentParser) -> None:
    """``--caa-layers``, ``--caa-data``, ``--caa-pairs``, ``--no-caa``."""
    group = parser.add_argument_group(
        "CAA baseline",
        "CAA (the mean activation difference between the matching and the other answers of the CAA pairs, read at "
        "the answer's last token, or averaged over the answer's tokens when the chat template ends every answer with "
        "the same end-of-turn token), rescaled to the norm of the adapter's vector (all its blocks together) and "
        "steering one block. Extracting it costs one pass over the pairs per block.",
    )
    group.add_argument(
        "--caa-layers",
        metavar="BLOCKS",
        default=None,
        help="The blocks to try CAA at: a range 10-16, a list 10,12,14, or one block (default: the adapter's "
        "blocks). The block whose CAA moves the score most from the lowest to the highest multiplier is plotted "
        "and costed; all are reported.",
    )
    group.add_argument(
        "--caa-data",
        metavar="FILE",
        default=None,
        help="Preference pairs to extract CAA from (default with --behavior: its train split; with --data, no CAA "
        "unless given).",
    )
    group.add_argument(
        "--caa-pairs", type=int, default=CAA_PAIRS, help=f"Use the first N CAA pairs (default {CAA_PAIRS})."
    )
    group.add_argument("--no-caa", action="store_true", help="No CAA baseline.")


def parse_blocks(text: str) -> list[int]:
    """``"10-16"`` -> ``[10, ..., 16]``; ``"10,12"`` -> ``[10, 12]``; anything else a CommandError naming the
    option."""
    blocks: list[int] = []
    try:
        for part in text.split(","):
            first, dash, last = part.strip().partition("-")
            start, stop = int(first), int(last) if dash else int(first)
            if start < 0 or stop < start:
                raise ValueError
            blocks.extend(range(start, stop + 1))
    except ValueError:
        raise CommandError(
            f"--caa-layers {text[:80]!r}: expected block numbers from 0, as a range 10-16 or a list 10,12,14."
        ) from None
    return list(dict.fromkeys(blocks))


@dataclass
class CaaPlan:
    """The checked CAA options: the blocks, and the pairs' prompt / matching / not-matching texts."""

    blocks: list[int]
    prompts: list[str]
    matching: list[str]
    not_matching: list[str]
    source: str
    position: str


@dataclass
class CaaResult:
    """The CAA curves at each block, and the block chosen (the largest move of the score)."""

    plan: CaaPlan
    norm: float
    scores: dict[int, dict[float, float]]
    ranges: dict[int, float]
    best: int
    adapters: dict[int, str] = field(default_factory=dict)


def caa_plan(args: argparse.Namespace, tokenizer: Any, format_options: dict[str, Any]) -> CaaPlan | None:
    """The CAA blocks and pairs, checked against the adapter's model before it is loaded (None: no CAA)."""
    if args.no_caa:
        if args.caa_layers is not None or args.caa_data is not None:
            raise CommandError("--no-caa with --caa-layers / --caa-data: choose one.")
        return None
    if args.caa_pairs < 1:
        raise CommandError(f"--caa-pairs {args.caa_pairs}: must be at least 1.")
    with open(os.path.join(args.adapter, "adapter_config.json"), encoding="utf-8") as file:
        config = json.load(file)
    blocks = parse_blocks(args.caa_layers) if args.caa_layers is not None else list(config.get("layers") or [])
    count = config.get("num_blocks")
    if count is not None and blocks and max(blocks) >= count:
        raise CommandError(f"--caa-layers {args.caa_layers}: the model has blocks 0 to {count - 1}.")
    if args.caa_data is None and not args.behavior:
        return None
    if args.caa_data is not None and not os.path.exists(args.caa_data):
        raise CommandError(f"--caa-data {args.caa_data}: no such file or folder.")
    try:
        pairs = (
            load_preference_data(args.caa_data, tokenizer, **format_options)
            if args.caa_data
            else load_behavior(args.behavior, "train", tokenizer, **format_options)
        )
    except DataError as error:
        raise CommandError(str(error)) from None
    n = min(args.caa_pairs, len(pairs))
    # named, not located: the source is also written into the model card
    source = (
        f"`{os.path.basename(os.path.normpath(args.caa_data))}`"
        if args.caa_data
        else f"the shipped {args.behavior} train split"
    )
    # with a chat template every answer ends with its end-of-turn token: the last token would read the same for all
    position = "mean" if PairFormatter(tokenizer, **format_options).use_template else "last"
    return CaaPlan(
        blocks, pairs["prompt"][:n], pairs["chosen"][:n], pairs["rejected"][:n], f"{source}, first {n} pairs", position
    )


def caa_sweep(
    args: argparse.Namespace,
    model: Any,
    inputs: Any,
    plan: CaaPlan,
    norm: float,
    unsteered: float,
) -> CaaResult:
    """CAA at each block of ``plan``, rescaled to ``norm``, scored at the sweep's multipliers (0: ``unsteered``, the
    same model); each block's adapter stays on ``model`` as ``caa-<block>``, and the original adapter is made active
    again."""
    active = model.active_adapter
    strengths = [m for m in inputs.multipliers if m != 0.0]
    scores, ranges, adapters = {}, {}, {}
    for block in plan.blocks:
        vector = caa_vector(
            model,
            inputs.tokenizer,
            plan.prompts,
            plan.matching,
            plan.not_matching,
            block,
            position=plan.position,
            batch_size=args.batch_size,
            progress=True,
        )
        length = float(vector.norm())
        vector = vector * (norm / length) if length > 0 else vector
        name = adapters[block] = f"caa-{block}"
        model.add_adapter(name, SteeringConfig(layers=[block], init_vectors={block: vector.to(torch.float32)}))
        model.set_adapter(name)
        found = margins_at(
            model, inputs.tokenizer, args.metric, inputs.rows, strengths, inputs.format_ab, args.batch_size
        )
        curve = {m: score_of(found[m].margins) for m in strengths} | {0.0: unsteered}
        scores[block] = dict(sorted(curve.items()))
        ranges[block] = scores[block][max(curve)] - scores[block][min(curve)]
    model.set_adapter(active)
    best = max(plan.blocks, key=lambda block: ranges[block])
    return CaaResult(plan, norm, scores, ranges, best, adapters)
