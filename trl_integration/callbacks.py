"""`SteerCallback`: the trainer's duties that need the Trainer's hooks, and the stop of a run whose vector diverged."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import TrainerCallback

from ._trl_compat import drop_input_grads
from .sharding import gathered

if TYPE_CHECKING:
    from .trainer import SteerTrainer


class NonFiniteVectorError(FloatingPointError):
    """A training step left the steering vector with an inf or NaN coordinate; the run stops there, unsaved."""


class SteerCallback(TrainerCallback):
    """Training-time duties of the trainer that need the Trainer's hooks."""

    def __init__(self, trainer: SteerTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        drop_input_grads(self.trainer)  # `train()` has just enabled activation checkpointing again

    # After the optimizer step and before the Trainer saves a checkpoint or this callback an epoch's vector of it:
    # a vector that is no longer finite stops the run before any of it reaches a folder that loads.
    def on_step_end(self, args, state, control, **kwargs):
        check_finite_vectors(self.trainer, state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        # One vector per completed epoch, as the paper's runs keep them (not for an epoch cut short by max_steps).
        epoch = round(state.epoch)
        if args.save_vectors_per_epoch and epoch >= 1 and abs(state.epoch - epoch) < 1e-6:
            self.trainer.save_epoch_vectors(epoch)


def check_finite_vectors(trainer: SteerTrainer, step: int) -> None:
    """Raise `NonFiniteVectorError`, naming ``step`` and the blocks, if a vector of the trained adapter has an inf or
    NaN coordinate. A collective under FSDP / ZeRO-3 (each rank checks the whole vector): call it on every rank."""
    vectors = trainer.steering_model.vectors_of(trainer.adapter_name)
    with gathered(list(vectors.values())) as whole:
        bad = [block for block, vector in zip(vectors, whole) if not torch.isfinite(vector).all()]
    if bad:
        blocks = ", ".join(str(block) for block in bad)
        raise NonFiniteVectorError(
            f"Training stopped at step {step}: the steering vector of block {blocks} is not finite (inf or NaN) after "
            f"that step's update, so nothing of it was saved. Lower learning_rate ({trainer.args.learning_rate:g}) "
            "or beta, or resume from an earlier checkpoint."
        )
