"""Runtime control: steering(), set_multiplier, get/set_vectors, adapter management, vector arithmetic, unload."""

import pytest
import torch
from peft import PeftModel, get_peft_model

import peft_steer
from peft_steer import SteeringConfig, SteeringLayer
from tests.conftest import make_model


def make(**config):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1, 2], **config))
    generator = torch.Generator().manual_seed(9)
    peft_steer.set_vectors(model, {1: 0.05 * torch.randn(32, generator=generator), 2: torch.ones(32) * 0.01})
    return model


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def test_steering_context_restores_the_multiplier_even_on_error(input_ids):
    model = make(multiplier=0.5)
    with peft_steer.steering(model, multiplier=-2.0):
        assert peft_steer.get_multiplier(model) == -2.0
        inside = logits(model, input_ids)
    assert peft_steer.get_multiplier(model) == 0.5
    with pytest.raises(RuntimeError), peft_steer.steering(model, multiplier=3.0):
        raise RuntimeError("boom")
    assert peft_steer.get_multiplier(model) == 0.5
    peft_steer.set_multiplier(model, -2.0)
    assert torch.equal(logits(model, input_ids), inside)


def test_sign_flips_the_shift(input_ids):
    model = make()
    with torch.no_grad():
        with model.disable_adapter():
            base = model(input_ids, output_hidden_states=True).hidden_states[2]
        with peft_steer.steering(model, multiplier=1.0):
            plus = model(input_ids, output_hidden_states=True).hidden_states[2]
        with peft_steer.steering(model, multiplier=-1.0):
            minus = model(input_ids, output_hidden_states=True).hidden_states[2]
    assert torch.allclose(plus - base, -(minus - base), atol=1e-7)


def test_set_multiplier_float_is_saved_tensor_is_not(tmp_path):
    model = make()
    peft_steer.set_multiplier(model, -1.25)
    peft_steer.set_multiplier(model, torch.tensor([1.0, 2.0]))
    assert model.peft_config["default"].multiplier == -1.25
    model.save_pretrained(tmp_path)
    assert SteeringConfig.from_pretrained(tmp_path).multiplier == -1.25


@pytest.mark.parametrize(
    "value, error, message",
    [
        (float("nan"), ValueError, "finite"),
        (torch.ones(2, 2), ValueError, "1-D"),
        (torch.tensor([1.0, float("inf")]), ValueError, "NaN or inf"),
        ("strong", TypeError, "number or a 1-D tensor"),
        (torch.tensor(float("nan")), ValueError, "finite.*nan"),
        (torch.tensor(float("-inf")), ValueError, "finite.*-inf"),
        (1e300, ValueError, "float32.*1e\\+300"),
        (torch.tensor(1e300, dtype=torch.float64), ValueError, "float32.*1e\\+300"),
        (torch.tensor([1.0, -1e300], dtype=torch.float64), ValueError, "float32"),
        (torch.tensor([1.0 + 2.0j, 1.0]), TypeError, "complex"),
        (torch.tensor(1.0 + 2.0j), TypeError, "complex"),
        (torch.tensor([True, False]), TypeError, "bool"),
    ],
)
def test_bad_multipliers(value, error, message):
    model = make()
    with pytest.raises(error, match=message):
        peft_steer.set_multiplier(model, value)
    with pytest.raises(error, match=message), peft_steer.steering(model, multiplier=value):
        pass
    assert peft_steer.get_multiplier(model) == 1.0 and model.peft_config["default"].multiplier == 1.0


def test_a_nan_multiplier_is_never_saved(tmp_path, input_ids):
    model = make()
    with pytest.raises(ValueError):
        peft_steer.set_multiplier(model, torch.tensor(float("nan")))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert torch.isfinite(logits(loaded, input_ids)).all()


