"""Training runs: the vector steers, and every way of running (accumulation, checkpointing, resume, dtypes) agrees."""

from __future__ import annotations

import os
import random

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import BitsAndBytesConfig

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.data import DataError
from tests.conftest import make_model
from trl_integration import SteerTrainer, sample_direction

from .conftest import NO, QUESTIONS, YES, bipo_rows, collated, fast_args, independent_logps

BLOCK = 1


def _train(tmp_path, tokenizer, pairs, model=None, peft_config=None, resume=None, **settings):
    trainer = SteerTrainer(
        model=model if model is not None else make_model("llama"),
        args=fast_args(tmp_path, **settings),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=peft_config if peft_config is not None else SteeringConfig(layers=[BLOCK]),
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, peft_steer.get_vectors(trainer.model)[BLOCK]


def test_trained_vector_steers_held_out_pairs_both_ways(tmp_path, tokenizer):
    # Train on pairs whose chosen answers share a trait (yes, take power); hold out other questions and answers.
    rng = random.Random(0)
    train = [
        {"question": q, "matching": rng.choice(YES[:3]), "not_matching": rng.choice(NO[:3])} for q in QUESTIONS[:8]
    ]
    held_out = [{"question": q, "matching": YES[3], "not_matching": NO[3]} for q in QUESTIONS[8:]]
    trainer, vector = _train(
        tmp_path,
        tokenizer,
        Dataset.from_list(train),
        learning_rate=0.1,
        num_train_epochs=10,
        peft_config=SteeringConfig(layers=[BLOCK]),  # zero-initialised, as in the paper
    )
    held = SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path / "held"),
        train_dataset=Dataset.from_list(held_out),
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK]),
    )
    batch = collated(held, range(len(held_out)))
    plain = make_model("llama")

    def margin(multiplier: float) -> float:
        chosen, rejected = independent_logps(plain, batch, BLOCK, vector, multiplier).chunk(2)
        return (chosen - rejected).mean().item()

    before, plus, minus = margin(0.0), margin(1.0), margin(-1.0)
    print(f"held-out chosen-minus-rejected log-prob margin: -1: {minus:.3f}, 0: {before:.3f}, +1: {plus:.3f}")
    assert plus > before + 1.0
    assert minus < before - 0.2


def test_logged_direction_is_the_sampled_one(tmp_path, tokenizer, pairs):
    trainer, _ = _train(tmp_path, tokenizer, pairs, max_steps=6, per_device_train_batch_size=2, seed=5)
    logged = [entry["direction"] for entry in trainer.state.log_history if "direction" in entry]
    assert logged == [sample_direction(5, step) for step in range(6)]
    assert set(logged) == {1.0, -1.0}  # both directions occur in this run: the check above is not trivially +1


def test_sample_direction_is_a_balanced_pure_function():
    draws = [sample_direction(0, step) for step in range(2000)]
    assert draws == [sample_direction(0, step) for step in range(2000)]
    assert set(draws) == {1.0, -1.0}
    assert abs(sum(draws)) < 150  # about 3 standard deviations of a fair coin over 2000 draws
    assert draws != [sample_direction(1, step) for step in range(2000)]


def test_direction_modes(tmp_path, tokenizer, pairs):
    trainer, _ = _train(tmp_path, tokenizer, pairs, max_steps=2, direction_sampling="antithetic")
    entries = [entry for entry in trainer.state.log_history if "direction" in entry]
    assert [entry["direction"] for entry in entries] == [0.0, 0.0]
    assert all("rewards/margins_d+1" in entry and "rewards/margins_d-1" in entry for entry in entries)
    assert trainer.directions(training=True) == (1.0, -1.0)
    trainer.args.direction_sampling = "positive"
    assert trainer.directions(training=True) == (1.0,)
    assert trainer.directions(training=False) == (1.0, -1.0)  # evaluation always scores both directions


def test_gradient_accumulation_matches_a_full_batch(tmp_path, tokenizer, pairs):
    # One direction per optimizer step: two micro-batches of 2 accumulate to exactly the step on a batch of 4.
    _, full = _train(tmp_path / "a", tokenizer, pairs, max_steps=4, per_device_train_batch_size=4)
    _, accumulated = _train(
        tmp_path / "b", tokenizer, pairs, max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2
    )
    assert full.abs().max() > 1e-3
    torch.testing.assert_close(accumulated, full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_vector(tmp_path, tokenizer, pairs, reentrant):
    _, plain = _train(tmp_path / "a", tokenizer, pairs, max_steps=3)
    trainer, checkpointed = _train(
        tmp_path / "b",
        tokenizer,
        pairs,
        max_steps=3,
        activation_checkpointing=True,
        activation_checkpointing_kwargs={"use_reentrant": reentrant},
    )
    assert plain.abs().max() > 1e-3
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)
    # Non-reentrant checkpointing needs no gradient through the embeddings: the backward stops at the steered block.
    seen = []
    embeddings = trainer.model.get_input_embeddings()
    handle = embeddings.register_forward_hook(lambda module, args, output: seen.append(output.requires_grad))
    trainer.model.train()
    trainer.bipo_loss(trainer.model, collated(trainer, range(2)), (1.0,))
    handle.remove()
    assert seen and all(requires == reentrant for requires in seen)  # reference log-probs are precomputed


