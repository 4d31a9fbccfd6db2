"""`peft-steer eval | generate`: the behavior score at each strength, and steered answers side by side."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel

from peft_steer import SteeringConfig
from peft_steer.adapter.config import FLOAT32_MAX
from peft_steer.data import (
    BEHAVIORS,
    SYSTEM_PROMPT,
    DataError,
    PairFormatter,
    load_behavior,
    load_preference_data,
    read_behavior_rows,
)
from peft_steer.data.files import read_source, text_cell
from peft_steer.evaluate import (
    Cost,
    chat_ab_prompt,
    generate_sweep,
    matching_letters,
    plain_ab_prompt,
    score_table,
    side_by_side,
)
from peft_steer.evaluate.generation import check_resumable, distinct_strengths
from peft_steer.interop import adapter_digest, read_adapter_for
from peft_steer.models import MODEL_HELP, load_model, load_tokenizer, portable_name
from peft_steer.staging import check_destination, publish_new, written_whole

from .errors import CommandError
from .eval_costs import add_cost_options, cost_columns, cost_questions, cost_report, measured_costs
from .eval_prompting import add_prompting_options, prompting_scores, prompting_table, prompting_texts
from .eval_scores import LEGEND, SCORE_NAMES, BehaviorScores, behavior_scores, keyed

METRICS = ("ab", "preference")


def add_measure_commands(commands: Any) -> None:
    """Register ``peft-steer eval`` and ``peft-steer generate`` on the CLI's sub-command parsers."""
    evaluate = commands.add_parser(
        "eval",
        help="Score a steering adapter at several strengths (A/B score or answer preference) on held-out data.",
        description="Prints one score per multiplier, with readings of the same margins that do not saturate and "
        "the costs of each strength; --json writes {metric, scores: {multiplier: score}, ...}.",
    )
    add_eval_options(evaluate, "-1,0,1")
    evaluate.set_defaults(run=run_eval)

    generate = commands.add_parser(
        "generate",
        help="Generate steered answers at several strengths, written to a JSONL file as they come.",
        description="One record per prompt and multiplier; a rerun with the same --out skips what is done.",
    )
    _add_model_options(generate)
    source = _add_source_options(generate, "questions (a question column)", data=False)
    source.add_argument("--prompt", nargs="+", default=None, help="One or more questions to ask.")
    generate.add_argument("--multipliers", default="-2,0,2", help="Comma-separated strengths (default -2,0,2).")
    generate.add_argument("--max-new-tokens", type=int, default=64, help="Tokens to generate per answer (default 64).")
    generate.add_argument("--batch-size", type=int, default=8, help="Prompts per generate call (default 8).")
    generate.add_argument("--out", required=True, help="The JSONL file to write; an existing one is resumed.")
    generate.set_defaults(run=run_generate)


def add_eval_options(parser: argparse.ArgumentParser, multipliers: str, costs_optional: bool = True) -> None:
    """The options of ``eval`` (and of ``sweep``, which measures the same at more strengths): the model, the data,
    the metric, the strengths (default ``multipliers``), the JSON file, the prompting baseline and the costs."""
    _add_model_options(parser)
    _add_source_options(parser, "A/B questions (question, A, B, matching) for --metric ab; pairs otherwise")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="ab",
        help="ab: p(matching letter) / (p(A) + p(B)) on A/B questions (the paper's and CAA's score; a behavior's "
        "test_infer split); preference: sigmoid(log p(matching) - log p(not matching)) of whole answers (its test "
        "split).",
    )
    parser.add_argument(
        "--multipliers", default=multipliers, help=f"Comma-separated strengths (default {multipliers})."
    )
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per forward pass (default 8).")
    parser.add_argument("--json", default=None, help="Also write the scores to this JSON file (must not exist).")
    add_prompting_options(parser)
    add_cost_options(parser, costs_optional)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--adapter", required=True, help="The steering adapter folder (save_pretrained output).")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="System message of the chat format.")
    prompt.add_argument("--no-system-prompt", action="store_true", help="No system message.")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="Plain 'Question: ...\\nAnswer:' format (base models)."
    )