def test_get_vectors_returns_copies_and_set_vectors_checks_everything_first():
    model = make()
    vectors = peft_steer.get_vectors(model)
    assert set(vectors) == {1, 2} and all(v.dtype == torch.float32 for v in vectors.values())
    vectors[1].zero_()
    assert peft_steer.get_vectors(model)[1].abs().sum() > 0
    before = peft_steer.get_vectors(model)
    for bad, message in [
        ({1: torch.zeros(32), 3: torch.zeros(32)}, "not block 3"),
        ({1: torch.zeros(32), 2: torch.zeros(16)}, "shape \\(16,\\)"),
        ({1: torch.zeros(32), 2: torch.full((32,), float("nan"))}, "NaN"),
        ({1: torch.zeros(32), 2: torch.full((32,), 1e300, dtype=torch.float64)}, "block 2 .*float32"),
        ({1: torch.zeros(32), 2: torch.zeros(32, dtype=torch.complex64)}, "block 2 .*complex"),
        ({1: torch.zeros(32), 2: torch.zeros(32, dtype=torch.bool)}, "block 2 .*bool"),
    ]:
        with pytest.raises((ValueError, TypeError), match=message):
            peft_steer.set_vectors(model, bad)
        after = peft_steer.get_vectors(model)
        assert all(torch.equal(before[b], after[b]) for b in before), "a failed set_vectors changed a vector"
    peft_steer.set_vectors(model, {-2: torch.ones(32)})  # negative: counts from the end (block 2 of 4)
    assert torch.equal(peft_steer.get_vectors(model)[2], torch.ones(32))


def test_helpers_refuse_a_model_without_steering():
    with pytest.raises(ValueError, match="get_peft_model\\(model, SteeringConfig"):
        peft_steer.get_vectors(make_model())
    with pytest.raises(ValueError, match="No steering adapter named 'other'"):
        peft_steer.get_vectors(make(), "other")


def test_add_weighted_adapter_is_vector_arithmetic(input_ids):
    model = make()
    model.add_adapter("b", SteeringConfig(layers=[2, 3], init="random"))
    a, b = peft_steer.get_vectors(model, "default"), peft_steer.get_vectors(model, "b")
    model.add_weighted_adapter(["default", "b"], [1.0, -0.5], "a_minus_half_b")
    combined = peft_steer.get_vectors(model, "a_minus_half_b")
    assert set(combined) == {1, 2, 3}
    assert torch.allclose(combined[1], a[1])
    assert torch.allclose(combined[2], a[2] - 0.5 * b[2])
    assert torch.allclose(combined[3], -0.5 * b[3])
    # activating the combination equals activating both with multipliers 1 and -0.5
    model.set_adapter("a_minus_half_b")
    single = logits(model, input_ids)
    model.base_model.set_adapter(["default", "b"])
    peft_steer.set_multiplier(model, -0.5, adapter_name="b")
    assert torch.allclose(logits(model, input_ids), single, atol=1e-6)
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["default"], [1.0], "b")


def test_delete_adapter_and_unload(input_ids):
    base_logits = logits(make_model(), input_ids)
    model = make()
    model.add_adapter("other", SteeringConfig(layers=[3], init="random"))
    model.set_adapter("other")
    model.delete_adapter("other")
    assert model.active_adapters == ["default"] and set(model.base_model.steering_vectors) == {"default"}
    steered = logits(model, input_ids)
    assert not torch.equal(steered, base_logits)
    inner = model.unload()
    assert not any(isinstance(m, SteeringLayer) for m in inner.modules())
    assert torch.equal(logits(inner, input_ids), base_logits)
    assert set(inner.state_dict()) == set(make_model().state_dict())


def test_deleting_the_last_steering_adapter_is_refused_and_changes_nothing(tmp_path, input_ids):
    model = make()
    steered = logits(model, input_ids)
    with pytest.raises(ValueError, match="last steering adapter.*unload\\(\\).*add_adapter"):
        model.delete_adapter("default")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    torch.testing.assert_close(logits(model, input_ids), steered, rtol=0, atol=0)
    with peft_steer.steering(model, multiplier=-1.0):
        assert not torch.allclose(logits(model, input_ids), steered)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    # With another adapter added first, the old one can go.
    model.add_adapter("next", SteeringConfig(layers=[2]))
    model.delete_adapter("default")
    assert list(model.peft_config) == ["next"] and model.active_adapters == ["next"]


def test_steering_with_no_active_adapter_says_so():
    model = make()
    model.base_model.set_adapter([])
    with pytest.raises(ValueError, match="no active steering adapter"), peft_steer.steering(model, multiplier=2.0):
        pass
    with pytest.raises(ValueError, match="no active steering adapter"):
        peft_steer.set_multiplier(model, 2.0)
    with peft_steer.steering(model, multiplier=2.0, adapter_name="default"):  # named: it still applies
        assert peft_steer.get_multiplier(model) == 2.0
