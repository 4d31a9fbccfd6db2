"""`accelerate launch` with the shipped configs on 2 CPU processes (gloo): DDP, DeepSpeed ZeRO-3 and FSDP2 end with
the vector of one process trained on the same batches, bit-identical on both ranks.

accelerate starts FSDP only on accelerators (on CPUs an FSDP config runs as DDP, which is tested too); the FSDP2 runs
here make it take the CPU processes for GPU ones (launch_worker.py "fsdp-on-cpus"), and everything else is real.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peft_steer.interop import read_adapter
from tests.conftest import make_model, make_tokenizer
from tests.trl_integration.conftest import EXAMPLE_OPTIONS
from tests.trl_integration.launch_worker import run_job

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "launch_worker.py")


def _run(command: list[str]) -> str:
    # Every launch names its config: none of the caller's ACCELERATE_* settings reach it. No GPU is visible: on a
    # machine with one, FSDP2 would put its default device mesh, and so the weights, there.
    env = {name: value for name, value in os.environ.items() if not name.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _launch(*options: str, script: str = WORKER) -> list[str]:
    # Not accelerate's fixed default port (29500): a port left in use by an earlier run on this machine fails the
    # launch. The worker's use_cpu=True makes the processes use gloo on the CPU.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", *options]
    return [*launch, "--main_process_port", str(port), script]


def _config(name: str) -> list[str]:
    return ["--config_file", os.path.join(ROOT, "examples", "accelerate", f"{name}.yaml")]


def _ranks(folder: str, count: int) -> list[tuple[torch.Tensor, dict]]:
    """Each rank's whole vector (gathered) and its record."""
    ranks = []
    for rank in range(count):
        with open(os.path.join(folder, f"rank{rank}.json")) as file:
            info = json.load(file)
        assert info["world_size"] == count
        ranks.append((load_file(os.path.join(folder, f"rank{rank}.safetensors"))["vector"], info))
    return ranks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny-llama"))
    make_model("llama").save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def one_process(model_dir, tmp_path_factory) -> tuple[torch.Tensor, dict]:
    """One plain process (this one), 4 pairs per step: what 2 ranks x 2 pairs must reproduce."""
    folder = str(tmp_path_factory.mktemp("single"))
    run_job(folder, model_dir, "4")
    ((vector, info),) = _ranks(folder, 1)
    assert vector.abs().max() > 1e-3 and set(info["directions"]) == {1.0, -1.0}
    return vector, info


# Each launch runs its jobs (output folder, worker flags; 2 pairs per step on each rank) in the same 2 processes;
# the folders are inside the launch's folder, "resume=NAME" names the checkpoint folder of an earlier job, and
# "precision=..." is the job's `--mixed_precision`.
LAUNCHES = {
    "ddp": ("ddp", [("ddp", []), ("live", ["live-reference"])]),
    # examples/accelerate/fsdp.yaml on CPUs: as accelerate runs it (DDP), then with FSDP2 started on the CPUs
    "fsdp": (
        "fsdp",
        [
            ("ddp", ["precision=no"]),
            ("fsdp2-no", ["precision=no", "fsdp-on-cpus"]),
            ("fsdp2-bf16", ["precision=bf16", "fsdp-on-cpus", "checkpoints"]),
            ("resumed", ["precision=bf16", "fsdp-on-cpus", "resume=fsdp2-bf16/checkpoint-2"]),
        ],
    ),
    "zero3": ("zero3", [("zero3-bf16", ["precision=bf16"]), ("zero3-no", ["precision=no"])]),
    "partitioned": (
        "partitioned",
        [
            ("zero3-bf16", ["precision=bf16", "checkpoints"]),
            ("resumed", ["precision=bf16", "resume=zero3-bf16/checkpoint-2"]),
        ],
    ),
}


@pytest.fixture(scope="module")
def launched(model_dir, tmp_path_factory):
    """``launched(name)``: the folder of one of LAUNCHES, launched once for the module."""
    folders: dict[str, str] = {}

    def launch(name: str) -> str:
        if name not in folders:
            config, jobs = LAUNCHES[name]
            folder = tmp_path_factory.mktemp(name)
            options = _partitioned(folder) if config == "partitioned" else _config(config)
            arguments: list[str] = []
            for job, flags in jobs:
                flags = [flag.replace("resume=", f"resume={folder}/") for flag in flags]
                arguments += [*(["+"] if arguments else []), str(folder / job), model_dir, "2", *flags]
            _run([*_launch(*options), *arguments])
            folders[name] = str(folder)
        return folders[name]

    return launch


