"""The card `SteerTrainer.push_to_hub` uploads: a PEFT steering adapter's card (not TRL's pipeline quick start), whose
quick start loads the uploaded files. Nothing reaches a hub (see tests/peft_steer/adapter/test_card.py)."""

from __future__ import annotations

import pytest

import peft_steer
from peft_steer import SteeringConfig
from tests.peft_steer.adapter.test_card import FakeHub, assert_same_vectors, check_card, run_quick_start
from trl_integration import SteerTrainer

from .conftest import fast_args


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    return FakeHub(tmp_path / "hub-cache", monkeypatch)


def test_trainer_push_to_hub_sends_a_peft_card_whose_quick_start_loads_its_files(hub, tmp_path, tokenizer, pairs):
    trainer = SteerTrainer(
        model=hub.base(tmp_path),
        args=fast_args(tmp_path, push_to_hub=True, hub_model_id="me/power-bipo", max_steps=1),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[1]),
    )
    trainer.train()
    trainer.push_to_hub()
    files = hub.uploads["me/power-bipo"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    card = check_card(files["README.md"].decode("utf-8"))
    assert {"trl", "generated_from_trainer"} <= set(card.data.tags)  # TRL's metadata is kept
    assert "1 of 4" in card.text and "## Quick start" not in card.text  # TRL's section, the pipeline(...) path
    hub.publish("me/power-bipo", files)
    namespace = run_quick_start(card.text, "me/power-bipo")
    assert repr("me/power-bipo") in card.text  # the trainer knows its repository: no placeholder
    assert_same_vectors(namespace["model"], peft_steer.get_vectors(trainer.model))


def test_a_checkpoint_card_is_the_steering_card_too(hub, tmp_path, tokenizer, pairs):
    trainer = SteerTrainer(
        model=hub.base(tmp_path),
        args=fast_args(tmp_path),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[2]),
    )
    trainer.create_model_card(model_name="power")
    card = check_card((tmp_path / "out" / "README.md").read_text(encoding="utf-8"))
    assert "2 of 4" in card.text
