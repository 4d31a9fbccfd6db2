"""Run by test_ddp.py under `accelerate launch --num_processes 2 --cpu`: trains a tiny vector, saves each rank's copy.

Usage: ddp_train.py OUTPUT_DIR PER_DEVICE_BATCH_SIZE [live-reference]

With "live-reference" the reference log-probs are computed inside every step (through the DDP-wrapped model), a
held-out set is evaluated after each epoch, and each epoch's vector is saved.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import peft_steer  # noqa: E402
from peft_steer import SteeringConfig  # noqa: E402
from peft_steer.blocks import find_block_list  # noqa: E402
from tests.conftest import make_model, make_tokenizer  # noqa: E402
from tests.trl_integration.conftest import QUESTIONS, bipo_rows, fast_args  # noqa: E402
from trl_integration import SteerTrainer  # noqa: E402


class Block0Size(TrainerCallback):
    """The elements block 0 holds at each step's end: 0 while blocks 0..L are offloaded."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _, blocks = find_block_list(model.get_base_model())
        self.sizes.append(sum(parameter.numel() for parameter in blocks[0].parameters()))


def main() -> None:
    output_dir, batch_size = sys.argv[1], int(sys.argv[2])
    live = sys.argv[3:] == ["live-reference"]
    extra = dict(precompute_ref_log_probs=False, save_vectors_per_epoch=True, eval_strategy="epoch") if live else {}
    # the shared fast settings; output_dir is the folder the test reads each rank's vector from
    args = fast_args(
        None, output_dir=output_dir, per_device_train_batch_size=batch_size, learning_rate=5e-2, max_steps=4, **extra
    )
    trainer = SteerTrainer(
        model=make_model("llama"),
        args=args,
        train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:8])),
        eval_dataset=Dataset.from_list(bipo_rows(QUESTIONS[8:12])) if live else None,
        processing_class=make_tokenizer(),
        peft_config=SteeringConfig(layers=[1]),
        callbacks=[block0 := Block0Size()],
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    vector = peft_steer.get_vectors(trainer.model)[1].contiguous()
    save_file({"vector": vector}, os.path.join(output_dir, f"rank{rank}.safetensors"))
    directions = [entry["direction"] for entry in trainer.state.log_history if "direction" in entry]
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        evaluations = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
        info = {
            "world_size": trainer.accelerator.num_processes,
            "directions": directions,
            "eval_losses": evaluations,
            "block0_sizes": block0.sizes,
        }
        json.dump(info, file)
    # Gloo's worker threads can abort the process while the interpreter shuts down (SIGABRT, "terminate called without
    # an active exception"; pytorch/pytorch#190489), which fails the launch after everything is written: 1 run in 12
    # on a busy machine even with the process group destroyed (the DDP wrapper may still hold it). Leave at once.
    trainer.accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
