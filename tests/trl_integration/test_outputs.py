"""What the trainer writes survives failures: a save cut short leaves no folder that loads, and resuming skips a
checkpoint cut off while being written."""

from __future__ import annotations

import errno
import logging
import os

import pytest
import torch
from peft import PeftModel

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import make_model
from tests.trl_integration.conftest import fail_weight_writes
from trl_integration import SteerTrainer
from trl_integration.outputs import staged_folder

from .conftest import fast_args

BLOCK = 1


def _trainer(tmp_path, tokenizer, pairs, **settings) -> SteerTrainer:
    return SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path, **settings),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK]),
    )


def _loads(folder) -> bool:
    try:
        PeftModel.from_pretrained(make_model("llama"), folder)
    except Exception:  # noqa: BLE001 - any failure to load is what is checked for
        return False
    return True


def _leftovers(folder) -> list[str]:
    return [name for name in os.listdir(folder) if "partial" in name]


def test_a_full_disk_while_writing_the_weights_leaves_no_final_adapter(tmp_path, tokenizer, pairs, monkeypatch):
    trainer = _trainer(tmp_path, tokenizer, pairs, max_steps=1)
    trainer.train()
    output = trainer.args.output_dir
    fail_weight_writes(monkeypatch, when=lambda path: True)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.save_model(output)
    assert not os.path.exists(os.path.join(output, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(output, "README.md"))
    assert not _loads(output) and not _leftovers(tmp_path)


def test_a_full_disk_after_the_weights_leaves_no_adapter_that_loads(tmp_path, tokenizer, pairs, monkeypatch):
    # The adapter files are whole, but the tokenizer written after them is not: the folder must not load as if the
    # save had succeeded.
    trainer = _trainer(tmp_path, tokenizer, pairs, max_steps=1)
    trainer.train()
    output = trainer.args.output_dir

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.save_model(output)
    assert not _loads(output) and os.listdir(output) == [] and not _leftovers(tmp_path)
    monkeypatch.undo()
    trainer.save_model(output)  # once there is room again
    assert _loads(output) and not _leftovers(tmp_path)


def test_a_full_disk_at_an_epoch_vector_leaves_no_folder_for_that_epoch(tmp_path, tokenizer, pairs, monkeypatch):
    trainer = _trainer(tmp_path, tokenizer, pairs, num_train_epochs=2, save_vectors_per_epoch=True)
    fail_weight_writes(monkeypatch, when=lambda path: "epoch-2" in path)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    vectors = os.path.join(trainer.args.output_dir, "vectors")
    assert os.listdir(vectors) == ["epoch-1"]
    assert _loads(os.path.join(vectors, "epoch-1"))


def test_a_staged_folder_replaces_an_earlier_one_whole_or_not_at_all(tmp_path):
    target = tmp_path / "epoch-1"
    target.mkdir()
    for name, text in {"adapter_config.json": "old", "adapter_model.safetensors": "old", "notes.txt": "kept"}.items():
        (target / name).write_text(text)
    with pytest.raises(OSError):
        with staged_folder(str(target)) as staging:
            (tmp_path / staging / "adapter_model.safetensors").write_text("new, cut short")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert (target / "adapter_config.json").read_text() == "old"
    assert (target / "adapter_model.safetensors").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["epoch-1"]
    with staged_folder(str(target)) as staging:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (tmp_path / staging / name).write_text("new")
    assert {name: (target / name).read_text() for name in os.listdir(target)} == {
        "adapter_config.json": "new",
        "adapter_model.safetensors": "new",
        "notes.txt": "kept",  # a folder that holds more (the run's output folder) keeps the rest
    }
    assert sorted(os.listdir(tmp_path)) == ["epoch-1"]


def test_resume_skips_a_checkpoint_cut_off_while_being_written(tmp_path, tokenizer, pairs, caplog):
    settings = dict(max_steps=6, per_device_train_batch_size=2, save_strategy="steps", save_steps=3, seed=3)
    first = _trainer(tmp_path / "a", tokenizer, pairs, **settings)
    first.train()
    uninterrupted = peft_steer.get_vectors(first.model)[BLOCK]
    output = first.args.output_dir
    newest = os.path.join(output, "checkpoint-6")
    # As a kill while checkpoint-6 was written leaves it: the weights cut short, trainer_state.json not yet there.
    os.remove(os.path.join(newest, "trainer_state.json"))
    with open(os.path.join(newest, "adapter_model.safetensors"), "r+b") as file:
        file.truncate(40)
    resumed = _trainer(tmp_path / "a", tokenizer, pairs, **settings)
    with caplog.at_level(logging.WARNING, logger="trl_integration"):
        resumed.train(resume_from_checkpoint=True)
    message = " ".join(record.getMessage() for record in caplog.records)
    assert "checkpoint-3" in message and "checkpoint-6 is incomplete" in message
    torch.testing.assert_close(peft_steer.get_vectors(resumed.model)[BLOCK], uninterrupted, atol=1e-6, rtol=1e-6)
    os.remove(os.path.join(newest, "trainer_state.json"))
    with pytest.raises(ValueError, match="checkpoint-6 is incomplete"):
        _trainer(tmp_path / "a", tokenizer, pairs, **settings).train(resume_from_checkpoint=newest)
    os.remove(os.path.join(output, "checkpoint-3", "trainer_state.json"))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        _trainer(tmp_path / "a", tokenizer, pairs, **settings).train(resume_from_checkpoint=True)
