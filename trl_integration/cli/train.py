"""`peft-steer train`: train a BiPO steering vector from the command line, with the paper's settings as defaults.

An option that sets a `SteerConfig` field (or the `SteeringConfig` field ``positions``) takes its type, default,
choices and help from that field; the options listed in ``config_fields`` go to `SteerConfig` as they are.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peft_steer import SteeringConfig
from peft_steer.data import BEHAVIORS, SYSTEM_PROMPT, DataError, load_preference_data

from ..callbacks import NonFiniteVectorError
from ..config import DEFAULT_EPOCHS, PAPER_PRESETS, SteerConfig, paper_preset
from ..trainer import SteerTrainer
from .errors import CommandError
from .options import add_field_option, field_default
from .train_checks import check_numbers, checked_output


def add_train_command(commands: Any) -> None:
    """Register ``peft-steer train`` on the CLI's sub-command parsers."""
    parser = commands.add_parser(
        "train",
        help="Train a BiPO steering vector (paper settings by default) and save it as an adapter folder.",
        description=_description(),
    )
    config_fields: list[str] = []

    def config_option(flag: str, field_name: str, **overrides: Any) -> None:
        add_field_option(parser, flag, SteerConfig, field_name, **overrides)
        config_fields.append(field_name)

    parser.add_argument("--model", required=True, help="Hub id or local folder of the base model.")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--behavior", choices=BEHAVIORS, help="One of the paper's data sets (shipped with peft-steer).")
    data.add_argument(
        "--data",
        metavar="FILE",
        help="A .csv / .json / .jsonl file: question, matching, not_matching columns, or TRL's prompt / chosen / "
        "rejected.",
    )
    parser.add_argument("--layer", type=int, help="Decoder block to steer (default: the paper's for the model).")
    parser.add_argument("--output-dir", help="Where checkpoints, per-epoch vectors and the final adapter go.")
    parser.add_argument("--epochs", type=float, help=f"Epochs (default: the paper's, else {DEFAULT_EPOCHS}).")
    config_option("--max-steps", "max_steps")
    config_option("--learning-rate", "learning_rate")
    config_option("--beta", "beta")
    config_option("--batch-size", "per_device_train_batch_size")
    config_option("--gradient-accumulation-steps", "gradient_accumulation_steps")
    config_option("--warmup-steps", "warmup_steps")
    config_option("--weight-decay", "weight_decay")
    config_option("--direction-sampling", "direction_sampling")
    add_field_option(parser, "--positions", SteeringConfig, "positions")
    config_option("--max-length", "max_length")
    _add_format_and_model_options(parser)
    config_option("--bf16", "bf16", action="store_true")  # unset: follows the accelerate launch config
    config_option("--gradient-checkpointing", "activation_checkpointing", action="store_true", default=False)
    config_option(
        "--no-precompute-ref-log-probs",
        "precompute_ref_log_probs",
        action="store_false",
        help="Run the reference forward at every step instead of once per example up front.",
    )
    config_option("--prefix-cache", "prefix_cache")
    config_option("--offload-prefix-blocks", "offload_prefix_blocks")
    config_option("--seed", "seed")
    # Whole steps only here: the fields also take a fraction of all steps.
    config_option("--save-steps", "save_steps", type=int, help="Steps between resumable checkpoints.")
    config_option("--logging-steps", "logging_steps", type=int, help="Steps between log lines.")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="Resume from CHECKPOINT, or from the last checkpoint in --output-dir when given alone.",
    )
    add_field_option(parser, "--trust-remote-code", SteerConfig, "trust_remote_code", action="store_true")
    parser.set_defaults(run=run_train, config_fields=tuple(config_fields))


def _add_format_and_model_options(parser: argparse.ArgumentParser) -> None:
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="System message of the chat format.")
    prompt.add_argument("--no-system-prompt", action="store_true", help="No system message.")
    parser.add_argument(
        "--no-chat-template", action="store_true", help="Plain 'Question: ...\\nAnswer:' format (base models)."
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "auto"),
        default="float32",
        help="Dtype to load the model in (paper: float32). The vector stays float32 in any case.",
    )
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument("--load-in-4bit", action="store_true", help="Load the model 4-bit (bitsandbytes).")
    quantize.add_argument("--load-in-8bit", action="store_true", help="Load the model 8-bit (bitsandbytes).")


