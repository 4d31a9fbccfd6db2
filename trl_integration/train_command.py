"""`peft-steer train`: train a BiPO steering vector from the command line, with the paper's settings as defaults."""

from __future__ import annotations

import argparse
import glob
import os
from typing import Any

from peft_steer.data import BEHAVIORS, SYSTEM_PROMPT, DataError, load_preference_data

# The paper's runs (Cao et al. 2024, and the official code): block and epochs per model. Matched on the model name.
PAPER_PRESETS = {
    "llama-2-7b-chat": {"layer": 15, "epochs": 20},
    "mistral-7b-instruct-v0.2": {"layer": 13, "epochs": 5},
}
DEFAULT_EPOCHS = 3  # for a model the paper did not use


def paper_preset(model: str) -> dict[str, int] | None:
    """The paper's block and epochs for ``model`` (a hub id or a local folder named after it), or ``None``."""
    name = model.rstrip("/").lower()
    for key, preset in PAPER_PRESETS.items():
        if key in name:
            return dict(preset)
    return None


def add_train_command(subparsers: Any) -> None:
    """Register ``peft-steer train`` on the CLI's sub-command parsers."""
    parser = subparsers.add_parser(
        "train",
        help="Train a BiPO steering vector (paper settings by default) and save it as an adapter folder.",
        description="Train a steering vector with BiPO. Defaults are the paper's: beta 0.1, AdamW lr 5e-4, weight "
        "decay 0.05, cosine schedule with 100 warm-up steps, batch 4, fp32; block 15 and 20 epochs for "
        "Llama-2-7b-chat, block 13 and 5 epochs for Mistral-7B-Instruct-v0.2.",
    )
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
    parser.add_argument("--max-steps", type=int, default=-1, help="Stop after this many steps (overrides --epochs).")
    parser.add_argument("--learning-rate", type=float, default=5e-4, help="AdamW learning rate (paper: 5e-4).")
    parser.add_argument("--beta", type=float, default=0.1, help="BiPO beta (paper: 0.1).")
    parser.add_argument("--batch-size", type=int, default=4, help="Pairs per device and step (paper: 4).")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="Micro-batches per step.")
    parser.add_argument("--warmup-steps", type=float, default=100, help="Warm-up steps (paper: 100).")
    parser.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay (paper: 0.05).")
    parser.add_argument(
        "--direction-sampling",
        choices=("random", "antithetic", "positive"),
        default="random",
        help="random (paper): one direction per step; antithetic: both on every batch; positive: d = +1 only.",
    )
    parser.add_argument("--positions", choices=("all", "completion"), default="all", help="Steered positions.")
    parser.add_argument("--max-length", type=int, default=1024, help="Longer pairs are truncated (prompt kept).")
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
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (mixed precision).")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="Recompute activations (less memory).")
    parser.add_argument(
        "--no-precompute-ref-log-probs",
        dest="precompute_ref_log_probs",
        action="store_false",
        help="Run the reference forward at every step instead of once per example up front.",
    )
    parser.add_argument(
        "--prefix-cache",
        choices=["auto", "device", "cpu", "disk", "off"],
        default="auto",
        help="Cache the output of blocks 0..L once per sequence (default auto: accelerator, host memory or disk).",
    )
    parser.add_argument(
        "--offload-prefix-blocks",
        choices=["auto", "cpu", "disk", "off"],
        default="auto",
        help="While training from a full prefix cache, move blocks 0..L out of the model's device (default auto: "
        "host memory from an accelerator, a temporary file from the CPU).",
    )
    parser.add_argument("--seed", type=int, default=42, help="Seed of data order and directions.")
    parser.add_argument("--save-steps", type=int, default=500, help="Steps between resumable checkpoints.")
    parser.add_argument("--logging-steps", type=int, default=10, help="Steps between log lines.")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="Resume from CHECKPOINT, or from the last checkpoint in --output-dir when given alone.",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the hub.")
    parser.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> None:
    """Check everything, then train; nothing is written to the output folder before the checks pass."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from peft_steer import SteeringConfig

    from .cli import CommandError
    from .config import SteerConfig
    from .trainer import SteerTrainer

    if args.data is not None and not os.path.isfile(args.data):
        raise CommandError(f"--data {args.data}: no such file.")
    preset = paper_preset(args.model)
    layer = args.layer if args.layer is not None else (preset or {}).get("layer")
    if layer is None:
        raise CommandError(
            f"--layer is required for {args.model}: the paper's blocks are known only for Llama-2-7b-chat (15) and "
            "Mistral-7B-Instruct-v0.2 (13)."
        )
    epochs = args.epochs if args.epochs is not None else (preset or {}).get("epochs", DEFAULT_EPOCHS)
    source = args.behavior or os.path.splitext(os.path.basename(args.data))[0]
    output_dir = args.output_dir or f"bipo-{source}-L{layer}"

    model_config = AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    text_config = model_config.get_text_config()
    blocks = getattr(text_config, "num_hidden_layers", None)
    if blocks is not None and not -blocks <= layer < blocks:
        raise CommandError(f"--layer {layer}: {args.model} has {blocks} decoder blocks (0..{blocks - 1}).")

    checkpoints = glob.glob(os.path.join(output_dir, "checkpoint-*"))
    resume = args.resume
    if resume is None and checkpoints:
        raise CommandError(
            f"{output_dir} already holds checkpoints: pass --resume to continue that run, or another --output-dir."
        )
    if resume is True and not checkpoints:
        raise CommandError(f"--resume: {output_dir} holds no checkpoint-* folder to resume from.")
    if isinstance(resume, str) and not os.path.isdir(resume):
        raise CommandError(f"--resume {resume}: no such checkpoint folder.")

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
            max_steps=args.max_steps,
            learning_rate=args.learning_rate,
            beta=args.beta,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay,
            direction_sampling=args.direction_sampling,
            max_length=args.max_length,
            bf16=args.bf16 or None,  # unset: follows the accelerate launch config (fp32 otherwise)
            activation_checkpointing=args.gradient_checkpointing,
            precompute_ref_log_probs=args.precompute_ref_log_probs,
            prefix_cache=args.prefix_cache,
            offload_prefix_blocks=args.offload_prefix_blocks,
            seed=args.seed,
            save_strategy="steps",
            save_steps=args.save_steps,
            logging_steps=args.logging_steps,
            report_to="none",
            dataloader_pin_memory=torch.cuda.is_available(),  # pinning needs an accelerator (it warns without)
        )
    except DataError as error:
        raise CommandError(str(error)) from None

    load_kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    load_kwargs["dtype"] = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.load_in_4bit or args.load_in_8bit:
        compute = torch.bfloat16 if args.dtype in ("bfloat16", "auto") else getattr(torch, args.dtype)
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit, bnb_4bit_compute_dtype=compute
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
    trainer = SteerTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[layer], positions=args.positions),
    )
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(output_dir)
    # Destroys the process group of a multi-process launch; without it Gloo can abort the process at exit.
    trainer.accelerator.end_training()
    print(f"Saved the steering adapter (block {layer}) to {os.path.abspath(output_dir)}")
    print(f"One vector per epoch: {os.path.join(os.path.abspath(output_dir), 'vectors')}")
