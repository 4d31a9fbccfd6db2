"""The prefix-activation cache gives the plain path's loss and vector, skips blocks 0..L, and falls back cleanly."""

from __future__ import annotations

import logging

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import ARCHITECTURES, make_model
from tests.trl_integration.conftest import QUESTIONS, bipo_rows, collated, fast_args, no_dropout
from trl_integration import SteerTrainer, prefix_plan


def trainer_for(tmp_path, tokenizer, cache, arch="llama", layers=(1,), positions="all", **settings):
    model = no_dropout(arch)
    torch.manual_seed(0)
    trainer = SteerTrainer(
        model=model,
        args=fast_args(tmp_path / cache, prefix_cache=cache, **settings),
        train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:8])),
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=list(layers), positions=positions),
    )
    generator = torch.Generator().manual_seed(1)
    peft_steer.set_vectors(trainer.model, {b: 0.05 * torch.randn(32, generator=generator) for b in layers})
    return trainer


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_cached_loss_equals_plain_loss_on_every_architecture(tmp_path, tokenizer, arch):
    plain = trainer_for(tmp_path, tokenizer, "off", arch)
    cached = trainer_for(tmp_path, tokenizer, "cpu", arch)
    assert plain._prefix_cache is None and cached._prefix_cache is not None
    batch = collated(plain, range(4))
    for direction in (1.0, -1.0):
        expected, _ = plain.bipo_loss(plain.model, batch, (direction,))
        got, _ = cached.bipo_loss(cached.model, batch, (direction,))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("storage, positions, layers", [("cpu", "completion", (1,)), ("disk", "all", (1, 2))])
def test_cached_loss_with_completion_positions_disk_storage_and_two_blocks(
    tmp_path, tokenizer, storage, positions, layers
):
    plain = trainer_for(tmp_path, tokenizer, "off", layers=layers, positions=positions)
    cached = trainer_for(tmp_path, tokenizer, storage, layers=layers, positions=positions)
    assert cached._prefix_cache.storage == storage and cached._prefix_cache.block == min(layers)
    batch = collated(plain, range(4))
    expected, _ = plain.bipo_loss(plain.model, batch, (1.0, -1.0))
    got, _ = cached.bipo_loss(cached.model, batch, (1.0, -1.0))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_trained_vectors_agree_and_training_steps_skip_the_prefix(tmp_path, tokenizer):
    vectors = {}
    for cache in ("off", "auto"):
        trainer = trainer_for(tmp_path, tokenizer, cache, max_steps=6, per_device_train_batch_size=2)
        calls = []
        block0 = trainer.model.get_base_model().model.layers[0]
        handle = block0.register_forward_pre_hook(lambda module, args, calls=calls: calls.append(1))
        before = len(trainer._prefix_cache.entries) if trainer._prefix_cache else None
        trainer.train()
        handle.remove()
        vectors[cache] = peft_steer.get_vectors(trainer.model)[1]
        if cache == "auto":
            assert before == 16  # every chosen and rejected sequence, filled by the reference pass
        else:
            assert len(calls) == 6  # the plain path runs block 0 at every step
    assert vectors["off"].abs().max() > 1e-3
    torch.testing.assert_close(vectors["auto"], vectors["off"], atol=1e-6, rtol=1e-5)


def test_the_prefix_blocks_do_no_work_in_a_cached_step(tmp_path, tokenizer):
    trainer = trainer_for(tmp_path, tokenizer, "cpu")
    attention_calls = []
    attention = trainer.model.get_base_model().model.layers[0].self_attn
    handle = attention.register_forward_hook(lambda module, args, output: attention_calls.append(1))
    trainer.bipo_loss(trainer.model, collated(trainer, range(4)), (1.0,))
    handle.remove()
    assert attention_calls == []
    later = trainer.model.get_base_model().model.layers[2].self_attn
    handle = later.register_forward_hook(lambda module, args, output: attention_calls.append(1))
    trainer.bipo_loss(trainer.model, collated(trainer, range(4)), (1.0,))
    handle.remove()
    assert attention_calls == [1]


def test_size_estimate_is_logged_first(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="trl_integration.prefix_plan"):
        trainer_for(tmp_path, tokenizer, "auto")
    notes = [r for r in caplog.records if "Prefix cache: the output of blocks 0..1" in r.message and "MiB" in r.message]
    assert notes and all(r.levelno == logging.INFO for r in notes)  # a routine note, not a warning


def test_an_eval_set_counts_in_the_size_and_the_storage(tmp_path, tokenizer, caplog, monkeypatch):
    # Evaluation fills the cache too, so 'auto' chooses the storage for the train and eval sets together: here the
    # eval set tips the total from host memory to disk.
    sizes = []

    def choose_storage(requested, size, device):
        sizes.append(size)
        return "cpu" if len(sizes) == 1 else "disk"

    monkeypatch.setattr(prefix_plan, "choose_storage", choose_storage)
    evaluation = bipo_rows(QUESTIONS[8:12])
    with caplog.at_level(logging.INFO, logger="trl_integration.prefix_plan"):
        trainer = SteerTrainer(
            model=no_dropout("llama"),
            args=fast_args(tmp_path, prefix_cache="auto", max_steps=2, eval_strategy="steps", eval_steps=2),
            train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:8])),
            eval_dataset=Dataset.from_list(evaluation),
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[1]),
        )
    train_size, total = sizes
    assert 0 < train_size < total and "the eval dataset adds about" in caplog.text
    assert trainer._prefix_cache.storage == "disk"
    trainer.train()
    # 8 train and 4 eval pairs, chosen and rejected: 24 sequences, whose float32 outputs take exactly the estimate
    assert len(trainer._prefix_cache.entries) == 24 and trainer._prefix_cache.nbytes == total
    # `evaluate` prepares its set again: counted once, and the filled cache keeps its storage and entries
    trainer.evaluate(eval_dataset=Dataset.from_list(evaluation))
    assert len(sizes) == 2 and trainer._prefix_cache.storage == "disk" and len(trainer._prefix_cache.entries) == 24
    assert f"{total / 2**20:.1f} MiB in all" in caplog.text


def test_falls_back_with_a_reason(tmp_path, tokenizer, caplog):
    with caplog.at_level(logging.INFO, logger="trl_integration.prefix_plan"):
        gpt2 = SteerTrainer(
            model=make_model("gpt2"),  # GPT-2 has dropout: its prefix is random in training
            args=fast_args(tmp_path / "gpt2"),
            train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:4])),
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[1]),
        )
    assert gpt2._prefix_cache is None
    off = [r for r in caplog.records if "Prefix cache off: dropout is active in blocks 0..1" in r.message]
    assert off and all(r.levelno == logging.INFO for r in off)  # prefix_cache='auto': a note

    lora = get_peft_model(no_dropout("llama"), LoraConfig(r=2, target_modules=["q_proj"]))
    steered = get_peft_model(lora, SteeringConfig(layers=[1]))
    for name, parameter in steered.named_parameters():
        if "lora_A" in name and ".layers.0." in name:
            parameter.requires_grad_(True)  # a LoRA in block 0 that would train alongside
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trl_integration.prefix_plan"):
        trainer = SteerTrainer(
            model=steered,
            args=fast_args(tmp_path / "lora"),
            train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:4])),
            processing_class=tokenizer,
        )
    assert trainer._prefix_cache is None
    assert any("have trainable parameters" in r.message for r in caplog.records)
