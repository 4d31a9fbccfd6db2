"""`peft-steer train`: train a BiPO steering vector from the command line, with the paper's settings as defaults.

As in TRL's command lines (``trl dpo``), every `SteerConfig` field is an option under its own name
(``--learning_rate`` or ``--learning-rate``), and so are the `SteeringConfig` fields in ``STEERING_FIELDS``, each
with its type, default, choices and help from the field (`options.add_dataclass_options`); ``--config run.yaml``
gives any option by its name, and the command line overrides the file (`options.ConfigFile`). The first flags of this
command (``--epochs``, ``--batch-size``, ``--layer``, ...) stay beside the field names.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import BitsAndBytesConfig

from peft_steer import SteeringConfig
from peft_steer.data import BEHAVIORS, SYSTEM_PROMPT, DataError, load_preference_data
from peft_steer.data.files import is_hub_id
from peft_steer.models import MODEL_HELP, load_config, load_model, load_tokenizer

from ..callbacks import NonFiniteVectorError
from ..config import DEFAULT_EPOCHS, PAPER_PRESETS, SteerConfig, paper_preset
from ..outputs import failed_write
from ..trainer import SteerTrainer
from .errors import CommandError
from .options import ConfigFile, add_dataclass_options, field_default
from .train_checks import check_numbers, checked_output

STEERING_FIELDS = ("layers", "positions", "init", "blocks_path")
# Short flags the docs and scripts use, accepted beside the flags named for the fields they set.
ALIASES = {
    "num_train_epochs": ("--epochs",),
    "per_device_train_batch_size": ("--batch-size",),
    "activation_checkpointing": ("--gradient-checkpointing",),
}
# Where this command's default differs from the field's.
OVERRIDES = {
    "num_train_epochs": {
        "default": None,
        "help": f"Epochs (default: the paper's for the model, else {DEFAULT_EPOCHS})",
    },
    "schedule_epochs": {
        "help": "Length of the learning-rate schedule in epochs; training stops at --epochs (default: the paper's "
        "100-epoch schedule for its models when --epochs fits in it, else the schedule ends with the training)"
    },
    "output_dir": {"help": "Where checkpoints, per-epoch vectors and the final adapter go (default: bipo-SOURCE-LN)"},
    # Pinning needs an accelerator (it warns without one).
    "dataloader_pin_memory": {"default": torch.cuda.is_available()},
}
# Options of which one is given: one on the command line replaces the file's.
EXCLUSIVE = (("behavior", "data"), ("layer", "layers"), ("system_prompt", "no_system_prompt"))
EXCLUSIVE += (("load_in_4bit", "load_in_8bit"),)


def add_train_command(commands: Any) -> None:
    """Register ``peft-steer train`` on the CLI's sub-command parsers."""
    parser = commands.add_parser(
        "train",
        help="Train a BiPO steering vector (paper settings by default) and save it as an adapter folder.",
        description=_description(),
        usage="peft-steer train [--config YAML] --model ID (--behavior B | --data PATH) [--layer N] [OPTIONS]",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="A YAML file of options by their names (learning_rate: 1.0e-4, layers: [14], model: ..., data: ...; "
        "env: a mapping of environment variables); the options given on the command line override it.",
    )
    parser.add_argument("--model", "--model_name_or_path", dest="model", help=MODEL_HELP)
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--behavior", choices=BEHAVIORS, help="One of the paper's data sets (shipped with peft-steer).")
    data.add_argument(
        "--data",
        "--dataset_name",
        dest="data",
        metavar="PATH",
        help="A .csv / .json / .jsonl / .parquet / .arrow file, a folder of such files (one type) or one written by "
        "save_to_disk, or a Hub data set id (its train split): question, matching, not_matching columns, or TRL's "
        "prompt / chosen / rejected.",
    )
    steering = parser.add_argument_group("the steering adapter (SteeringConfig)")
    layer = steering.add_mutually_exclusive_group()
    layer.add_argument("--layer", type=int, help="Decoder block to steer (default: the paper's for the model).")
    add_dataclass_options(
        layer, SteeringConfig, only=("layers",), overrides={"layers": {"default": None, "metavar": "N"}}
    )
    add_dataclass_options(steering, SteeringConfig, only=[name for name in STEERING_FIELDS if name != "layers"])
    _add_format_and_model_options(parser)
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="Train on the first N pairs only.")
    parser.add_argument(
        "--resume",
        "--resume_from_checkpoint",
        dest="resume_from_checkpoint",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="Resume from CHECKPOINT, or from the last checkpoint in --output-dir when given alone.",
    )
    training = parser.add_argument_group("training (SteerConfig: BiPO's options and every DPOConfig option)")
    config_fields = add_dataclass_options(
        training, SteerConfig, skip=("resume_from_checkpoint",), aliases=ALIASES, overrides=OVERRIDES
    )
    parser.set_defaults(run=run_train, config_fields=tuple(config_fields), config_file=ConfigFile(parser, EXCLUSIVE))


