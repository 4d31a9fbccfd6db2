"""The steering arithmetic on every supported architecture: block L's output moves by exactly m * v, nothing else."""

import pytest
import torch
from peft import get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import make_model

BLOCK = 1


def steered_model(arch, **config):
    model = get_peft_model(make_model(arch), SteeringConfig(layers=[BLOCK], init="random", **config))
    torch.manual_seed(7)
    peft_steer.set_vectors(model, {BLOCK: 0.05 * torch.randn(model.peft_config["default"].hidden_size)})
    return model


def test_block_output_moves_by_exactly_multiplier_times_vector(arch, input_ids):
    base = make_model(arch)
    with torch.no_grad():
        expected = base(input_ids, output_hidden_states=True).hidden_states
    model = steered_model(arch)
    vector = peft_steer.get_vectors(model)[BLOCK]
    with torch.no_grad(), peft_steer.steering(model, multiplier=-1.5):
        hidden = model(input_ids, output_hidden_states=True).hidden_states
    # hidden_states[i + 1] is the output of block i; embeddings and blocks before BLOCK are untouched
    for i in range(BLOCK + 1):
        assert torch.equal(hidden[i], expected[i]), f"hidden state {i} changed"
    assert torch.equal(hidden[BLOCK + 1], expected[BLOCK + 1] + (-1.5 * vector))
    assert not torch.allclose(hidden[-1], expected[-1])  # and the change propagates to the logits


def test_disable_adapter_and_zero_multiplier_give_base_logits_exactly(arch, input_ids):
    with torch.no_grad():
        expected = make_model(arch)(input_ids).logits
    model = steered_model(arch)
    with torch.no_grad():
        steered = model(input_ids).logits
        with model.disable_adapter():
            disabled = model(input_ids).logits
        with peft_steer.steering(model, multiplier=0.0):
            zero = model(input_ids).logits
    assert not torch.equal(steered, expected)
    assert torch.equal(disabled, expected)
    assert torch.equal(zero, expected)


def test_state_dict_keys_of_the_base_model_are_unchanged(arch):
    base_keys = set(make_model(arch).state_dict())
    model = steered_model(arch)
    inner_keys = set(model.get_base_model().state_dict())
    assert inner_keys == base_keys
    assert [key for key in model.state_dict() if "steering_vectors" in key] == [
        f"base_model.steering_vectors.default.{BLOCK}"
    ]


def test_one_multiplier_per_batch_row(input_ids):
    model = steered_model("llama")
    vector = peft_steer.get_vectors(model)[BLOCK]
    multipliers = torch.tensor([2.0, -1.0])
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids, output_hidden_states=True).hidden_states[BLOCK + 1]
        with peft_steer.steering(model, multiplier=multipliers):
            out = model(input_ids, output_hidden_states=True)
            per_row = out.hidden_states[BLOCK + 1]
        for row, m in enumerate(multipliers.tolist()):
            assert torch.equal(per_row[row], base[row] + m * vector)
            with peft_steer.steering(model, multiplier=m):
                alone = model(input_ids[row : row + 1]).logits
            assert torch.allclose(out.logits[row], alone[0], atol=1e-6)


def test_two_active_adapters_add_up(input_ids):
    model = steered_model("llama")
    model.add_adapter("other", SteeringConfig(layers=[BLOCK, 3], init="random"))
    v_default = peft_steer.get_vectors(model, "default")[BLOCK]
    v_other = peft_steer.get_vectors(model, "other")
    model.base_model.set_adapter(["default", "other"])
    peft_steer.set_multiplier(model, 0.5, adapter_name="other")
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True).hidden_states
        with model.disable_adapter():
            base = model(input_ids, output_hidden_states=True).hidden_states
    assert torch.allclose(out[BLOCK + 1], base[BLOCK + 1] + v_default + 0.5 * v_other[BLOCK], atol=1e-7)


def test_positions_completion_steers_from_the_last_prompt_token(input_ids):
    model = steered_model("llama", positions="completion")
    vector = peft_steer.get_vectors(model)[BLOCK]
    lengths = torch.tensor([3, 5])  # the prompt of row 0 is columns 0..2, of row 1 columns 0..4
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids, output_hidden_states=True).hidden_states[BLOCK + 1]
        with peft_steer.prompt_lengths(model, lengths):
            steered = model(input_ids, output_hidden_states=True).hidden_states[BLOCK + 1]
    for row, length in enumerate(lengths.tolist()):
        assert torch.equal(steered[row, : length - 1], base[row, : length - 1])
        assert torch.equal(steered[row, length - 1 :], base[row, length - 1 :] + vector)


def test_positions_completion_without_prompt_lengths_says_what_to_do(input_ids):
    model = steered_model("llama", positions="completion")
    with pytest.raises(ValueError, match="prompt_lengths"):
        model(input_ids)


def test_multiplier_tensor_of_wrong_length_is_refused(input_ids):
    model = steered_model("llama")
    with peft_steer.steering(model, multiplier=torch.tensor([1.0, 2.0, 3.0])):
        with pytest.raises(ValueError, match="3 values but the batch has 2 rows"):
            model(input_ids)


def test_bf16_model_keeps_an_fp32_vector_and_steers_in_bf16(input_ids):
    base = make_model("llama").to(torch.bfloat16)
    model = get_peft_model(base, SteeringConfig(layers=[BLOCK]))
    vector = model.base_model.steering_vectors["default"][str(BLOCK)]
    assert vector.dtype == torch.float32 and vector.requires_grad
    peft_steer.set_vectors(model, {BLOCK: torch.full((32,), 0.01)})
    logits = model(input_ids).logits
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert vector.grad is not None and vector.grad.dtype == torch.float32 and vector.grad.abs().sum() > 0
    # a small update survives in fp32 where bf16 would round it away
    with torch.no_grad():
        vector.add_(1e-4)
    assert torch.allclose(peft_steer.get_vectors(model)[BLOCK], torch.full((32,), 0.01 + 1e-4))