def _description() -> str:
    """The paper's settings, as `SteerConfig`'s defaults and `PAPER_PRESETS` hold them."""

    def default(name: str) -> Any:
        return field_default(SteerConfig, name)

    presets = ", ".join(f"block {p['layer']} and {p['epochs']} epochs for {name}" for name, p in PAPER_PRESETS.items())
    return (
        f"Train a steering vector with BiPO. Defaults are the paper's: beta {default('beta'):g}, AdamW lr "
        f"{default('learning_rate'):g}, weight decay {default('weight_decay'):g}, {default('lr_scheduler_type')} "
        f"schedule with {default('warmup_steps'):g} warm-up steps, batch {default('per_device_train_batch_size')}, "
        f"fp32; {presets}."
    )


def run_train(args: argparse.Namespace) -> None:
    """Check everything, then train; nothing is written to the output folder before the checks pass."""
    check_numbers(args)
    if args.data is not None and os.path.isdir(args.data):
        raise CommandError(f"--data {args.data} is a folder, not a file: give a .csv, .json or .jsonl file.")
    if args.data is not None and not os.path.isfile(args.data):
        raise CommandError(f"--data {args.data}: no such file.")
    layer, epochs = _layer_and_epochs(args)
    source = args.behavior or os.path.splitext(os.path.basename(args.data))[0]
    output_dir = args.output_dir or f"bipo-{source}-L{layer}"
    _check_layer(args, layer)
    resume = checked_output(output_dir, args.resume)

    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        dataset = load_preference_data(
            args.data or args.behavior,
            tokenizer,
            system_prompt=None if args.no_system_prompt else args.system_prompt,
            chat_template=False if args.no_chat_template else None,
        )
        config = SteerConfig(
            output_dir=output_dir,
            num_train_epochs=epochs,
            **{name: getattr(args, name) for name in args.config_fields},
            save_strategy="steps",
            report_to="none",
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator (it warns without)
        )
    except DataError as error:
        raise CommandError(str(error)) from None

    model = AutoModelForCausalLM.from_pretrained(args.model, **_load_kwargs(args))
    with _no_empty_folder_left(output_dir):
        trainer = SteerTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[layer], positions=args.positions),
        )
        try:
            trainer.train(resume_from_checkpoint=resume)
        except NonFiniteVectorError as error:
            raise CommandError(str(error)) from None
        trainer.save_model(output_dir)
    # Destroys the process group of a multi-process launch; without it Gloo can abort the process at exit.
    trainer.accelerator.end_training()
    print(f"Saved the steering adapter (block {layer}) to {os.path.abspath(output_dir)}")
    print(f"One vector per epoch: {os.path.join(os.path.abspath(output_dir), 'vectors')}")


@contextmanager
def _no_empty_folder_left(output_dir: str) -> Iterator[None]:
    """The Trainer creates ``output_dir`` when it is built: a run that fails before writing into it removes it."""
    existed = os.path.exists(output_dir)
    try:
        yield
    except BaseException:
        if not existed and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)
        raise


def _layer_and_epochs(args: argparse.Namespace) -> tuple[int, float]:
    """The block and epochs given, or the paper's for the model."""
    preset = paper_preset(args.model) or {}
    layer = args.layer if args.layer is not None else preset.get("layer")
    if layer is None:
        known = " and ".join(f"{name} ({p['layer']})" for name, p in PAPER_PRESETS.items())
        raise CommandError(f"--layer is required for {args.model}: the paper's blocks are known only for {known}.")
    epochs = args.epochs if args.epochs is not None else preset.get("epochs", DEFAULT_EPOCHS)
    return layer, epochs


def _check_layer(args: argparse.Namespace, layer: int) -> None:
    model_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    blocks = getattr(model_config.get_text_config(), "num_hidden_layers", None)
    if blocks is not None and not -blocks <= layer < blocks:
        raise CommandError(f"--layer {layer}: {args.model} has {blocks} decoder blocks (0..{blocks - 1}).")


def _load_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`from_pretrained` keywords for ``--dtype`` and ``--load-in-4bit`` / ``--load-in-8bit``."""
    load_kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    load_kwargs["dtype"] = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.load_in_4bit or args.load_in_8bit:
        compute = torch.bfloat16 if args.dtype in ("bfloat16", "auto") else getattr(torch, args.dtype)
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, bnb_4bit_compute_dtype=compute
        )
    return load_kwargs