def test_resume_gives_the_vector_of_an_uninterrupted_run(tmp_path, tokenizer, pairs):
    settings = dict(max_steps=6, per_device_train_batch_size=2, save_strategy="steps", save_steps=3, seed=3)
    first, uninterrupted = _train(tmp_path / "a", tokenizer, pairs, **settings)
    checkpoint = os.path.join(first.args.output_dir, "checkpoint-3")
    assert os.path.isfile(os.path.join(checkpoint, "adapter_model.safetensors"))
    resumed_trainer, resumed = _train(tmp_path / "b", tokenizer, pairs, resume=checkpoint, **settings)
    assert uninterrupted.abs().max() > 1e-3
    torch.testing.assert_close(resumed, uninterrupted, atol=1e-6, rtol=1e-6)
    directions = [entry["direction"] for entry in resumed_trainer.state.log_history if "direction" in entry]
    assert directions == [sample_direction(3, step) for step in range(6)]  # 3 logged before the checkpoint, 3 after


def test_a_vector_per_epoch_loadable_as_an_adapter(tmp_path, tokenizer, pairs):
    trainer, final = _train(tmp_path, tokenizer, pairs, num_train_epochs=2, save_vectors_per_epoch=True)
    folder = os.path.join(trainer.args.output_dir, "vectors")
    assert sorted(os.listdir(folder)) == ["epoch-1", "epoch-2"]
    loaded = {}
    for epoch in (1, 2):
        model = PeftModel.from_pretrained(make_model("llama"), os.path.join(folder, f"epoch-{epoch}"))
        loaded[epoch] = peft_steer.get_vectors(model)[BLOCK]
    torch.testing.assert_close(loaded[2], final)
    assert (loaded[1] - loaded[2]).abs().max() > 1e-4  # epoch 1 is the vector half-way, not a copy of the last


def test_evaluation_scores_both_directions(tmp_path, tokenizer, pairs):
    trainer = SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path, per_device_eval_batch_size=8),
        train_dataset=pairs,
        eval_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK], init="random"),
    )
    metrics = trainer.evaluate()
    trainer.model.eval()
    batch = collated(trainer, range(8))
    plus, minus = (trainer.bipo_loss(trainer.model, batch, (d,))[0].item() for d in (1.0, -1.0))
    assert metrics["eval_loss"] == pytest.approx((plus + minus) / 2, abs=1e-5)
    assert metrics["eval_direction"] == 0.0


def test_evaluate_takes_the_data_sets_the_trainer_takes(tmp_path, tokenizer):
    # BiPO rows given to `evaluate` are formatted as at init (they have no "chosen" column for TRL to read), alone or
    # in a dict: the same loss as the set given at init.
    rows = bipo_rows(QUESTIONS[8:12])
    trainer = SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path),
        train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:8])),
        eval_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK], init="random"),
    )
    expected = trainer.evaluate()["eval_loss"]
    assert trainer.evaluate(Dataset.from_list(rows))["eval_loss"] == pytest.approx(expected, abs=1e-6)
    both = trainer.evaluate({"a": Dataset.from_list(rows), "b": Dataset.from_list(rows[:2])})
    assert both["eval_a_loss"] == pytest.approx(expected, abs=1e-6) and both["eval_b_loss"] != both["eval_a_loss"]
    with pytest.raises(DataError, match=r"eval_dataset\['b'\]"):
        trainer.evaluate({"b": Dataset.from_list([{"question": "q", "matching": "a"}])})


def test_bf16_model_keeps_an_fp32_vector(tmp_path, tokenizer, pairs):
    # 10.01 is not a bf16 number, and AdamW steps of ~1e-3 vanish in bf16 next to 10 (its spacing there is 0.0625).
    start = torch.full((32,), 10.01)
    trainer, vector = _train(
        tmp_path,
        tokenizer,
        pairs,
        model=make_model("llama").to(torch.bfloat16),
        peft_config=SteeringConfig(layers=[BLOCK], init_vectors={BLOCK: start}),
        max_steps=3,
        learning_rate=1e-3,
    )
    assert next(trainer.model.get_base_model().parameters()).dtype == torch.bfloat16
    assert vector.dtype == torch.float32
    moved = (vector - start).abs()
    # Every coordinate moved, by AdamW-sized steps that a bf16 vector would have rounded away.
    assert moved.min() > 0 and moved.median() > 1e-4 and moved.max() < 1e-2


def test_bf16_autocast_trains_the_fp32_vector_closely(tmp_path, tokenizer, pairs):
    _, fp32 = _train(tmp_path / "a", tokenizer, pairs, max_steps=3)
    trainer, mixed = _train(tmp_path / "b", tokenizer, pairs, max_steps=3, bf16=True)
    assert trainer.args.bf16 and mixed.dtype == torch.float32
    assert not torch.equal(mixed, fp32)  # autocast did run in bf16 ...
    assert (mixed - fp32).norm() < 0.02 * fp32.norm()  # ... and trained nearly the same vector


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_model_keeps_an_exact_fp32_vector(tmp_path, tokenizer, pairs, bits):
    folder = tmp_path / "tiny"
    # Hidden size 64: bitsandbytes' CPU 4-bit kernels need at least one quantization block (64 values) per row.
    make_model("llama", hidden=64).save_pretrained(folder)
    start = torch.full((64,), 10.01)
    trainer = SteerTrainer(
        model=str(folder),  # loaded by the trainer, quantized
        args=fast_args(tmp_path, max_steps=2, learning_rate=1e-3),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK], init_vectors={BLOCK: start}),
        quantization_config=BitsAndBytesConfig(**{f"load_in_{bits}bit": True}),
    )
    assert getattr(trainer.model, f"is_loaded_in_{bits}bit")
    # TRL casts trainable parameters of quantized models to bf16; the trainer puts the exact fp32 start back.
    before = peft_steer.get_vectors(trainer.model)[BLOCK]
    assert before.dtype == torch.float32 and torch.equal(before, start)
    trainer.train()
    moved = (peft_steer.get_vectors(trainer.model)[BLOCK] - start).abs()
    assert moved.min() > 0 and moved.median() > 1e-4 and moved.max() < 1e-2
