"""Stacking on LoRA: nested on a LoRA PeftModel, or on a LoRA-merged model; each saver keeps to its own weights."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import make_model

BLOCK = 1


def lora_model(seed=0):
    model = get_peft_model(make_model(seed=seed), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():  # a LoRA that does something (lora_B starts at zero)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def vector():
    return 0.05 * torch.randn(32, generator=torch.Generator().manual_seed(4))


@pytest.fixture
def stacked():
    lora = lora_model()
    steered = get_peft_model(lora, SteeringConfig(layers=[BLOCK]))
    peft_steer.set_vectors(steered, {BLOCK: vector()})
    return lora, steered


def test_steering_on_a_lora_model_adds_to_the_lora_output(stacked, input_ids):
    lora, steered = stacked
    with torch.no_grad():
        with lora.disable_adapter():
            plain = lora(input_ids, output_hidden_states=True).hidden_states
        with steered.disable_adapter():
            lora_only = steered(input_ids, output_hidden_states=True).hidden_states
        both = steered(input_ids, output_hidden_states=True).hidden_states
    assert not torch.equal(lora_only[BLOCK + 1], plain[BLOCK + 1]), "disabling steering must leave the LoRA on"
    assert torch.equal(both[BLOCK + 1], lora_only[BLOCK + 1] + vector())
    assert lora.peft_config["default"].peft_type == "LORA"  # the LoRA keeps its own config
    assert set(steered.peft_config) == {"default"} and steered.peft_config["default"].peft_type == "STEERING"


def test_only_the_steering_vector_is_trainable(stacked):
    _, steered = stacked
    assert [n for n, p in steered.named_parameters() if p.requires_grad] == [
        f"base_model.steering_vectors.default.{BLOCK}"
    ]


def test_each_saver_saves_only_its_own_weights(stacked, tmp_path, input_ids):
    lora, steered = stacked
    steered.save_pretrained(tmp_path / "steer")
    lora.save_pretrained(tmp_path / "lora")
    steer_keys = set(load_file(tmp_path / "steer" / "adapter_model.safetensors"))
    lora_keys = set(load_file(tmp_path / "lora" / "adapter_model.safetensors"))
    assert steer_keys == {f"base_model.steering_vectors.{BLOCK}"}
    assert lora_keys and all("lora_" in key for key in lora_keys)
    # reload both on a fresh base: same logits
    with torch.no_grad():
        expected = steered(input_ids).logits
    reloaded_lora = PeftModel.from_pretrained(make_model(), tmp_path / "lora")
    reloaded = PeftModel.from_pretrained(reloaded_lora, tmp_path / "steer")
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids).logits, expected, atol=1e-6)


def test_a_vector_trained_on_the_base_applies_to_its_lora_fine_tune(tmp_path, input_ids):
    """The paper's transfer result needs the saved base-model vector to load onto the fine-tune and act there
    exactly as on the base: block output moved by the vector, both nested and on the merged LoRA."""
    on_base = get_peft_model(make_model(), SteeringConfig(layers=[BLOCK]))
    peft_steer.set_vectors(on_base, {BLOCK: vector()})
    on_base.save_pretrained(tmp_path / "vec")
    lora = lora_model()
    with torch.no_grad():
        fine_tuned = lora(input_ids, output_hidden_states=True).hidden_states[BLOCK + 1]
    merged = lora_model().merge_and_unload()
    for target in (lora, merged):
        steered = PeftModel.from_pretrained(target, tmp_path / "vec")
        with torch.no_grad():
            hidden = steered(input_ids, output_hidden_states=True).hidden_states[BLOCK + 1]
        assert torch.allclose(hidden, fine_tuned + vector(), atol=1e-6)


def test_unload_of_steering_leaves_the_lora_model(stacked, input_ids):
    lora, steered = stacked
    with torch.no_grad():
        expected = lora(input_ids).logits  # steering is inside the same modules, so this one is steered
    inner = steered.unload()
    assert not any(isinstance(m, peft_steer.SteeringLayer) for m in inner.modules())
    with torch.no_grad():
        after = lora(input_ids).logits
        with lora.disable_adapter():
            base = lora(input_ids).logits
    assert not torch.equal(after, expected)  # the vector is gone
    assert not torch.equal(after, base)  # the LoRA is still there