def _add_source_options(parser: argparse.ArgumentParser, data_help: str, data: bool = True) -> Any:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--behavior", choices=BEHAVIORS, help="One of the shipped behaviors (its held-out split).")
    if data:
        source.add_argument("--data", help=f"A data file or folder of {data_help}.")
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N rows / questions.")
    return source


def parse_multipliers(text: str) -> list[float]:
    """``"-1,0,1"`` -> ``[-1.0, 0.0, 1.0]``; anything else is a CommandError naming --multipliers."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise CommandError(f"--multipliers {text!r}: expected comma-separated numbers, e.g. -1,0,1.") from None
    if not values or any(value != value or abs(value) > FLOAT32_MAX for value in values):
        # checked before any work: a strength beyond float32's range makes the steered activations inf
        raise CommandError(
            f"--multipliers {text[:80]!r}: expected comma-separated finite numbers within float32's range (the "
            "vectors' dtype), e.g. -1,0,1."
        )
    return values


def _once(given: list, distinct: list, option: str, what: str) -> list:
    """``distinct``, having said on stderr how many of the ``given`` values of ``option`` were repeats (once every
    check has passed: an error stays one line)."""
    if len(distinct) < len(given):
        repeats = len(given) - len(distinct)
        print(f"{option}: {repeats} repeated {what}{'s' if repeats > 1 else ''} dropped", file=sys.stderr)
    return distinct


def _limited(rows: list, limit: int | None, what: str, quiet: bool = False) -> list:
    if limit is not None and limit < 1:
        raise CommandError(f"--limit {limit}: must be at least 1.")
    if limit is not None and limit < len(rows):
        if not quiet:
            print(f"using the first {limit} of {len(rows)} {what} (--limit)", file=sys.stderr)
        return rows[:limit]
    return rows


def format_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chat-format keywords of `PairFormatter` / `load_preference_data` that the options ask for."""
    system = None if args.no_system_prompt else args.system_prompt
    return {"system_prompt": system, "chat_template": False if args.no_chat_template else None}


def _check_destination(option: str, path: str, new: bool = False) -> None:
    """The output file checked before any work (`check_destination`): a failure after the run would lose it."""
    try:
        check_destination(path, new=new)
    except OSError as error:
        raise CommandError(f"{option} {error}") from None


def _check_adapter(args: argparse.Namespace) -> tuple[SteeringConfig, dict[int, torch.Tensor]]:
    """The adapter folder checked by the reader every command shares (its errors name the file to fix), and against
    --model's config: before any model is loaded."""
    return read_adapter_for(args.adapter, args.model)


def _model_identity(model: str) -> str:
    """--model as records name it: a local path made absolute (the same folder from anywhere), a hub id as given."""
    return os.path.abspath(model) if os.path.exists(model) else portable_name(model)


def load_steered(args: argparse.Namespace) -> PeftModel:
    """The base model with the adapter: the slow step, once everything else is checked."""
    return PeftModel.from_pretrained(load_model(args.model), args.adapter).eval()


def _ab_rows(args: argparse.Namespace, quiet: bool = False) -> list[dict[str, str]]:
    records = [] if args.behavior else read_source(args.data)
    rows = read_behavior_rows(args.behavior, "test_infer") if args.behavior else [row.values for row in records]
    try:
        matching_letters(rows, f"--metric ab on {args.data or args.behavior}")  # the columns and letters of every row
    except ValueError as error:
        raise CommandError(str(error)) from None
    for record in records:  # the cell check of every metric: not "(B) None" or a list scored as its repr
        for column in ("question", "A", "B"):
            text_cell(record, column, allow_empty=column == "question")
    return _limited(rows, args.limit, "questions", quiet)


