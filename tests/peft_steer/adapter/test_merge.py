"""merge_and_unload folds m * v into an output bias: a plain checkpoint whose logits equal the steered model's."""

import pytest
import torch
import transformers
from peft import get_peft_model

import peft_steer
from peft_steer import SteeringConfig, SteeringLayer
from tests.conftest import make_model

MERGEABLE = {"llama": {"mlp_bias": True}, "gpt2": {}, "gpt_neox": {}}


def build(arch, config_kwargs, **steering):
    torch.manual_seed(0)
    config = make_model(arch).config
    for key, value in config_kwargs.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    model = get_peft_model(base, SteeringConfig(layers=[1, 2], **steering))
    generator = torch.Generator().manual_seed(2)
    peft_steer.set_vectors(model, {1: 0.1 * torch.randn(32, generator=generator), 2: torch.full((32,), 0.05)})
    return model


@pytest.mark.parametrize("arch", sorted(MERGEABLE))
def test_merged_logits_equal_steered_logits(arch, input_ids, tmp_path):
    model = build(arch, MERGEABLE[arch], multiplier=-1.5)
    with torch.no_grad():
        steered = model(input_ids).logits
        with model.disable_adapter():
            base = model(input_ids).logits
    merged = model.merge_and_unload()
    assert not any(isinstance(m, SteeringLayer) for m in merged.modules())
    assert type(merged) is type(make_model(arch))
    merged.save_pretrained(tmp_path)  # a standard checkpoint for vLLM / TGI
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        logits = reloaded(input_ids).logits
    assert not torch.allclose(steered, base)
    assert torch.allclose(logits, steered, atol=1e-5)


def test_two_active_adapters_merge_as_their_sum(input_ids):
    model = build("gpt2", {})
    model.add_adapter("other", SteeringConfig(layers=[2], init="random"))
    model.base_model.set_adapter(["default", "other"])
    peft_steer.set_multiplier(model, 0.5, adapter_name="other")
    with torch.no_grad():
        steered = model(input_ids).logits
        merged = model.merge_and_unload()(input_ids).logits
    assert torch.allclose(merged, steered, atol=1e-5)


def test_merge_inside_a_steering_block_folds_the_blocks_multiplier(input_ids):
    model = build("gpt2", {}, multiplier=0.5)
    with torch.no_grad(), peft_steer.steering(model, multiplier=-2.0):
        steered = model(input_ids).logits
        merged = model.merge_and_unload()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids).logits, steered, atol=1e-5)


@pytest.mark.parametrize(
    "arch, config_kwargs, message",
    [
        ("llama", {}, "mlp_bias=False"),
        ("mistral", {}, "cannot fold a steering vector into a 'mistral' model"),
        ("gemma2", {}, "'gemma2'"),
    ],
)
def test_architectures_without_an_exact_bias_are_refused_unchanged(arch, config_kwargs, message, input_ids):
    model = build(arch, config_kwargs)
    with torch.no_grad():
        before = model(input_ids).logits
    with pytest.raises(ValueError, match=message):
        model.merge_and_unload()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, before)  # still steered, nothing folded


def test_completion_positions_and_per_row_multipliers_cannot_merge():
    with pytest.raises(ValueError, match="only positions='all'"):
        build("gpt2", {}, positions="completion").merge_and_unload()
    model = build("gpt2", {})
    peft_steer.set_multiplier(model, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="per-row multiplier"):
        model.merge_and_unload()