def _add_format_and_model_options(parser: argparse.ArgumentParser) -> None:
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--system-prompt", "--system_prompt", default=SYSTEM_PROMPT, help="System message of the chat format."
    )
    prompt.add_argument("--no-system-prompt", "--no_system_prompt", action="store_true", help="No system message.")
    parser.add_argument(
        "--no-chat-template",
        "--no_chat_template",
        action="store_true",
        help="Plain 'Question: ...\\nAnswer:' format (base models).",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16", "auto"),
        default="float32",
        help="Dtype to load the model in (paper: float32). The vector stays float32 in any case.",
    )
    quantize = parser.add_mutually_exclusive_group()
    quantize.add_argument(
        "--load-in-4bit", "--load_in_4bit", action="store_true", help="Load the model 4-bit (bitsandbytes)."
    )
    quantize.add_argument(
        "--load-in-8bit", "--load_in_8bit", action="store_true", help="Load the model 8-bit (bitsandbytes)."
    )


def _description() -> str:
    """The paper's settings, as `SteerConfig`'s defaults and `PAPER_PRESETS` hold them."""

    def default(name: str) -> Any:
        return field_default(SteerConfig, name)

    presets = ", ".join(
        f"block {p['layer']} and the vector of epoch {p['epochs']}"
        + "".join(f" ({behavior}: {epochs})" for behavior, epochs in p.get("behavior_epochs", {}).items())
        + f" of a {p['schedule_epochs']}-epoch schedule for {name}"
        for name, p in PAPER_PRESETS.items()
    )
    return (
        f"Train a steering vector with BiPO. Defaults are the paper's: beta {default('beta'):g}, AdamW lr "
        f"{default('learning_rate'):g}, weight decay {default('weight_decay'):g}, {default('lr_scheduler_type')} "
        f"schedule with {default('warmup_steps'):g} warm-up steps, batch {default('per_device_train_batch_size')}, "
        f"fp32; {presets}."
    )