def _text_pairs(pairs: Any, source: str) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) of each pair; the formats --metric preference cannot score are named."""
    columns = ("prompt", "chosen", "rejected")
    found = None
    if "prompt" not in pairs.column_names:
        found = "TRL's implicit-prompt format (chosen / rejected, no prompt column)"
    elif not all(isinstance(cell, str) for column in columns for cell in pairs[column]):
        found = "conversational (lists of messages)"
    if found is not None:
        raise CommandError(
            f"--metric preference on {source}: the data is {found}; the metric takes question / matching / "
            "not_matching (BiPO's format) or prompt / chosen / rejected as text (TRL's standard format)."
        )
    return list(zip(*(pairs[column] for column in columns)))


def check_new_file(option: str, path: str | None) -> None:
    """Refuse, before any work, an output file that exists (nothing is overwritten) or that cannot be made there
    (`check_destination`: a missing folder, a dangling link); a failure after the run would lose it."""
    if path:
        _check_destination(option, path, new=True)


@dataclass
class EvalInputs:
    """What ``eval`` and ``sweep`` measure on, checked before the model is loaded.

    Attributes:
        multipliers: The strengths asked for.
        cost_questions: The neutral questions of the costs (none with --no-costs).
        prompts: The prompting baseline's pair of system prompts (None: no baseline).
        tokenizer: The model's tokenizer.
        rows: The rows scored; ``format_ab`` the A/B prompt of a row (None for answer preference).
        prompted: ``{system prompt: (rows, format_ab)}`` of the prompting baseline.
    """

    multipliers: list[float]
    cost_questions: list[str]
    prompts: dict[str, str] | None
    tokenizer: Any
    rows: list
    format_ab: Any
    prompted: dict[str, tuple[list, Any]]


def prepared_eval(args: argparse.Namespace) -> EvalInputs:
    """Check eval's options, the adapter folder and the data, and read the tokenizer and the rows: everything but
    the slow model load, so that bad input stops the command before any model work."""
    multipliers = parse_multipliers(args.multipliers)
    if args.batch_size < 1:
        raise CommandError(f"--batch-size {args.batch_size}: must be at least 1.")
    if args.data and not os.path.exists(args.data):
        raise CommandError(f"--data {args.data}: no such file or folder.")
    questions = cost_questions(args)
    _check_adapter(args)
    multipliers = _once(multipliers, distinct_strengths(multipliers), "--multipliers", "value")
    try:
        prompts = prompting_texts(args)
        tokenizer = load_tokenizer(args.model)
        rows, format_ab = _eval_rows(args, tokenizer)
        prompted = {text: _eval_rows(args, tokenizer, text) for text in (prompts or {}).values()}  # checked now
    except DataError as error:
        raise CommandError(str(error)) from None
    return EvalInputs(multipliers, questions, prompts, tokenizer, rows, format_ab, prompted)


@dataclass
class EvalMeasures:
    """What ``eval`` measured on the adapter: the behavior scores, the prompting baseline (None: none), the costs
    (``{m: Cost}``, empty with --no-costs) and the warnings about the scores."""

    scores: BehaviorScores
    baseline: dict[str, dict[str, float]] | None
    costs: dict[float, Cost]
    warnings: list[str]


def measured_eval(args: argparse.Namespace, inputs: EvalInputs, model: Any) -> EvalMeasures:
    """The scores at each multiplier, the prompting baseline and the costs, of the model's active adapter."""
    tokenizer = inputs.tokenizer
    measured = behavior_scores(
        model, tokenizer, args.metric, inputs.rows, inputs.multipliers, inputs.format_ab, args.batch_size
    )
    baseline = (
        prompting_scores(model, tokenizer, args.metric, inputs.prompts, inputs.prompted.get, measured, args.batch_size)
        if inputs.prompts
        else None
    )
    format_prompt = PairFormatter(tokenizer, **format_options(args)).prompt
    costs = measured_costs(args, model, tokenizer, inputs.cost_questions, inputs.multipliers, format_prompt)
    return EvalMeasures(measured, baseline, costs, [line for line in [measured.warning()] if line])


def eval_report(args: argparse.Namespace, inputs: EvalInputs, found: EvalMeasures) -> dict[str, Any]:
    """What ``eval --json`` writes (and ``sweep --json`` starts from)."""
    columns, baseline = found.scores.columns(), found.baseline
    return {
        "metric": args.metric,
        "scores": keyed(columns[SCORE_NAMES[args.metric]]),
        "mean_margins": keyed(columns["mean margin"]),
        "token_margins": keyed(columns["margin/token"]) if "margin/token" in columns else None,
        "shares_up": keyed(columns["share up"]),
        "unsteered_score": found.scores.unsteered,
        "prompting": None if baseline is None else {side: baseline[side]["score"] for side in baseline},
        "prompting_shares_up": None if baseline is None else {side: baseline[side]["share_up"] for side in baseline},
        "prompting_system_prompts": inputs.prompts,
        "warnings": found.warnings,
        "n": len(inputs.rows),
        "model": args.model,
        "adapter": os.path.abspath(args.adapter),
        "source": args.behavior or args.data,
    } | cost_report(found.costs, len(inputs.cost_questions), args.cost_max_new_tokens)


