"""SteeringConfig checks and their resolution against a model; each bad input raises before anything changes."""

import pytest
import torch
from peft import get_peft_model

from peft_steer import SteeringConfig, SteeringLayer
from tests.conftest import make_model


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"layers": []}, ValueError, "at least one"),
        ({"layers": [1, 1]}, ValueError, "twice"),
        ({"layers": ["1"]}, TypeError, "ints"),
        ({"positions": "prompt"}, ValueError, "positions='prompt'"),
        ({"init": "ones"}, ValueError, "init='ones'"),
        ({"multiplier": torch.tensor([1.0, 2.0])}, TypeError, "steering\\(model, multiplier=tensor\\)"),
        ({"multiplier": float("nan")}, ValueError, "SteeringConfig\\(multiplier=nan\\).*finite"),
        ({"multiplier": float("inf")}, ValueError, "SteeringConfig\\(multiplier=inf\\).*finite"),
        ({"multiplier": -1e300}, ValueError, "SteeringConfig\\(multiplier=-1e\\+300\\).*float32"),
        ({"multiplier": True}, TypeError, "SteeringConfig\\(multiplier=True\\).*number"),
    ],
)
def test_bad_options_are_named(kwargs, error, message):
    with pytest.raises(error, match=message):
        SteeringConfig(**kwargs)


def test_defaults_are_the_papers():
    config = SteeringConfig()
    assert config.layers == [15] and config.multiplier == 1.0 and config.init == "zeros"
    assert config.positions == "all" and config.peft_type == "STEERING" and config.task_type == "CAUSAL_LM"


def test_negative_layers_count_from_the_end_and_are_stored_resolved():
    model = get_peft_model(make_model(layers=4), SteeringConfig(layers=[-1, 0]))
    config = model.peft_config["default"]
    assert config.layers == [3, 0]
    assert config.target_modules == ["model.layers.3", "model.layers.0"]
    assert (config.hidden_size, config.num_blocks) == (32, 4)
    assert torch.equal(model.base_model.steering_vectors["default"]["3"], torch.zeros(32))


@pytest.mark.parametrize("layers", [[4], [-5], [0, 7]])
def test_block_out_of_range_changes_nothing(layers):
    base = make_model(layers=4)
    with pytest.raises(ValueError, match=r"out of range for LlamaForCausalLM, which has 4 decoder blocks"):
        get_peft_model(base, SteeringConfig(layers=layers))
    assert not any(isinstance(module, SteeringLayer) for module in base.modules())
    assert not hasattr(base, "peft_config")
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in base.modules())


def test_init_vectors_are_checked_and_used():
    given = torch.linspace(-1, 1, 32)
    model = get_peft_model(make_model(), SteeringConfig(layers=[-1], init_vectors={-1: given}))
    assert torch.equal(model.base_model.steering_vectors["default"]["3"], given)
    for bad, message in [
        ({2: given}, "block 2, which is not in layers"),
        ({7: given}, "block 7, which is not in layers"),
        ({3: torch.zeros(31)}, "has shape \\(31,\\); the model's hidden size is 32"),
        ({3: torch.tensor([float("inf")] * 32)}, "NaN or inf"),
        ({3: torch.full((32,), 1e300, dtype=torch.float64)}, "block 3 .*float32"),
    ]:
        base = make_model()
        with pytest.raises(ValueError, match=message):
            get_peft_model(base, SteeringConfig(layers=[3], init_vectors=bad))
        assert not any(isinstance(module, SteeringLayer) for module in base.modules())


def test_random_init_has_about_unit_norm():
    torch.manual_seed(0)
    model = get_peft_model(make_model(), SteeringConfig(layers=[0, 1, 2, 3], init="random"))
    norms = [float(v.detach().norm()) for v in model.base_model.steering_vectors["default"].values()]
    assert all(0.5 < norm < 1.5 for norm in norms)


def test_config_json_never_holds_tensors(tmp_path):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1], init_vectors={1: torch.ones(32)}))
    model.save_pretrained(tmp_path)
    loaded = SteeringConfig.from_pretrained(tmp_path)
    assert loaded.init_vectors is None and loaded.layers == [1]