def run_train(args: argparse.Namespace) -> None:
    """Check everything, then train; nothing is written to the output folder before the checks pass."""
    args.config_file.apply(args, args.config)
    if args.model is None:
        raise CommandError("--model is required (on the command line, or model: in the --config file).")
    if args.behavior is None and args.data is None:
        raise CommandError("--behavior or --data is required (on the command line, or in the --config file).")
    check_numbers(args)
    if args.data is not None and not os.path.exists(args.data) and not is_hub_id(args.data):
        raise CommandError(f"--data {args.data}: no such file.")
    layers, epochs, schedule_epochs = _layers_and_epochs(args)
    source = args.behavior or os.path.splitext(os.path.basename(args.data.rstrip("/\\")))[0]
    output_dir = args.output_dir or f"bipo-{source}-L{'-'.join(str(layer) for layer in layers)}"
    _check_layers(args, layers)
    resume = checked_output(output_dir, args.resume_from_checkpoint or None)

    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    try:
        dataset = load_preference_data(
            args.data or args.behavior,
            tokenizer,
            system_prompt=None if args.no_system_prompt else args.system_prompt,
            chat_template=False if args.no_chat_template else None,
        )
        if args.limit is not None and args.limit < len(dataset):
            print(f"Training on the first {args.limit} of {len(dataset)} pairs (--limit).")
            dataset = dataset.select(range(args.limit))
        fields = {name: getattr(args, name) for name in args.config_fields}
        fields.update(output_dir=output_dir, num_train_epochs=epochs, resume_from_checkpoint=resume)
        fields.update(schedule_epochs=schedule_epochs)
        config = SteerConfig(**fields)
    except DataError as error:
        raise CommandError(str(error)) from None
    steering = {name: getattr(args, name) for name in STEERING_FIELDS if name != "layers"}

    model = load_model(args.model, **_load_kwargs(args))
    with _no_empty_folder_left(output_dir):
        trainer = SteerTrainer(
            model=model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=layers, **steering),
        )
        try:
            trainer.train(resume_from_checkpoint=resume)
        except NonFiniteVectorError as error:
            raise CommandError(str(error)) from None
        except Exception as error:
            if not failed_write(error):
                raise
            first = " ".join(str(error).split())[:200]
            raise CommandError(
                f"writing a checkpoint to {output_dir} failed ({first}): is the disk full? Free space, then rerun with "
                "--resume: it goes on from the last complete checkpoint."
            ) from None
        _save_final(trainer, output_dir)
    blocks = f"block {layers[0]}" if len(layers) == 1 else f"blocks {', '.join(map(str, layers))}"
    print(f"Saved the steering adapter ({blocks}) to {os.path.abspath(output_dir)}")
    if config.save_vectors_per_epoch:
        print(f"One vector per epoch: {os.path.join(os.path.abspath(output_dir), 'vectors')}")
    if config.push_to_hub:
        trainer.push_to_hub(commit_message="End of training")
        print(f"Pushed the adapter to https://huggingface.co/{trainer.hub_model_id}")
    # Destroys the process group of a multi-process launch; without it Gloo can abort the process at exit.
    trainer.accelerator.end_training()


def _save_final(trainer: SteerTrainer, output_dir: str) -> None:
    """The final adapter, written whole (`SteerTrainer.save_model`) before any push: Trainer's `save_model` pushes from
    inside the save, before the staged adapter is in place, and a failed upload would discard it."""
    push = trainer.args.push_to_hub
    trainer.args.push_to_hub = False
    try:
        trainer.save_model(output_dir)
    finally:
        trainer.args.push_to_hub = push


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


def _layers_and_epochs(args: argparse.Namespace) -> tuple[list[int], float, float | None]:
    """The blocks, epochs and schedule length given, or the paper's for the model (and behavior)."""
    preset = paper_preset(args.model, args.behavior) or {}
    layers = args.layers or ([args.layer] if args.layer is not None else None)
    if layers is None and "layer" in preset:
        layers = [preset["layer"]]
    if layers is None:
        known = " and ".join(f"{name} ({p['layer']})" for name, p in PAPER_PRESETS.items())
        raise CommandError(f"--layer is required for {args.model}: the paper's blocks are known only for {known}.")
    epochs = args.num_train_epochs if args.num_train_epochs is not None else preset.get("epochs", DEFAULT_EPOCHS)
    schedule_epochs = args.schedule_epochs
    if schedule_epochs is None and preset.get("schedule_epochs", 0) >= epochs:
        schedule_epochs = preset["schedule_epochs"]  # the paper's schedule, stopped at `epochs`
    return layers, epochs, schedule_epochs


def _check_layers(args: argparse.Namespace, layers: list[int]) -> None:
    model_config = load_config(args.model, trust_remote_code=args.trust_remote_code)
    blocks = getattr(model_config.get_text_config(), "num_hidden_layers", None)
    flag = "--layers" if args.layers else "--layer"
    for layer in layers:
        if blocks is not None and not -blocks <= layer < blocks:
            raise CommandError(f"{flag} {layer}: {args.model} has {blocks} decoder blocks (0..{blocks - 1}).")


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
