"""DDP over 2 processes (`accelerate launch`, gloo on CPU): every rank ends with the single-process vector."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peft_steer.io import read_adapter

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _run(command: list[str], output_dir: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _free_port() -> int:
    # Not accelerate's fixed default (29500): a port left in use by an earlier run on this machine fails the launch.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_ddp_ranks_hold_identical_vectors_equal_to_one_process(tmp_path):
    script = os.path.join(HERE, "ddp_train.py")
    ddp, single = str(tmp_path / "ddp"), str(tmp_path / "single")
    # `--cpu` would make accelerate start a single process (CPU multi-processing goes through mpirun); the DDP config
    # starts 2 processes with torchrun, and the script's use_cpu=True makes them use gloo on the CPU.
    config = os.path.join(ROOT, "examples", "accelerate", "ddp.yaml")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config]
    launch += ["--main_process_port", str(_free_port()), script, ddp, "2"]
    _run(launch, ddp)
    _run([sys.executable, script, single, "4"], single)  # one process, the same 4 pairs per step

    runs = {}
    for name, folder, ranks in (("ddp", ddp, 2), ("single", single, 1)):
        for rank in range(ranks):
            with open(os.path.join(folder, f"rank{rank}.json")) as file:
                info = json.load(file)
            assert info["world_size"] == ranks
            # the reference log-probs fill the prefix cache up front, so blocks 0..1 leave memory while training
            assert len(info["block0_sizes"]) == 4 and set(info["block0_sizes"]) == {0}
            vector = load_file(os.path.join(folder, f"rank{rank}.safetensors"))["vector"]
            runs[name, rank] = (vector, info["directions"])

    (rank0, directions0), (rank1, directions1) = runs["ddp", 0], runs["ddp", 1]
    assert torch.equal(rank0, rank1)  # DDP averages the gradients: bit-identical vectors
    assert directions0 == directions1 and set(directions0) == {1.0, -1.0}
    single_vector, single_directions = runs["single", 0]
    assert directions0 == single_directions
    assert rank0.abs().max() > 1e-3
    # 2 ranks x 2 pairs per step see the pairs one process sees 4 at a time: the same training.
    torch.testing.assert_close(rank0, single_vector, atol=1e-6, rtol=1e-5)

    # The reference computed inside each step through the DDP-wrapped model, with an evaluation after each epoch
    # and each epoch's vector saved: the same training, the same vector on both ranks, and the saved epochs.
    live = str(tmp_path / "live")
    _run([*launch[:-2], live, "2", "live-reference"], live)
    live_vectors = [load_file(os.path.join(live, f"rank{rank}.safetensors"))["vector"] for rank in range(2)]
    assert torch.equal(live_vectors[0], live_vectors[1])
    torch.testing.assert_close(live_vectors[0], rank0, atol=1e-6, rtol=1e-5)
    with open(os.path.join(live, "rank0.json")) as file:
        info = json.load(file)
    assert len(info["eval_losses"]) == 2  # 8 pairs, 4 per step, 4 steps: 2 epochs
    assert min(info["block0_sizes"]) > 0  # the cache fills during training: blocks 0..1 stay
    config, epoch2 = read_adapter(os.path.join(live, "vectors", "epoch-2"))
    assert config.layers == [1] and torch.equal(epoch2[1], live_vectors[0])
    assert os.path.isdir(os.path.join(live, "vectors", "epoch-1"))
