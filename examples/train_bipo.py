"""Train a BiPO steering vector on one of the paper's behaviors with the Python API, then measure it.

    python examples/train_bipo.py --model meta-llama/Llama-2-7b-chat-hf --behavior power-seeking
    python examples/train_bipo.py --model mistralai/Mistral-7B-Instruct-v0.2 --behavior wealth-seeking
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_bipo.py --model ... --batch-size 2
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/train_bipo.py --model ... --batch-size 2
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/train_bipo.py --model ... --batch-size 2
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/train_bipo.py --cpu --model ...  # CPUs

Defaults are the paper's: block 15 for Llama-2-7b-chat and 13 for Mistral-7B-Instruct-v0.2, a cosine schedule
over 100 epochs with 100 warm-up steps stopped at epoch 20 (Llama-2; 10 for jailbreak) or 5 (Mistral), as the
official runs take their vectors, beta 0.1, AdamW lr 5e-4, weight decay 0.05, batch 4, fp32. After training, the
answer preference on the behavior's test split (mean of sigmoid(log p(matching) - log p(not_matching))) is printed
at multipliers -1, 0 and +1.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from peft_steer import SteeringConfig
from peft_steer.data import BEHAVIORS, PairFormatter, load_behavior, read_behavior_rows
from peft_steer.evaluate import answer_preference
from trl_integration import SteerConfig, SteerTrainer
from trl_integration.config import DEFAULT_EPOCHS, paper_preset


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hub id or local folder of the chat model.")
    parser.add_argument("--behavior", choices=BEHAVIORS, default="power-seeking")
    parser.add_argument("--layer", type=int, help="Block to steer (default: the paper's for the model).")
    parser.add_argument("--epochs", type=float, help="Epochs (default: the paper's for the model).")
    parser.add_argument("--max-steps", type=int, default=-1, help="Stop early, e.g. for a smoke test.")
    parser.add_argument("--batch-size", type=int, default=4, help="Pairs per device (paper: 4 in all).")
    parser.add_argument("--output-dir", help="Default: bipo-<behavior>-L<layer>.")
    parser.add_argument("--load-in-4bit", action="store_true", help="QLoRA-style 4-bit base (bitsandbytes).")
    parser.add_argument("--bf16", action="store_true", help="Load the model in bf16 (the vector stays fp32).")
    parser.add_argument("--eval-pairs", type=int, default=50, help="Test pairs to score after training (0: none).")
    parser.add_argument(
        "--cpu", action="store_true", help="Train on CPUs, also as several processes under accelerate launch (gloo)."
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    preset = paper_preset(args.model, args.behavior) or {}
    layer = args.layer if args.layer is not None else preset.get("layer")
    if layer is None:
        raise SystemExit(
            f"--layer is required for {args.model} (the paper's blocks are known for Llama-2 and Mistral)."
        )
    epochs = args.epochs if args.epochs is not None else preset.get("epochs", DEFAULT_EPOCHS)
    output_dir = args.output_dir or f"bipo-{args.behavior}-L{layer}"

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # question / matching / not_matching rows in the model's chat template, with the paper's system prompt.
    train = load_behavior(args.behavior, "train", tokenizer)

    # The training arguments come before the model: under DeepSpeed ZeRO-3 they make from_pretrained load each
    # rank's partition of the weights only (zero3_init_flag), instead of the whole model on every rank.
    config = SteerConfig(
        output_dir=output_dir,
        num_train_epochs=epochs,
        # the paper's schedule length, when the run stops inside it (as the official runs take their vectors)
        schedule_epochs=preset["schedule_epochs"] if preset.get("schedule_epochs", 0) >= epochs else None,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        report_to="none",
        use_cpu=args.cpu,
    )
    load_kwargs = {"dtype": torch.bfloat16 if args.bf16 else torch.float32}
    if args.load_in_4bit:
        load_kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16
        )
    model = AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)

    trainer = SteerTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[layer]),  # a zero vector at the output of block `layer`
    )
    trainer.train()
    trainer.save_model(output_dir)  # a PEFT adapter folder; per-epoch vectors are in output_dir/vectors/

    # Under FSDP / ZeRO-3 each rank holds a shard of the weights, so every rank runs the evaluation's forwards.
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if args.eval_pairs and (sharded or trainer.accelerator.is_main_process):
        rows = read_behavior_rows(args.behavior, "test")[: args.eval_pairs]
        scores = answer_preference(
            trainer.model, tokenizer, rows, format_prompt=PairFormatter(tokenizer).prompt, multipliers=[-1.0, 0.0, 1.0]
        )
        for multiplier, preference in scores.items() if trainer.accelerator.is_main_process else ():
            print(f"multiplier {multiplier:+.0f}: answer preference {preference.score:.3f} "
                  f"(mean log-prob margin {preference.margin:+.2f}) on {preference.n} test pairs")  # fmt: skip
    # Destroys the process group of a multi-process launch; without it Gloo can abort the process at exit.
    trainer.accelerator.end_training()


if __name__ == "__main__":
    main()
