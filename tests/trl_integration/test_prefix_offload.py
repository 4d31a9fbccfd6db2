"""Blocks 0..L offloaded while a fully cached run trains: the same vector, every weight back bit for bit, and back
early when a forward needs them."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from transformers import BitsAndBytesConfig, TrainerCallback

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.adapter.blocks import find_block_list
from tests.conftest import ARCHITECTURES, make_model
from tests.trl_integration.conftest import QUESTIONS, bipo_rows, fast_args, no_dropout
from trl_integration import SteerTrainer
from trl_integration.prefix_offload import OffloadedBlocks
from trl_integration.prefix_plan import offload_room

BLOCK = 1


def offload_trainer(tmp_path, tokenizer, offload, model=None, callbacks=None, **settings):
    settings = {
        "max_steps": 3,
        "per_device_train_batch_size": 2,
        "prefix_cache_dir": str(tmp_path / "files"),
        **settings,
    }
    return SteerTrainer(
        model=no_dropout("llama") if model is None else model,
        args=fast_args(tmp_path / offload, offload_prefix_blocks=offload, **settings),
        train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:8])),
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK]),
        callbacks=callbacks,
    )


class Sizes(TrainerCallback):
    """At each step's end: the elements held by blocks 0..L and by block L+1."""

    def __init__(self, model: torch.nn.Module) -> None:
        _, self.blocks = find_block_list(model.get_base_model())
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        prefix = sum(p.numel() for block in self.blocks[: BLOCK + 1] for p in block.parameters())
        self.seen.append((prefix, sum(p.numel() for p in self.blocks[BLOCK + 1].parameters())))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the base model holds. Not `state_dict()`: with bitsandbytes 0.50 on the CPU it repacks 4-bit
    weights in place, which changes the model's outputs."""
    base = model.get_base_model()
    tensors = {**dict(base.named_parameters()), **dict(base.named_buffers())}
    return {name: tensor.detach().clone() for name, tensor in tensors.items() if "steering" not in name}


