"""Run by test_sharding.py under `torchrun --nproc_per_node 2` (gloo on CPU): a steering adapter on a model sharded
by FSDP2 or DeepSpeed ZeRO-2 / ZeRO-3, compared on every rank with the same adapter on an unsharded copy.

Usage: sharded_worker.py ENGINE[,ENGINE ...] OUTPUT_DIR DTYPE [DTYPE ...]
       (ENGINE: fsdp2, zero2 or zero3; DTYPE: float32 or bfloat16)

For each engine and dtype, in OUTPUT_DIR/ENGINE/DTYPE/, each rank writes rank<N>.json with the largest differences it
measured; rank 0 also saves the adapter the way `Trainer.save_model` does under that engine (a full state dict handed
to `save_pretrained`). One launch runs every engine and dtype: starting the processes costs more than the runs.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import get_peft_model  # noqa: E402

import peft_steer  # noqa: E402
from peft_steer import SteeringConfig  # noqa: E402
from tests.conftest import make_model  # noqa: E402
from trl_integration.sharding import gathered, register_with_zero3  # noqa: E402

BLOCK = 1
LEARNING_RATE = 1e-2


def steered_model(dtype: torch.dtype):
    model = get_peft_model(make_model("llama").to(dtype), SteeringConfig(layers=[BLOCK], init="random"))
    peft_steer.steering_model(model).vectors_to_float32("default")  # float32 vector, as SteerTrainer keeps it
    return model


def vector_of(model) -> torch.nn.Parameter:
    return peft_steer.steering_model(model).vectors_of("default")[str(BLOCK)]


def largest(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def main() -> None:
    engines, output_dir, dtypes = sys.argv[1].split(","), sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    if any(engine.startswith("zero") for engine in engines):
        import deepspeed

        deepspeed.init_distributed("gloo")  # the process group FSDP2 runs on as well
    else:
        dist.init_process_group("gloo")
    for engine in engines:
        for dtype in dtypes:
            folder = os.path.join(output_dir, engine, dtype)
            os.makedirs(folder, exist_ok=True)
            compare(engine, getattr(torch, dtype), folder)
            dist.barrier()
    dist.destroy_process_group()
    # Gloo's worker threads can abort the process while the interpreter shuts down (SIGABRT, "terminate called without
    # an active exception"; see launch_worker.py), after everything is written: leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def compare(engine_name: str, dtype: torch.dtype, output_dir: str) -> None:
    rank = dist.get_rank()
    reference, model = steered_model(dtype), steered_model(dtype)  # same seed: the same weights and vector
    vector = vector_of(model)
    if engine_name == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in model.get_base_model().model.layers:
            fully_shard(block)
        fully_shard(model)
        vector = vector_of(model)  # fully_shard replaces each parameter by a sharded DTensor one
        runner = model
        optimizer = torch.optim.AdamW([vector], lr=LEARNING_RATE)
    else:
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": 2,
            "bf16": {"enabled": dtype == torch.bfloat16},
            # threshold 0: under ZeRO-3 the vector is partitioned too, not kept whole on every rank as small
            # parameters are
            "zero_optimization": {"stage": int(engine_name[-1]), "stage3_param_persistence_threshold": 0},
            "optimizer": {"type": "AdamW", "params": {"lr": LEARNING_RATE, "weight_decay": 0.01, "torch_adam": True}},
        }
        if dtype == torch.bfloat16:  # DeepSpeed's bf16 mode casts the whole model, the vector too
            peft_steer.set_vectors(reference, {BLOCK: vector.detach().to(dtype).float()})
        runner, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=[vector], config=config)
        if engine_name == "zero3":
            vectors = peft_steer.steering_model(model).vectors_of("default")
            register_with_zero3(model.get_base_model().model.layers, vectors)

    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(rank))  # each rank its own batch
    result: dict[str, float | list[int]] = {"world_size": dist.get_world_size()}
    with torch.no_grad(), model.disable_adapter(), reference.disable_adapter():
        unsteered = reference(input_ids=ids).logits
        result["unsteered"] = largest(runner(input_ids=ids).logits, unsteered)
    logits, reference_logits = runner(input_ids=ids).logits, reference(input_ids=ids).logits
    result["steered"] = largest(logits, reference_logits)
    result["steering_moves_logits"] = largest(logits, unsteered)

    # The gradient of the vector is the mean over the ranks of each rank's unsharded gradient.
    reference_logits.float().pow(2).mean().backward()
    expected = vector_of(reference).grad.float().clone()
    dist.all_reduce(expected)
    expected /= dist.get_world_size()
    loss = logits.float().pow(2).mean()
    if engine_name == "fsdp2":
        loss.backward()
        grad = vector.grad.full_tensor()
    else:
        from deepspeed.utils import safe_get_full_grad

        runner.backward(loss)
        grad = safe_get_full_grad(vector)
    result["grad"] = largest(grad, expected)
    result["grad_size"] = expected.abs().max().item()

    # One optimizer step; then `gathered` must give every rank the whole, updated vector.
    optimizer.step() if engine_name == "fsdp2" else runner.step()
    start = vector_of(reference).detach().float().clone()
    with torch.no_grad():
        reference_vector = vector_of(reference)
        reference_vector.grad = expected.to(reference_vector.dtype)
        torch.optim.AdamW([reference_vector], lr=LEARNING_RATE, weight_decay=0.01).step()
    with gathered([vector]) as (whole,):
        result["shape"] = list(whole.shape)
        result["updated"] = largest(whole, vector_of(reference))
        result["moved"] = largest(whole, start)
        if rank == 0:
            torch.save({"vector": whole.float().cpu()}, os.path.join(output_dir, "vector.pt"))

    # The adapter as Trainer.save_model writes it under the engine: a full state dict gathered on every rank.
    if engine_name == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif engine_name == "zero3":
        state_dict = runner._zero3_consolidated_16bit_state_dict()
    else:
        state_dict = runner.module.state_dict()  # ZeRO-2 keeps every weight whole (in bf16 under bf16)
    if rank == 0:
        model.save_pretrained(os.path.join(output_dir, "adapter"), state_dict=state_dict)
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(result, file)


if __name__ == "__main__":
    main()