@pytest.mark.slow
def test_ddp_ranks_hold_identical_vectors_equal_to_one_process(launched, one_process):
    single_vector, single_info = one_process
    ddp = os.path.join(launched("ddp"), "ddp")
    (rank0, info0), (rank1, info1) = _ranks(ddp, 2)
    assert info0["engine"] == "MULTI_CPU"
    for info in (info0, info1):
        # the reference log-probs fill the prefix cache up front, so blocks 0..1 leave memory while training
        assert len(info["block0_sizes"]) == 4 and set(info["block0_sizes"]) == {0}
    assert torch.equal(rank0, rank1)  # DDP averages the gradients: bit-identical vectors
    assert info0["directions"] == info1["directions"] == single_info["directions"]
    # 2 ranks x 2 pairs per step see the pairs one process sees 4 at a time: the same training.
    torch.testing.assert_close(rank0, single_vector, atol=1e-6, rtol=1e-5)

    # examples/accelerate/fsdp.yaml on CPUs: accelerate runs it as DDP, and the trainer keeps its precomputed
    # reference and prefix cache (blocks 0..1 offloaded), so it trains exactly as the DDP launch.
    (fsdp0, info), (fsdp1, _) = _ranks(os.path.join(launched("fsdp"), "ddp"), 2)
    assert info["engine"] == "MULTI_CPU" and info["precompute_ref_log_probs"] is True
    assert set(info["block0_sizes"]) == {0}
    assert torch.equal(fsdp0, rank0) and torch.equal(fsdp1, rank0)

    # The reference computed inside each step through the DDP-wrapped model, with an evaluation after each epoch
    # and each epoch's vector saved: the same training, the same vector on both ranks, and the saved epochs.
    live = os.path.join(launched("ddp"), "live")
    (live0, info), (live1, _) = _ranks(live, 2)
    assert torch.equal(live0, live1)
    torch.testing.assert_close(live0, rank0, atol=1e-6, rtol=1e-5)
    assert len(info["eval_losses"]) == 2  # 8 pairs, 4 per step, 4 steps: 2 epochs
    assert min(info["block0_sizes"]) > 0  # the cache fills during training: blocks 0..1 stay
    config, epoch2 = read_adapter(os.path.join(live, "vectors", "epoch-2"))
    assert config.layers == [1] and torch.equal(epoch2[1], live0)
    assert os.path.isdir(os.path.join(live, "vectors", "epoch-1"))


# A DeepSpeed config that partitions every parameter, the vector included (the tiny model's weights are all below
# the default stage3_param_persistence_threshold, so with the shipped config they stay whole on each rank).
PARTITIONED = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "bf16": {"enabled": "auto"},
    "train_micro_batch_size_per_gpu": "auto",
    "train_batch_size": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
}


def _partitioned(folder) -> list[str]:
    """Launch options for ZeRO-3 on 2 processes with the PARTITIONED DeepSpeed config (both files written to
    ``folder``)."""
    (folder / "ds.json").write_text(json.dumps(PARTITIONED))
    deepspeed = {"deepspeed_config_file": str(folder / "ds.json"), "zero3_init_flag": True}
    config = {"distributed_type": "DEEPSPEED", "deepspeed_config": deepspeed, "num_processes": 2, "num_machines": 1}
    (folder / "accelerate.json").write_text(json.dumps(config))
    return ["--config_file", str(folder / "accelerate.json")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("variant", "mixed_precision"), [("shipped", "bf16"), ("shipped", "no"), ("partitioned", "bf16")]
)
def test_zero3_ranks_hold_identical_vectors_equal_to_one_process(launched, one_process, variant, mixed_precision):
    pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    single_vector, single_info = one_process
    # examples/accelerate/zero3.yaml as it is (and in float32), or the PARTITIONED config
    folder = launched("zero3" if variant == "shipped" else "partitioned")
    zero3 = os.path.join(folder, f"zero3-{mixed_precision}")
    (rank0, info0), (rank1, info1) = _ranks(zero3, 2)
    for info in (info0, info1):
        assert info["engine"] == "DEEPSPEED"
        assert info["bf16"] is (mixed_precision == "bf16")  # SteerConfig follows the mixed precision of the job
        assert info["precompute_ref_log_probs"] is False  # the reference runs inside each step under ZeRO-3
        # zero.Init (zero3_init_flag) casts the base weights as from_pretrained partitions them
        assert info["block0_dtype"] == ("torch.bfloat16" if mixed_precision == "bf16" else "torch.float32")
        if variant == "partitioned":  # between steps each rank holds no weight of block 0, nor the vector
            assert set(info["block0_sizes"]) == {0} and set(info["vector_sizes"]) == {0}
        else:  # below stage3_param_persistence_threshold they stay whole on each rank
            assert set(info["block0_sizes"]) == {9280} and set(info["vector_sizes"]) == {32}
    assert torch.equal(rank0, rank1)
    assert info0["directions"] == single_info["directions"]
    # bf16 moves the vector by about 1e-3 of its 0.12 (largest entry) against float32
    tolerance = 1e-6 if mixed_precision == "no" else 5e-3
    torch.testing.assert_close(rank0, single_vector, atol=tolerance, rtol=0)
    # The vector stays float32 on the model (it is made after zero.Init has cast the base weights): the saved
    # adapter and the last epoch's hold exactly the gathered master copy.
    for saved_in in (zero3, os.path.join(zero3, "vectors", "epoch-2")):
        config, saved = read_adapter(saved_in)
        assert config.layers == [1] and saved[1].dtype == torch.float32 and torch.equal(saved[1], rank0)

    if variant == "partitioned":  # resuming from DeepSpeed's step-2 checkpoint ends with the same vector, bit for bit
        assert os.path.isdir(os.path.join(zero3, "checkpoint-2", "global_step2"))  # the engine's own, partitioned
        (resumed0, info), (resumed1, _) = _ranks(os.path.join(folder, "resumed"), 2)
        assert len(info["block0_sizes"]) == 2  # this job ran steps 3 and 4 only
        assert torch.equal(resumed0, rank0) and torch.equal(resumed1, rank0)


