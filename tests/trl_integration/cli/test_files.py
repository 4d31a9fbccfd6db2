"""`peft-steer info`: describe a saved adapter folder, and a clear error for a folder that is not one."""

import json

import torch
from peft import get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import make_model
from trl_integration.cli import main


def test_info_prints_blocks_size_and_norms(tmp_path, capsys):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1, 3]))
    peft_steer.set_vectors(model, {1: torch.full((32,), 0.5), 3: torch.zeros(32)})
    model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [1, 3] and summary["hidden_size"] == 32 and summary["num_blocks"] == 4
    assert summary["vector_norms"] == {"1": round(0.5 * 32**0.5, 6), "3": 0.0}


def test_info_on_a_folder_without_an_adapter(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "adapter_config.json does not exist" in capsys.readouterr().err
