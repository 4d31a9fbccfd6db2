"""Steering a bitsandbytes 4-bit or 8-bit model (runs on CPU here): fp32 vector, exact shift, gradients flow."""

import warnings

import pytest
import torch
import transformers
from peft import get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import make_model

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def saved_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    make_model(hidden=64).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_is_steered_by_an_fp32_vector(saved_base, bits, input_ids):
    if bits == 4:
        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    else:
        quantization = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForCausalLM.from_pretrained(
            saved_base, quantization_config=quantization, device_map="cpu"
        )
        assert "bitsandbytes" in type(base.model.layers[0].self_attn.q_proj).__module__
        with torch.no_grad():
            expected = base(input_ids, output_hidden_states=True).hidden_states[2]
        model = get_peft_model(base, SteeringConfig(layers=[1]))
        peft_steer.set_vectors(model, {1: torch.full((64,), 0.1)})
        vector = model.base_model.steering_vectors["default"]["1"]
        assert vector.dtype == torch.float32 and vector.requires_grad
        hidden = model(input_ids, output_hidden_states=True).hidden_states[2]
        assert torch.allclose(hidden, expected + 0.1, atol=1e-6)
        model(input_ids).logits.float().sum().backward()
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["base_model.steering_vectors.default.1"]
