"""Reading adapter folders and GGUF control vectors without peft: the same vectors peft-steer saved."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from peft_steer.adapter._peft_compat import saved_vector_key
from peft_steer.interop import export_gguf, read_adapter, write_adapter
from peft_steer_vllm import read_vectors
from peft_steer_vllm.vectors import VECTOR_KEY
from tests.conftest import make_model


@pytest.fixture
def adapter(tmp_path):
    model = make_model("llama")
    vectors = {1: torch.randn(32), 3: torch.randn(32)}
    write_adapter(tmp_path / "adapter", vectors, model, positions="completion", multiplier=2.0)
    return tmp_path / "adapter"


def test_adapter_folder_reads_as_peft_steer_saved_it(adapter):
    _, expected = read_adapter(str(adapter))
    read = read_vectors(adapter)
    assert read.positions == "completion" and read.hidden_size == 32
    assert sorted(read.vectors) == sorted(expected)
    for block, vector in expected.items():
        assert torch.equal(read.vectors[block], vector.float())


def test_saved_key_layout_matches_peft_steer():
    assert VECTOR_KEY.fullmatch(saved_vector_key(7)).group(1) == "7"


def test_gguf_reads_as_exported(adapter, tmp_path):
    pytest.importorskip("gguf")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["positions"] = "all"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    export_gguf(adapter, tmp_path / "v.gguf")
    _, expected = read_adapter(str(adapter))
    read = read_vectors(tmp_path / "v.gguf")
    assert read.positions == "all"
    for block, vector in expected.items():  # export multiplies by the adapter's multiplier, 2.0
        assert torch.allclose(read.vectors[block], 2.0 * vector.float())


def test_checks_against_the_model(adapter):
    read = read_vectors(adapter)
    read.check_model(32, 4)
    with pytest.raises(ValueError, match="hidden size is 64"):
        read.check_model(64, 4)
    with pytest.raises(ValueError, match="made for a model of 4 blocks; the served model has 6"):
        read.check_model(32, 6)
    unrecorded = dataclasses.replace(read, num_blocks=None)  # a .gguf file does not say
    unrecorded.check_model(32, 6)
    with pytest.raises(ValueError, match="steers block 3, but the served model has 2 blocks"):
        unrecorded.check_model(32, 2)


def damage(folder, what):
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    if what == "empty weights":
        weights.write_bytes(b"")
    elif what == "cut weights":
        weights.write_bytes(weights.read_bytes()[:50])
    elif what == "config list":
        config.write_text("[1, 2]")
    elif what == "config not json":
        config.write_text("{")
    elif what == "lora config":
        config.write_text(json.dumps({"peft_type": "LORA"}))
    elif what == "deep json":
        config.write_text("[" * 100_000 + "]" * 100_000)
    elif what == "nan vector":
        save_file({saved_vector_key(1): torch.full((32,), float("nan")), saved_vector_key(3): torch.ones(32)}, weights)
    elif what == "int vector":
        save_file(
            {saved_vector_key(1): torch.ones(32, dtype=torch.int32), saved_vector_key(3): torch.ones(32)}, weights
        )
    elif what == "two keys one block":
        save_file(
            {"base_model.steering_vectors.1": torch.ones(32), "base_model.steering_vectors.01": torch.ones(32)}, weights
        )
    elif what == "other key":
        save_file({"lora_A.weight": torch.ones(32)}, weights)
    elif what == "blocks differ from config":
        save_file({saved_vector_key(1): torch.ones(32)}, weights)
    elif what == "no weights":
        weights.unlink()


@pytest.mark.parametrize(
    "what, message",
    [
        ("empty weights", "adapter_model.safetensors is not a readable safetensors file"),
        ("cut weights", "adapter_model.safetensors is not a readable safetensors file"),
        ("config list", "adapter_config.json describes a 'list' adapter"),
        ("config not json", "adapter_config.json is not a readable JSON file"),
        ("lora config", "describes a 'LORA' adapter"),
        ("deep json", "adapter_config.json is not a readable JSON file"),
        ("nan vector", "NaN or inf"),
        ("int vector", "not a float vector"),
        ("two keys one block", "two vectors for block 1"),
        ("other key", "'lora_A.weight', which is not a steering vector"),
        ("blocks differ from config", "the folder is inconsistent"),
        ("no weights", "adapter_model.safetensors does not exist"),
    ],
)
def test_bad_folders_are_one_error_naming_the_file(adapter, what, message):
    damage(adapter, what)
    with pytest.raises(ValueError, match=message) as error:
        read_vectors(adapter)
    assert str(adapter) in str(error.value) and "\n" not in str(error.value)
