"""`SteerConfig`: the settings of BiPO training, a `DPOConfig` with the paper's defaults and the direction sampling."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from trl import DPOConfig

from .prefix_cache import STORAGES
from .prefix_offload import DESTINATIONS

DIRECTION_SAMPLING = ("random", "antithetic", "positive")

# The paper's runs (Cao et al. 2024, and the official code), matched on the model name: the steered block, the epoch
# whose vector was taken ("epochs", where training stops) and the length of the cosine schedule ("schedule_epochs":
# the official code runs a 100-epoch schedule and keeps one vector per epoch; its shipped vectors are those of epoch
# 20 on Llama-2-7b-chat, 10 for jailbreak, and 5 on Mistral-7B-Instruct-v0.2, where the learning rate is still 91-99%
# of its peak). "behavior_epochs" overrides "epochs" per behavior.
PAPER_PRESETS = {
    "Llama-2-7b-chat": {"layer": 15, "epochs": 20, "schedule_epochs": 100, "behavior_epochs": {"jailbreak": 10}},
    "Mistral-7B-Instruct-v0.2": {"layer": 13, "epochs": 5, "schedule_epochs": 100},
}
DEFAULT_EPOCHS = 3  # for a model the paper did not use

# DPOConfig options that change the objective away from BiPO's: SteerTrainer refuses them rather than ignore them.
_BIPO_ONLY = {
    "loss_type": (["sigmoid"], "BiPO's objective is the sigmoid loss -log sigmoid(d * beta * margin)"),
    "loss_weights": (None, "BiPO has a single loss"),
    "f_divergence_type": ("reverse_kl", "BiPO's rewards are plain log-ratios"),
    "ld_alpha": (None, "BiPO sums the log-probs over every completion token"),
    "use_weighting": (False, "BiPO weighs every pair equally"),
    "label_smoothing": (0.0, "BiPO uses hard preference labels"),
    "sync_ref_model": (False, "the reference is the model with the steering adapter disabled, which never changes"),
}


def paper_preset(model: str, behavior: str | None = None) -> dict[str, int] | None:
    """The paper's run for ``model`` (a hub id or a local folder named after it) and ``behavior``, or ``None``:
    ``{"layer": block, "epochs": the epoch of the paper's vector, "schedule_epochs": the cosine schedule's length}``.
    """
    name = model.rstrip("/").lower()
    for key, preset in PAPER_PRESETS.items():
        if key.lower() in name:
            found = {field: value for field, value in preset.items() if field != "behavior_epochs"}
            found["epochs"] = preset.get("behavior_epochs", {}).get(behavior, preset["epochs"])
            return found
    return None


@dataclass
class SteerConfig(DPOConfig):
    r"""Configuration of [`SteerTrainer`]: BiPO training of a steering vector.

    A `DPOConfig` (every `TrainingArguments` / `DPOConfig` option works as usual) whose defaults are the settings of the
    BiPO paper: beta 0.1, AdamW with learning rate 5e-4 and weight decay 0.05 (the official code leaves it at 0), a
    cosine schedule with 100 warm-up steps, 4 pairs per batch, fp32 arithmetic, no activation (gradient)
    checkpointing. The number of epochs is left to the caller; the paper's runs stop a 100-epoch schedule early
    (`schedule_epochs=100`, `num_train_epochs` 20 for Llama-2-7b-chat, 10 for its jailbreak vector, 5 for
    Mistral-7B-Instruct-v0.2; see `PAPER_PRESETS` and `docs/training.md`).

    The options of `DPOConfig` that would change the objective (`loss_type` other than `"sigmoid"`, `loss_weights`,
    `f_divergence_type`, `ld_alpha`, `use_weighting`, `label_smoothing`, `sync_ref_model`) are refused with an error.

    Parameters:
        direction_sampling (`str`, *optional*, defaults to `"random"`):
            How the direction `d` of the objective `-log sigmoid(d * beta * (r_d(y_w) - r_d(y_l)))` is chosen.
            `"random"` (the paper's): one `d` in {-1, +1} per optimizer step, drawn from `(seed, step)` only, so every
            data-parallel rank and a resumed run use the same one. `"antithetic"`: both directions on every batch, their
            losses averaged (twice the policy compute per step, no sampling noise). `"positive"`: `d = +1` only
            (a one-directional DPO on the vector).
        schedule_epochs (`float`, *optional*):
            Length of the learning-rate schedule in epochs; training stops at `num_train_epochs` (or `max_steps`).
            The official BiPO runs use a 100-epoch cosine schedule and keep the vector of an early epoch. `None`: the
            schedule ends with the training.
        save_vectors_per_epoch (`bool`, *optional*, defaults to `True`):
            Save the steering adapter at the end of every epoch to `output_dir/vectors/epoch-<n>` (as the paper's runs
            keep one vector per epoch). Each folder loads with `PeftModel.from_pretrained(base, folder)`.
    """

    # Paper / official BiPO defaults (overriding DPOConfig's and TrainingArguments').
    learning_rate: float = field(default=5e-4, metadata={"help": "AdamW learning rate (BiPO: 5e-4)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay on the vector (BiPO: 0.05)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "Learning-rate schedule (BiPO: cosine)."})
    warmup_steps: float = field(
        default=100, metadata={"help": "Linear warm-up steps (BiPO: 100); a value below 1 is a fraction of all steps."}
    )
    per_device_train_batch_size: int = field(
        default=4, metadata={"help": "Preference pairs per device and micro-batch (BiPO: 4)."}
    )
    schedule_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Length of the learning-rate schedule in epochs; training stops at num_train_epochs (or "
            "max_steps). The official BiPO runs: a 100-epoch cosine schedule, stopped at epoch 20 (Llama-2-7b-chat), "
            "10 (jailbreak) or 5 (Mistral-7B-Instruct-v0.2). Unset: the schedule ends with the training."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "Scale of the reward margin inside the sigmoid (BiPO: 0.1)."})
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bf16 mixed precision. Left unset: off (BiPO trains in fp32), or on where `accelerate launch` "
            "runs with mixed_precision: bf16 (DeepSpeed refuses a bf16 setting that disagrees with its config). Such a "
            "launch computes in bf16 even with bf16=False (transformers reads it): launch with --mixed_precision no "
            "for fp32. With a DeepSpeed config file that enables bf16 or fp16, set bf16 / fp16 to match it. To halve "
            "memory, load the model in bf16 instead; the steering vector stays fp32 either way."
        },
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Deprecated alias of `activation_checkpointing` (off by default here, unlike TRL: only the blocks "
            "after the steered one are differentiated, and their activations for short preference pairs are small)."
        },
    )

    direction_sampling: str = field(
        default="random",
        metadata={
            "help": "'random' (paper): one direction d in {-1,+1} per optimizer step, a pure function of (seed, step); "
            "'antithetic': both directions on every batch, averaged; 'positive': d = +1 only.",
            "choices": list(DIRECTION_SAMPLING),
        },
    )
    save_vectors_per_epoch: bool = field(
        default=True,
        metadata={"help": "Save the steering adapter at the end of every epoch to output_dir/vectors/epoch-<n>."},
    )
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={
            "help": "Compute the reference log-probs (steering disabled) once per example before training instead of "
            "at every step: the reference never changes. On by default here."
        },
    )
    prefix_cache: str = field(
        default="auto",
        metadata={
            "help": "Cache the output of blocks 0..L (they do not depend on the vector) once per training sequence, "
            "so that each step runs only the blocks after L: 'auto' (the accelerator if it fits in 20%% of its free "
            "memory, else host memory, else disk), 'device', 'cpu', 'disk', or 'off'. Falls back to the plain path, "
            "with a logged reason, where it cannot apply (dropout or trainable weights in blocks 0..L).",
            "choices": list(STORAGES),
        },
    )
    prefix_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of the cache file when prefix_cache='disk', and of the blocks offloaded to disk "
            "(default: a temp folder)."
        },
    )
    offload_prefix_blocks: str = field(
        default="auto",
        metadata={
            "help": "When the prefix cache holds every sequence (it is filled by the reference pass of "
            "precompute_ref_log_probs), training never runs blocks 0..L: for the time of `train()` their weights "
            "leave the model's device. 'auto' (host memory from an accelerator, a file in prefix_cache_dir from host "
            "memory), 'cpu', 'disk', or 'off'. They come back after training, or with a logged warning before any "
            "forward that needs them.",
            "choices": list(DESTINATIONS),
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.direction_sampling not in DIRECTION_SAMPLING:
            choices = ", ".join(DIRECTION_SAMPLING)
            raise ValueError(f"SteerConfig(direction_sampling={self.direction_sampling!r}): choose one of {choices}.")
        for name, (allowed, reason) in _BIPO_ONLY.items():
            if getattr(self, name) != allowed:
                raise ValueError(
                    f"SteerConfig({name}={getattr(self, name)!r}) is not supported: {reason}. Leave {name} at its "
                    f"default ({allowed!r}), or use trl.DPOTrainer for other objectives."
                )
        if self.prefix_cache not in STORAGES:
            raise ValueError(f"SteerConfig(prefix_cache={self.prefix_cache!r}): choose one of {', '.join(STORAGES)}.")
        if self.offload_prefix_blocks not in DESTINATIONS:
            raise ValueError(
                f"SteerConfig(offload_prefix_blocks={self.offload_prefix_blocks!r}): choose one of "
                f"{', '.join(DESTINATIONS)}."
            )
        _check_numbers(self)
        if self.bf16 is None:  # TRL's default would be True; BiPO's is fp32 unless the launch config asks for bf16
            self.bf16 = not self.fp16 and os.environ.get("ACCELERATE_MIXED_PRECISION") == "bf16"
        super().__post_init__()

    def schedule_steps(self, steps_per_epoch: int, training_steps: int) -> int:
        """Length of the learning-rate schedule in optimizer steps: ``schedule_epochs`` epochs of ``steps_per_epoch``
        steps, or ``training_steps`` (the training's length) when it is unset. Refuses a schedule shorter than the
        training: a cosine schedule run past its end climbs back up."""
        if self.schedule_epochs is None:
            return training_steps
        steps = math.ceil(self.schedule_epochs * steps_per_epoch)
        if steps < training_steps:
            raise ValueError(
                f"SteerConfig(schedule_epochs={self.schedule_epochs:g}) is {steps} steps of {steps_per_epoch} per "
                f"epoch, fewer than the {training_steps} training steps: the schedule must last at least as long as "
                "the training."
            )
        return steps


# SteerConfig field -> the numbers it takes: a NaN or infinite one ends in a NaN vector or an error deep inside the
# Trainer, and 0 epochs or a learning rate of 0 in an untrained vector saved as if trained. Steps below 1 are a fraction
# of all steps (TrainingArguments reads them so). `peft-steer train` checks its options by the same rules.
NUMBER_RULES = {
    "learning_rate": "above 0",
    "beta": "above 0",
    "num_train_epochs": "above 0",
    "warmup_steps": "0 or more",
    "weight_decay": "0 or more",
    "per_device_train_batch_size": "count",
    "gradient_accumulation_steps": "count",
    "max_length": "count",
    "save_steps": "steps",
    "logging_steps": "steps",
    "max_steps": "run",
}


# The largest count or step number taken: what the Trainer's loops (itertools.islice, tensor sizes) take as an index; a
# YAML 1.0e+20 otherwise fails deep inside them ("Stop argument for islice() must be None or an integer").
MAX_COUNT = 2**31 - 1


def number_problem(name: str, value: float | None, epochs: str = "num_train_epochs") -> str | None:
    """Why ``value`` cannot be the number ``name`` of `NUMBER_RULES`, or None when it can (None: left unset).
    ``epochs`` names the epochs setting in the text."""
    rule = NUMBER_RULES[name]
    if value is None:
        return None
    if rule in ("count", "steps", "run") and not (math.isfinite(value) and value <= MAX_COUNT):
        return f"must be a whole number, at most {MAX_COUNT}"
    if rule == "above 0" and not (math.isfinite(value) and value > 0):
        return "must be a finite number above 0"
    if rule == "0 or more" and not (math.isfinite(value) and value >= 0):
        return "must be a finite number, 0 or more"
    if rule == "count" and value < 1:
        return "must be a whole number, 1 or more"
    if rule == "steps" and not (0 < value < 1 or (value >= 1 and float(value).is_integer())):
        return "must be a whole number, 1 or more (or a fraction of all steps, below 1)"
    if rule == "run" and value != -1 and value < 1:
        return f"must be a whole number, 1 or more (or -1: train for {epochs})"
    return None


def _check_numbers(config: SteerConfig) -> None:
    """Refuse the numbers a run cannot train with (`NUMBER_RULES`), before ``output_dir`` exists."""
    for name in NUMBER_RULES:
        value = getattr(config, name)
        if name == "num_train_epochs" and config.max_steps > 0:
            continue  # transformers trains for max_steps then, whatever the epochs say
        problem = number_problem(name, value)
        if problem is not None:
            raise ValueError(f"SteerConfig({name}={value}) {problem}.")
    horizon = config.schedule_epochs
    if horizon is not None and not (math.isfinite(horizon) and horizon > 0):
        raise ValueError(f"SteerConfig(schedule_epochs={horizon}) must be a positive number of epochs, or None.")
    if horizon is not None and config.max_steps <= 0 and horizon < config.num_train_epochs:
        # A cosine schedule run past its end climbs back up: the schedule must last at least as long as the training.
        raise ValueError(
            f"SteerConfig(schedule_epochs={horizon:g}) is shorter than num_train_epochs={config.num_train_epochs:g}: "
            "the schedule must last at least as long as the training (None: it ends with the training)."
        )