@pytest.mark.slow
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_fsdp2_ranks_hold_identical_vectors_equal_to_one_process(launched, one_process, mixed_precision):
    """examples/accelerate/fsdp.yaml through accelerate's own FSDP2 preparation (`fully_shard` of each block and the
    root), on CPU processes that accelerate is made to take for GPU ones (launch_worker.py "fsdp-on-cpus")."""
    single_vector, single_info = one_process
    folder = launched("fsdp")
    fsdp = os.path.join(folder, f"fsdp2-{mixed_precision}")
    (rank0, info0), (rank1, info1) = _ranks(fsdp, 2)
    for info in (info0, info1):
        assert info["engine"] == "FSDP" and info["bf16"] is (mixed_precision == "bf16")
        assert info["precompute_ref_log_probs"] is False  # the reference runs inside each step under FSDP
        # between steps each rank holds its half of block 0 (9280 elements) and of the vector (32)
        assert set(info["block0_sizes"]) == {4640} and set(info["vector_sizes"]) == {16}
    assert torch.equal(rank0, rank1)
    assert info0["directions"] == single_info["directions"]
    # bf16 compute (FSDP's mixed-precision policy) moves the vector by about 1.4e-3 of its 0.12 against float32
    torch.testing.assert_close(rank0, single_vector, atol=1e-6 if mixed_precision == "no" else 5e-3, rtol=0)
    for saved_in in (fsdp, os.path.join(fsdp, "vectors", "epoch-2")):  # saved from the gathered float32 vector
        config, saved = read_adapter(saved_in)
        assert config.layers == [1] and saved[1].dtype == torch.float32 and torch.equal(saved[1], rank0)

    if mixed_precision == "bf16":  # resuming from the step-2 checkpoint ends with the same vector, bit for bit
        (resumed0, info), (resumed1, _) = _ranks(os.path.join(folder, "resumed"), 2)
        assert len(info["block0_sizes"]) == 2  # this job ran steps 3 and 4 only
        assert torch.equal(resumed0, rank0) and torch.equal(resumed1, rank0)


SCORE = re.compile(r"multiplier ([+-]\d): answer preference ([\d.]+) \(mean log-prob margin ([+-][\d.]+)\)")


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_the_example_trains_and_scores_when_sharded(example_run, tmp_path, engine):
    """`accelerate launch examples/train_bipo.py` with every weight sharded (ZeRO-3 partitioned, or FSDP2): it trains
    the vector of one process (conftest.py `example_run`), and its evaluation after training (every rank runs the
    forwards of the sharded model) prints the scores of one process, once. (4 steps into the paper's 100 warm-up
    steps the vector is small: the scores show that the sharded model computes the log-probs of the whole one, not
    that the vector steers.)"""
    if engine == "zero3":
        pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    sharded = str(tmp_path / "sharded")
    launcher = os.path.join(HERE, "example_launcher.py")
    if engine == "zero3":
        launch = [*_launch(*_partitioned(tmp_path), "--mixed_precision", "no", script=launcher)]
    else:
        launch = [*_launch(*_config("fsdp"), "--mixed_precision", "no", script=launcher), "--fsdp-on-cpus"]
    options = [*EXAMPLE_OPTIONS, "--model", example_run.model_dir, "--batch-size", "2", "--output-dir", sharded]
    launched = _run([*launch, *options])
    alone_scores, single_vector = SCORE.findall(example_run.printed), read_adapter(example_run.output_dir)[1][1]
    assert f"{'DeepSpeed' if engine == 'zero3' else 'FSDP'}: precompute_ref_log_probs turned off" in launched
    assert [sign for sign, *_ in SCORE.findall(launched)] == ["-1", "+0", "+1"]  # printed by the main process only
    assert SCORE.findall(launched) == alone_scores
    vector = read_adapter(sharded)[1][1]
    assert vector.abs().max() > 0
    torch.testing.assert_close(vector, single_vector, rtol=1e-4, atol=1e-9)
