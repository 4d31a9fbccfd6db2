"""The trainer's duties at the Trainer's hooks: a run whose vector stops being finite ends at that step, unsaved."""

from __future__ import annotations

import os

import pytest
import torch

import peft_steer
from peft_steer import SteeringConfig
from tests.conftest import make_model
from trl_integration import NonFiniteVectorError, SteerTrainer

from .conftest import fast_args


def test_a_vector_that_stops_being_finite_ends_the_run_at_that_step(tmp_path, tokenizer, pairs):
    # AdamW moves each coordinate by about the learning rate: 1e30 after step 1 (still finite, and checkpointed),
    # then the activations overflow and step 2 leaves inf / NaN. Step 2 also ends epoch 1 (8 pairs, 4 per step).
    trainer = SteerTrainer(
        model=make_model("llama"),
        args=fast_args(
            tmp_path,
            learning_rate=1e30,
            num_train_epochs=3,
            save_strategy="steps",
            save_steps=1,
            save_vectors_per_epoch=True,
        ),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[1]),
    )
    with pytest.raises(NonFiniteVectorError, match=r"step 2\b.*block 1") as error:
        trainer.train()
    assert "learning_rate" in str(error.value)
    assert not torch.isfinite(peft_steer.get_vectors(trainer.model)[1]).all()  # the run did diverge at step 2
    output = trainer.args.output_dir
    assert sorted(name for name in os.listdir(output) if name.startswith("checkpoint-")) == ["checkpoint-1"]
    assert not os.path.exists(os.path.join(output, "vectors"))  # no vector of the bad state for epoch 1
    assert trainer.state.global_step == 2
