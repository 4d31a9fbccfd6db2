"""The trainer's loss is the BiPO objective, and its reference is the model with steering disabled (one model)."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
import transformers
from peft import LoraConfig, get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import make_model
from trl_integration import SteerTrainer

from .conftest import collated, fast_args, independent_logps

BLOCK = 1


def _random_vector(seed: int = 3, scale: float = 2.0) -> torch.Tensor:
    return scale * torch.randn(32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("positions", ["all", "completion"])
def test_loss_equals_independent_bipo_objective(tmp_path, tokenizer, pairs, positions):
    trainer = SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path, beta=0.1),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK], positions=positions),
    )
    vector = _random_vector()
    peft_steer.set_vectors(trainer.model, {BLOCK: vector})
    batch = collated(trainer, range(4))
    plain = make_model("llama")  # same seed, same weights: an independent copy for the reference computation
    # positions="completion" steers from the last prompt token on (its output predicts the first completion token).
    from_column = batch["completion_mask"].argmax(dim=1) - 1 if positions == "completion" else None

    reference = independent_logps(plain, batch, BLOCK, None, 0.0)
    ref_chosen, ref_rejected = reference.chunk(2)
    expected = {}
    for d in (1.0, -1.0):
        steered = independent_logps(plain, batch, BLOCK, vector, d, from_column)
        chosen, rejected = steered.chunk(2)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        expected[d] = (-F.logsigmoid(d * 0.1 * margin).mean(), d * 0.1 * margin)
        # The margin must matter here, or the comparison would be vacuous.
        assert margin.abs().max() > 1.0

    trainer.model.train()
    for d in (1.0, -1.0):
        loss, metrics = trainer.bipo_loss(trainer.model, batch, (d,))
        assert loss.item() == pytest.approx(expected[d][0].item(), abs=1e-5)
        # Rewards are reported in the sign convention of d = +1: the margin is d * beta * (r_d(y_w) - r_d(y_l)).
        assert metrics["rewards/margins"] == pytest.approx(expected[d][1].mean().item(), abs=1e-4)
        assert metrics["direction"] == d
    both, metrics = trainer.bipo_loss(trainer.model, batch, (1.0, -1.0))
    assert both.item() == pytest.approx((expected[1.0][0] + expected[-1.0][0]).item() / 2, abs=1e-5)
    assert metrics["direction"] == 0.0
    assert metrics["rewards/margins_d-1"] == pytest.approx(expected[-1.0][1].mean().item(), abs=1e-4)

    # The precomputed-reference path of the loss (ref log-probs carried in the batch) gives the same value.
    with_ref = dict(batch, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected)
    assert trainer.bipo_loss(trainer.model, with_ref, (-1.0,))[0].item() == pytest.approx(
        expected[-1.0][0].item(), abs=1e-5
    )


def test_loss_has_gradient_only_for_the_vector(tmp_path, tokenizer, pairs):
    trainer = SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK]),
    )
    peft_steer.set_vectors(trainer.model, {BLOCK: _random_vector()})
    trainer.model.train()
    seen = []  # the embeddings' output never requires grad: the backward stops at the steered block
    embeddings = trainer.model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda module, args, output: seen.append(output.requires_grad))
    loss, _ = trainer.bipo_loss(trainer.model, collated(trainer, range(4)), (1.0,))
    handle.remove()
    assert seen and not any(seen)
    loss.backward()
    with_grad = [name for name, param in trainer.model.named_parameters() if param.grad is not None]
    assert with_grad == ["base_model.steering_vectors.default.1"]
    assert trainer.model.base_model.steering_vectors["default"]["1"].grad.abs().sum() > 0


def test_reference_is_the_same_model_with_steering_disabled(tmp_path, tokenizer, pairs):
    base = make_model("llama")
    model = get_peft_model(base, SteeringConfig(layers=[BLOCK]))
    peft_steer.set_vectors(model, {BLOCK: _random_vector()})  # an adapter that already steers
    models_before = _live_models()
    trainer = SteerTrainer(model=model, args=fast_args(tmp_path), train_dataset=pairs, processing_class=tokenizer)

    # One model: no reference model, no "ref" adapter, no new transformers model anywhere in memory, and the
    # trainer's parameters are the base model's plus the vector.
    assert trainer.ref_model is None
    assert list(trainer.model.peft_config) == ["default"]
    assert _live_models() == models_before
    base_params = {param.data_ptr() for param in base.parameters()}
    trainer_params = {param.data_ptr() for param in trainer.model.parameters()}
    assert len(trainer_params - base_params) == 1 and base_params <= trainer_params

    # Its reference log-probs are those of the unsteered model (an independent copy), not of the steered one.
    batch = collated(trainer, range(4))
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    expected = independent_logps(make_model("llama"), batch, BLOCK, None, 0.0)
    torch.testing.assert_close(torch.cat([ref_chosen, ref_rejected]), expected, atol=1e-4, rtol=1e-5)
    steered = independent_logps(make_model("llama"), batch, BLOCK, _random_vector(), 1.0)
    assert (steered - expected).abs().max() > 1.0


def test_adapter_of_any_name_trains_without_a_ref_adapter(tmp_path, tokenizer, pairs):
    # TRL looks up an adapter named "default" to copy into a "ref" adapter; the trainer stops that for the time of
    # DPOTrainer.__init__ and leaves the model as it was.
    model = get_peft_model(make_model("llama"), SteeringConfig(layers=[BLOCK]), adapter_name="persona")
    trainer = SteerTrainer(
        model=model, args=fast_args(tmp_path, max_steps=2), train_dataset=pairs, processing_class=tokenizer
    )
    assert trainer.adapter_name == "persona" and list(model.peft_config) == ["persona"]
    assert "add_adapter" not in vars(model) and "get_parameter" not in vars(model)
    trainer.train()
    assert peft_steer.get_vectors(model, "persona")[BLOCK].abs().max() > 1e-3


def test_precompute_ref_log_probs_gives_the_same_reference(tmp_path, tokenizer, pairs):
    peft_config = SteeringConfig(layers=[BLOCK], init="random")  # a non-zero start: steering would show
    trainer = SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=3),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    assert trainer.ref_model is None
    batch = collated(trainer, range(8))
    stored = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    expected = independent_logps(make_model("llama"), batch, BLOCK, None, 0.0)
    torch.testing.assert_close(stored, expected, atol=1e-4, rtol=1e-5)
    # ... and the loss computed from them equals the loss of the on-the-fly reference.
    trainer.model.train()
    on_the_fly = {key: batch[key] for key in ("input_ids", "attention_mask", "completion_mask")}
    for d in (1.0, -1.0):
        assert trainer.bipo_loss(trainer.model, batch, (d,))[0].item() == pytest.approx(
            trainer.bipo_loss(trainer.model, on_the_fly, (d,))[0].item(), abs=1e-6
        )


def test_lora_stacked_base_keeps_lora_in_the_reference(tmp_path, tokenizer, pairs):
    base = make_model("llama")
    lora = get_peft_model(base, LoraConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8))
    with torch.no_grad():  # a LoRA that changes the model, so that dropping it from the reference would show
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(0.5 * torch.randn_like(param))
    lora_weights = {name: param.detach().clone() for name, param in lora.named_parameters() if "lora_" in name}
    trainer = SteerTrainer(
        model=lora,
        args=fast_args(tmp_path, max_steps=3),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK]),
    )
    batch = collated(trainer, range(4))
    with torch.no_grad():
        lora_only = trainer.compute_ref_log_probs(trainer.model, batch)
    # The reference keeps the LoRA on: it differs from the plain base model ...
    without_lora = independent_logps(make_model("llama"), batch, BLOCK, None, 0.0)
    assert (torch.cat(lora_only) - without_lora).abs().max() > 0.1
    # ... and equals the LoRA model itself (the vector is zero at the start, so the steered policy is the LoRA model).
    trainer.model.eval()
    with torch.no_grad():
        policy = trainer._completion_logps(trainer.model, batch, 1.0)
    torch.testing.assert_close(torch.cat(lora_only), policy, atol=1e-4, rtol=1e-5)

    trainer.train()
    assert peft_steer.get_vectors(trainer.model)[BLOCK].abs().sum() > 0
    for name, param in trainer.model.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param.detach(), lora_weights[name])


def _live_models() -> int:
    gc.collect()
    # type(), not isinstance(): isinstance reads __class__, which some lazy module proxies warn about.
    return sum(issubclass(type(obj), transformers.PreTrainedModel) for obj in gc.get_objects())
