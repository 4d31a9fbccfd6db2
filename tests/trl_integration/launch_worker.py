"""Run by test_accelerate_launch.py under `accelerate launch` (DDP, DeepSpeed ZeRO-3 or FSDP2, 2 CPU processes), and
in the test process itself: trains tiny vectors and saves each rank's whole copy of them.

Usage: launch_worker.py JOB [+ JOB ...], each JOB being
       OUTPUT_DIR MODEL_DIR PER_DEVICE_BATCH_SIZE [live-reference] [checkpoints] [resume=DIR] [fsdp-on-cpus]
       [precision=bf16|no]

The jobs run one after another in the same processes (one launch costs about 8 s of start-up here; each job after
the first about 1 s): the launch's accelerate state is set up afresh for each job, the process group is kept.
The model is loaded after the training arguments, as in examples/train_bipo.py: under ZeRO-3 (zero3_init_flag) each
rank then loads its partition of the weights only. Each epoch's vector is saved. With "live-reference" the reference
log-probs are computed inside every step and a held-out set is evaluated after each epoch; "checkpoints" saves one
every 2 steps; "resume=DIR" resumes from the checkpoint folder DIR. "fsdp-on-cpus" makes accelerate start the FSDP of
its launch config on these CPU processes: it takes them for GPU processes (only its process-type check is bypassed;
the processes, their devices and gloo stay as they are). "precision=..." gives the job the mixed precision that
`accelerate launch --mixed_precision ...` gives a launch, the way the launcher passes it on
(``ACCELERATE_MIXED_PRECISION``, which accelerate, transformers and SteerConfig read).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from accelerate import PartialState  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import AutoModelForCausalLM, TrainerCallback  # noqa: E402

import peft_steer  # noqa: E402
from peft_steer import SteeringConfig  # noqa: E402
from peft_steer.adapter.blocks import find_block_list  # noqa: E402
from tests.conftest import make_tokenizer  # noqa: E402
from tests.trl_integration.conftest import QUESTIONS, bipo_rows, fast_args  # noqa: E402
from trl_integration import SteerTrainer  # noqa: E402
from trl_integration.sharding import gathered  # noqa: E402


class HeldSizes(TrainerCallback):
    """The elements this rank holds at each step's end of block 0 (0 while blocks 0..L are offloaded, or partitioned
    by ZeRO-3) and of the vector (0 where ZeRO-3 partitions it)."""

    def __init__(self) -> None:
        self.block0: list[int] = []
        self.vector: list[int] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        _, blocks = find_block_list(model.get_base_model())
        self.block0.append(sum(_held(parameter) for parameter in blocks[0].parameters()))
        self.vector.append(_held(peft_steer.steering_model(model).vectors_of("default")["1"]))


def _held(parameter) -> int:
    """The elements of ``parameter`` this rank holds (an FSDP2 parameter is a DTensor: its local shard)."""
    return parameter.to_local().numel() if isinstance(parameter, DTensor) else parameter.numel()


def run_job(output_dir: str, model_dir: str, batch_size: str, *options: str) -> SteerTrainer:
    """Train one vector as the job's options say; write ``rank{R}.safetensors`` and ``rank{R}.json`` to
    ``output_dir``."""
    flags = dict(flag.partition("=")[::2] for flag in options)
    if "precision" in flags:
        os.environ["ACCELERATE_MIXED_PRECISION"] = flags["precision"]
    # A fresh accelerate state (mixed precision, engine plugin) for each job of a launch; the processes' own stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    live = "live-reference" in flags
    extra = dict(precompute_ref_log_probs=False, eval_strategy="epoch") if live else {}
    if "checkpoints" in flags:
        extra.update(save_strategy="steps", save_steps=2)
    # the shared fast settings; output_dir is the folder the test reads each rank's vector from
    args = fast_args(
        None,
        output_dir=output_dir,
        per_device_train_batch_size=int(batch_size),
        learning_rate=5e-2,
        max_steps=4,
        save_vectors_per_epoch=True,
        **extra,
    )
    # accelerate turns an FSDP config into FSDP for MULTI_GPU processes only
    state = PartialState()
    if "fsdp-on-cpus" in flags:
        state.distributed_type = DistributedType.MULTI_GPU
    elif state.distributed_type == DistributedType.MULTI_GPU:  # set by an earlier job of this launch
        state.distributed_type = DistributedType.MULTI_CPU
    trainer = SteerTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:8])),
        eval_dataset=Dataset.from_list(bipo_rows(QUESTIONS[8:12])) if live else None,
        processing_class=make_tokenizer(),
        peft_config=SteeringConfig(layers=[1]),
        callbacks=[held := HeldSizes()],
    )
    trainer.train(resume_from_checkpoint=flags.get("resume"))
    trainer.save_model(output_dir)
    rank = trainer.accelerator.process_index
    vector = peft_steer.steering_model(trainer.model).vectors_of("default")["1"]
    with gathered([vector]) as (whole,):  # the float32 master copy under DeepSpeed; a collective, on every rank
        save_file({"vector": whole.detach().clone().contiguous()}, os.path.join(output_dir, f"rank{rank}.safetensors"))
    _, blocks = find_block_list(trainer.accelerator.unwrap_model(trainer.model).get_base_model())
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        info = {
            "world_size": trainer.accelerator.num_processes,
            "engine": trainer.accelerator.distributed_type.value,
            "bf16": trainer.args.bf16,
            "precompute_ref_log_probs": trainer.args.precompute_ref_log_probs,
            "directions": [entry["direction"] for entry in trainer.state.log_history if "direction" in entry],
            "eval_losses": [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry],
            "block0_sizes": held.block0,
            "vector_sizes": held.vector,
            "block0_dtype": str(next(blocks[0].parameters()).dtype),
        }
        json.dump(info, file)
    return trainer


def main() -> None:
    jobs: list[list[str]] = [[]]
    for argument in sys.argv[1:]:
        if argument == "+":
            jobs.append([])
        else:
            jobs[-1].append(argument)
    for job in jobs:
        trainer = run_job(*job)
    # Gloo's worker threads can abort the process while the interpreter shuts down (SIGABRT, "terminate called without
    # an active exception"; pytorch/pytorch#190489), which fails the launch after everything is written: 1 run in 12
    # on a busy machine even with the process group destroyed (the DDP wrapper may still hold it). Leave at once.
    trainer.accelerator.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