def assert_same_weights(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = weights(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_offloaded_training_trains_the_same_vector_and_puts_every_weight_back(tmp_path, tokenizer, arch):
    kept = offload_trainer(tmp_path, tokenizer, "off", model=no_dropout(arch))
    kept.train()
    moved = offload_trainer(tmp_path, tokenizer, "auto", model=no_dropout(arch))
    sizes = Sizes(moved.model)
    moved.add_callback(sizes)
    before = weights(moved.model)
    moved.train()

    # On the CPU "auto" writes them to a file: during training blocks 0..L hold nothing, block L+1 is untouched.
    assert len(sizes.seen) == 3
    assert all(prefix == 0 and after > 0 for prefix, after in sizes.seen)
    assert os.listdir(tmp_path / "files") == []  # the file was never linked into the folder
    assert_same_weights(moved.model, before)
    vector = peft_steer.get_vectors(moved.model)[BLOCK]
    assert vector.abs().max() > 1e-3
    assert torch.equal(vector, peft_steer.get_vectors(kept.model)[BLOCK])


def test_a_forward_outside_the_cache_brings_the_blocks_back(tmp_path, tokenizer, caplog):
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    with torch.no_grad():
        expected = no_dropout("llama")(input_ids=ids).logits

    class ForwardAtStep2(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.inference_mode(), model.disable_adapter():
                    self.logits = model(input_ids=ids).logits

    kept = offload_trainer(tmp_path, tokenizer, "off")
    kept.train()
    forward = ForwardAtStep2()
    moved = offload_trainer(tmp_path, tokenizer, "disk", callbacks=[forward])
    sizes = Sizes(moved.model)
    moved.add_callback(sizes)
    with caplog.at_level(logging.WARNING, logger="trl_integration"):
        moved.train()
    torch.testing.assert_close(forward.logits, expected, atol=0, rtol=0)
    assert [prefix > 0 for prefix, _ in sizes.seen] == [False, True, True]  # back from step 2 on
    assert any("Blocks 0..1 brought back from disk: a forward ran one of them" in r.message for r in caplog.records)
    assert not any(p.is_inference() for block in sizes.blocks[: BLOCK + 1] for p in block.parameters())
    assert torch.equal(peft_steer.get_vectors(moved.model)[BLOCK], peft_steer.get_vectors(kept.model)[BLOCK])


def test_the_weights_come_back_when_training_fails(tmp_path, tokenizer):
    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise RuntimeError("stopped at step 1")

    trainer = offload_trainer(tmp_path, tokenizer, "auto", callbacks=[Fail()])
    before = weights(trainer.model)
    with pytest.raises(RuntimeError, match="stopped at step 1"):
        trainer.train()
    assert_same_weights(trainer.model, before)
    assert os.listdir(tmp_path / "files") == []


def test_an_unwritable_folder_is_named_and_nothing_moves(tmp_path, tokenizer, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    trainer = offload_trainer(tmp_path, tokenizer, "disk", prefix_cache_dir=str(blocker / "files"))
    before = weights(trainer.model)
    with pytest.raises(OSError, match=r"Could not write blocks 0\.\.1 .*prefix_cache_dir"):
        trainer.train()
    assert_same_weights(trainer.model, before)
    assert trainer.state.global_step == 0

    # Not asked for: "auto" trains with the blocks in place and says why.
    trainer = offload_trainer(tmp_path, tokenizer, "auto", prefix_cache_dir=str(blocker / "files"))
    sizes = Sizes(trainer.model)
    trainer.add_callback(sizes)
    with caplog.at_level(logging.WARNING, logger="trl_integration"):
        trainer.train()
    assert len(sizes.seen) == 3 and all(prefix > 0 for prefix, _ in sizes.seen)
    assert any("Blocks 0..1 stay on cpu: Could not write blocks 0..1" in r.message for r in caplog.records)


def test_host_memory_is_checked_before_blocks_move_there(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    blocks = SimpleNamespace(destination="cpu", nbytes=2**62)
    assert "8 process(es) x" in offload_room(blocks)
    assert offload_room(SimpleNamespace(destination="cpu", nbytes=1)) is None


def test_blocks_stay_with_a_logged_reason_when_the_cache_fills_during_training(tmp_path, tokenizer, caplog):
    trainer = offload_trainer(tmp_path, tokenizer, "disk", precompute_ref_log_probs=False)
    sizes = Sizes(trainer.model)
    trainer.add_callback(sizes)
    with caplog.at_level(logging.WARNING, logger="trl_integration"):
        trainer.train()
    assert all(prefix > 0 for prefix, _ in sizes.seen)
    assert any("Blocks 0..1 stay on cpu: precompute_ref_log_probs=False" in r.message for r in caplog.records)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_blocks_stay_and_checkpoints_save(tmp_path, tokenizer, bits, caplog):
    folder = tmp_path / "tiny"
    make_model("llama", hidden=64).save_pretrained(folder)  # 4-bit CPU kernels need rows of at least 64 values
    trainer = SteerTrainer(
        model=str(folder),
        args=fast_args(tmp_path / "out", max_steps=2, learning_rate=1e-3, save_strategy="steps", save_steps=1),
        train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:8])),
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK]),
        quantization_config=BitsAndBytesConfig(**{f"load_in_{bits}bit": True}),
    )
    sizes = Sizes(trainer.model)
    trainer.add_callback(sizes)
    with caplog.at_level(logging.INFO, logger="trl_integration"):
        trainer.train()
    # bitsandbytes keeps views of its weights elsewhere and repacks them for the CPU: they are not offloaded
    assert all(prefix > 0 for prefix, _ in sizes.seen)
    assert any("Blocks 0..1 stay on cpu: block 0 holds quantized weights" in r.message for r in caplog.records)
    assert os.path.isfile(os.path.join(trainer.args.output_dir, "checkpoint-2", "adapter_model.safetensors"))


def test_tied_and_trainable_parameters_stay(tmp_path):
    model = no_dropout("llama").requires_grad_(False)
    _, blocks = find_block_list(model)
    blocks[0].mlp.up_proj.weight = blocks[2].mlp.up_proj.weight  # shared with a block after L
    blocks[1].input_layernorm.weight.requires_grad_(True)
    offloaded = OffloadedBlocks(model, BLOCK, "cpu", replaying=lambda: False)
    offloaded.offload()
    assert blocks[0].mlp.up_proj.weight.numel() > 0 and blocks[1].input_layernorm.weight.numel() > 0
    assert blocks[0].mlp.down_proj.weight.numel() == 0 and blocks[2].mlp.down_proj.weight.numel() > 0
    offloaded.restore()
    assert blocks[0].mlp.down_proj.weight.numel() > 0
