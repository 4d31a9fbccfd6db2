"""Finding the decoder blocks of each architecture, and the error that names the option when none are found."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_steer import SteeringConfig
from peft_steer.adapter.blocks import find_block_list
from tests.conftest import make_model

EXPECTED_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


def test_block_list_is_found_for_each_architecture(arch):
    model = make_model(arch, layers=3)
    path, blocks = find_block_list(model)
    assert path == EXPECTED_PATHS[arch] and len(blocks) == 3
    steered = get_peft_model(model, SteeringConfig(layers=[2]))
    assert steered.peft_config["default"].target_modules == [f"{path}.2"]


class Custom(nn.Module):
    """A model whose block list has an unusual name and no config the finder could use."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"hidden_size": 8, "num_hidden_layers": 2, "to_dict": lambda self: {}})()
        self.stack = nn.ModuleDict({"blocks": nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])})
        self.extra = nn.ModuleList([nn.Linear(8, 8)] * 3)

    def forward(self, x):
        for block in self.stack["blocks"]:
            x = block(x)
        return x


def test_custom_model_blocks_path_by_hand():
    model = Custom()
    path, _ = find_block_list(model)  # the only list of num_hidden_layers modules
    assert path == "stack.blocks"
    steered = get_peft_model(
        model, SteeringConfig(layers=[0], blocks_path="stack.blocks", init="random", task_type=None)
    )
    x = torch.randn(1, 8)
    with steered.disable_adapter():
        base = steered(x)
    assert not torch.equal(steered(x), base)


def test_no_block_list_names_the_option():
    model = Custom()
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match=r"SteeringConfig\(blocks_path=\.\.\.\)"):
        find_block_list(model)
    with pytest.raises(ValueError, match="has no module at that path"):
        find_block_list(model, "stack.layers")
    with pytest.raises(ValueError, match="not the ModuleList"):
        find_block_list(model, "stack")
