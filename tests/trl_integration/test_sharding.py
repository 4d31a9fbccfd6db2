"""FSDP2 and DeepSpeed ZeRO-2 / ZeRO-3: the steering adapter on a sharded model; SteerTrainer's engine checks.

`accelerate` starts FSDP and DeepSpeed only on accelerators, so the engines are driven directly here, on 2 CPU
processes with gloo (`sharded_worker.py`): logits, the vector's gradient, an optimizer step, gathering the vector
and saving the adapter are compared with an unsharded copy of the same model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.interop import read_adapter
from tests.conftest import make_model
from tests.trl_integration.conftest import fast_args
from trl_integration import SteerTrainer, sharding
from trl_integration.sharding import check_sharding, sharding_engine

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


DTYPES = ["float32", "bfloat16"]


ENGINES = ["fsdp2", "zero2", "zero3"]


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory) -> str:
    """The folder of the worker's results for every engine (DeepSpeed's where it is installed) and dtype: one
    launch."""
    folder = str(tmp_path_factory.mktemp("sharded"))
    engines = [engine for engine in ENGINES if not engine.startswith("zero") or importlib.util.find_spec("deepspeed")]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [os.path.join(HERE, "sharded_worker.py"), ",".join(engines), folder, *DTYPES]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return folder


def _ranks(folder: str) -> list[dict]:
    ranks = []
    for rank in range(2):
        with open(os.path.join(folder, f"rank{rank}.json")) as file:
            ranks.append(json.load(file))
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("engine", ENGINES)
def test_sharded_adapter_matches_the_unsharded_one(engine, dtype, sharded_runs):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="pip install -e '.[deepspeed]'")
    folder = os.path.join(sharded_runs, engine, dtype)
    ranks = _ranks(folder)
    bf16_deepspeed = engine.startswith("zero") and dtype == "bfloat16"  # DeepSpeed reduces bf16 gradients in bf16
    for result in ranks:
        assert result["world_size"] == 2
        # The block's hook reads the whole vector while the blocks are sharded: the same logits, bit for bit.
        assert result["unsteered"] == 0.0 and result["steered"] == 0.0
        assert result["steering_moves_logits"] > 0.1
        # The gradient of the vector is the mean of the ranks' gradients, as data parallelism asks.
        assert result["grad"] <= (1e-2 if bf16_deepspeed else 1e-6) * result["grad_size"]
        # After one AdamW step every rank gathers the whole float32 vector, equal to the unsharded update.
        assert result["shape"] == [32]
        assert result["moved"] > 5e-3 and result["updated"] < 1e-6
    vector = torch.load(os.path.join(folder, "vector.pt"), weights_only=True)["vector"]
    config, saved = read_adapter(os.path.join(folder, "adapter"))
    assert config.layers == [1]
    # Saved from the engine's full state dict (what Trainer.save_model hands save_pretrained). DeepSpeed in bf16 holds
    # the model in bf16, so the saved vector is the float32 master copy rounded to bf16.
    if bf16_deepspeed:
        assert saved[1].dtype == torch.bfloat16
        torch.testing.assert_close(saved[1], vector.to(torch.bfloat16), atol=0, rtol=0)
    else:
        assert saved[1].dtype == torch.float32 and torch.equal(saved[1], vector)


def test_engine_is_read_from_arguments_and_from_accelerate_launch(monkeypatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert sharding_engine(fast_args(tmp_path)) is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert not sharding.accelerate_starts_fsdp(fast_args(tmp_path))
    assert sharding_engine(fast_args(tmp_path)) is None  # accelerate runs an FSDP config on CPUs as plain DDP
    monkeypatch.setattr(sharding, "accelerate_starts_fsdp", lambda args: True)
    assert sharding_engine(fast_args(tmp_path)) == "FSDP"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert sharding_engine(fast_args(tmp_path)) == "DeepSpeed"


@pytest.mark.parametrize(
    ("process_type", "starts"),
    [("MULTI_GPU", True), ("MULTI_NPU", True), ("MULTI_CPU", False), ("NO", False), ("XLA", False)],
)
def test_fsdp_starts_where_accelerate_starts_it(process_type, starts):
    from accelerate.utils import DistributedType

    args = SimpleNamespace(distributed_state=SimpleNamespace(distributed_type=DistributedType[process_type]))
    assert sharding.accelerate_starts_fsdp(args) is starts


@pytest.mark.parametrize(("version", "refused"), [("1", True), ("2", False)])
def test_fsdp1_from_accelerate_config_is_refused(monkeypatch, tmp_path, version, refused):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", version)
    monkeypatch.setattr(sharding, "accelerate_starts_fsdp", lambda args: True)
    if refused:
        with pytest.raises(NotImplementedError, match="fsdp_version: 2 in the accelerate config"):
            check_sharding(fast_args(tmp_path))
    else:
        check_sharding(fast_args(tmp_path))


@pytest.mark.parametrize("name", ["ddp", "fsdp", "zero3"])
def test_accelerate_configs_load_and_ask_for_what_the_trainer_supports(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(os.path.join(ROOT, "examples", "accelerate", f"{name}.yaml"))
    assert config.num_processes == 2
    if name == "fsdp":
        assert config.distributed_type == DistributedType.FSDP and config.fsdp_config["fsdp_version"] == 2
    if name == "zero3":
        assert config.distributed_type == DistributedType.DEEPSPEED
        assert config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_save_16bit_model"]


def test_under_a_sharding_engine_the_reference_runs_in_each_step(monkeypatch, tmp_path, tokenizer, pairs, caplog):
    # What `accelerate launch --config_file examples/accelerate/fsdp.yaml` sets on accelerators. Before train() the
    # model is not yet on the devices (FSDP) or is partitioned (ZeRO-3), so neither the reference log-probs nor the
    # prefix cache are computed up front; on this CPU accelerate then runs one plain process, which trains normally.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setattr(sharding, "accelerate_starts_fsdp", lambda args: True)
    with caplog.at_level(logging.INFO, logger="trl_integration"):
        trainer = SteerTrainer(
            model=make_model("llama"),
            args=fast_args(tmp_path, max_steps=2),
            train_dataset=pairs,
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[1]),
        )
    assert trainer.args.precompute_ref_log_probs is False and trainer._prefix_cache is None
    assert "FSDP: precompute_ref_log_probs turned off" in caplog.text
    assert "replaying blocks 0..L under FSDP is not verified" in caplog.text
    assert "ref_chosen_logps" not in trainer.train_dataset.column_names
    trainer.train()
    assert peft_steer.get_vectors(trainer.model)[1].abs().max() > 1e-3


def test_an_fsdp_config_on_cpus_trains_as_plain_data_parallelism(monkeypatch, tmp_path, tokenizer, pairs, caplog):
    # accelerate starts FSDP only on accelerators: on CPUs every rank holds the whole model, so the trainer keeps
    # the precomputed reference and the prefix cache, and says why.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")  # not refused either: FSDP1 does not start
    with caplog.at_level(logging.WARNING, logger="trl_integration.sharding"):
        trainer = SteerTrainer(
            model=make_model("llama"),
            args=fast_args(tmp_path, max_steps=1),
            train_dataset=pairs,
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[1]),
        )
    assert "accelerate does not start it for these processes (CPU processes" in caplog.text
    assert trainer.args.precompute_ref_log_probs is True and trainer._prefix_cache is not None
    assert "ref_chosen_logps" in trainer.train_dataset.column_names