def run_eval(args: argparse.Namespace) -> None:
    """Score the adapter at each multiplier and print (and with --json, write) the scores."""
    check_new_file("--json", args.json)
    inputs = prepared_eval(args)
    model = load_steered(args)
    found = measured_eval(args, inputs, model)
    print(score_table(found.scores.columns() | cost_columns(found.costs), signed={"mean margin", "margin/token"}))
    print(LEGEND)
    if found.baseline:
        print(prompting_table(args.metric, found.baseline))
    for warning in found.warnings:
        print(warning, file=sys.stderr)
    if args.json:
        write_new_file(args.json, json.dumps(eval_report(args, inputs, found), indent=2) + "\n")
        print(f"wrote {args.json}")


def _eval_rows(args: argparse.Namespace, tokenizer: Any, instruction: str | None = None) -> tuple[list, Any]:
    """The rows eval scores and, for the A/B score, the prompt format of a row (None for answer preference, whose
    rows are formatted (prompt, chosen, rejected) triples). ``instruction`` replaces the system prompt (the prompting
    baseline); without a chat template it goes on its own line before the prompt."""
    options = format_options(args)
    plain = not PairFormatter(tokenizer, **options).use_template
    if instruction is not None:
        options["system_prompt"] = instruction
    prefix = f"{instruction}\n" if instruction is not None and plain else ""
    quiet = instruction is not None  # the --limit note is printed once, for the steered rows
    if args.metric == "ab":
        row_prompt = plain_ab_prompt if plain else chat_ab_prompt(tokenizer, options["system_prompt"])
        return _ab_rows(args, quiet), lambda row: prefix + row_prompt(row)
    pairs = (
        load_behavior(args.behavior, "test", tokenizer, **options)
        if args.behavior
        else load_preference_data(args.data, tokenizer, **options)
    )
    rows = [(prefix + prompt, *answers) for prompt, *answers in _text_pairs(pairs, args.data or args.behavior)]
    return _limited(rows, args.limit, "pairs", quiet), None


def write_new_file(path: str, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all; never overwrites (FileExistsError when ``path`` appeared
    meanwhile)."""
    with written_whole(path, publish=publish_new) as staging, open(staging, "w", encoding="utf-8") as file:
        file.write(text)


def run_generate(args: argparse.Namespace) -> None:
    """Generate at each multiplier, append records to --out, and print the answers side by side."""
    multipliers = parse_multipliers(args.multipliers)
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise CommandError("--max-new-tokens and --batch-size must be at least 1.")
    _check_destination("--out", args.out)
    if args.prompt is not None:
        questions = args.prompt
        if not all(question.strip() for question in questions):
            raise CommandError("--prompt: empty prompt text.")
    else:
        questions = list(dict.fromkeys(row["question"] for row in read_behavior_rows(args.behavior, "test")))
    questions = _limited(questions, args.limit, "questions")
    config, vectors = _check_adapter(args)
    # what made the records, stored with them: a rerun with other settings is refused, not given the old answers
    settings = {"model": _model_identity(args.model), "adapter": adapter_digest(config, vectors)}
    settings["format"] = format_options(args)
    try:
        check_resumable(args.out, args.max_new_tokens, settings)  # before the model loads
    except ValueError as error:
        raise CommandError(str(error)) from None
    questions = _once(questions, list(dict.fromkeys(questions)), "--prompt", "prompt")
    multipliers = _once(multipliers, distinct_strengths(multipliers), "--multipliers", "value")
    tokenizer = load_tokenizer(args.model)
    model = load_steered(args)
    formatter = PairFormatter(tokenizer, **format_options(args))
    try:
        records = generate_sweep(
            model,
            tokenizer,
            questions,
            multipliers,
            args.out,
            format_prompt=formatter.prompt,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            settings=settings,
        )
    except ValueError as error:
        raise CommandError(str(error)) from None
    print(side_by_side(records, multipliers))
    print(f"wrote {len(records)} records to {args.out}")
