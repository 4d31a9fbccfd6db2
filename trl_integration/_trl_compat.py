"""Every place that relies on how TRL's `DPOTrainer` or transformers' `Trainer` work inside (checked against TRL 1.16
and transformers 5.24), so that a change there shows up in one module. The overrides of private methods themselves
(`_prepare_dataset`, `_precompute_ref_logps`) have to stay on the trainer class."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import TrlParser

__all__ = [
    "checkpoint_problem",
    "checkpoints",
    "close_progress_bars",
    "completion_logps",
    "completion_token_logps",
    "drop_input_grads",
    "is_checkpoint_folder",
    "is_complete_checkpoint",
    "no_ref_adapter",
    "prepare_inputs",
    "record_metrics",
    "trl_parser_options",
    "update_steps_per_epoch",
]


@contextmanager
def no_ref_adapter(model: PeftModel, adapter_name: str) -> Iterator[None]:
    """Stop `DPOTrainer.__init__` from building a "ref" adapter, for the time of that call only.

    Given a PeftModel and no `ref_model`, TRL reads ``model.peft_config["default"]``, adds an adapter "ref" with that
    config and copies every parameter named ".default." into its ".ref." twin. For BiPO that copy would be a steered
    reference, it fails on the parameters of a LoRA underneath (they have no ".ref." twin), and a second model given
    as `ref_model` instead would be prepared (and, under FSDP or DeepSpeed, sharded) a second time. Here "default"
    names the trained adapter, adding "ref" does nothing and each ".ref." parameter is its ".default." original, so
    TRL's copy writes every parameter onto itself. The instance attributes are removed afterwards.
    """
    configs = model.peft_config
    alias = "default" not in configs
    if alias:
        configs["default"] = configs[adapter_name]
    add_adapter, get_parameter = model.add_adapter, model.get_parameter

    def add_adapter_except_ref(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "ref" else add_adapter(name, *args, **kwargs)

    def original_of_ref(target: str) -> nn.Parameter:
        return get_parameter(target.replace(".ref.", ".default."))

    model.add_adapter, model.get_parameter = add_adapter_except_ref, original_of_ref
    try:
        yield
    finally:
        del model.add_adapter, model.get_parameter  # the class's methods again
        if alias:
            del configs["default"]


def drop_input_grads(trainer: Any) -> None:
    """Undo "input embeddings require grad", which TRL (in `__init__`) and `train()` set for activation checkpointing.

    Reentrant checkpointing needs it; the non-reentrant kind (transformers' default) does not, and with it every
    backward would run down through the blocks below the steered one, whose outputs do not depend on the vector. Call
    it after each of the two, because each registers new hooks and forgets the earlier ones.
    """
    args = trainer.args
    if args.gradient_checkpointing and not (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        trainer.accelerator.unwrap_model(trainer.model).disable_input_require_grads()


def completion_token_logps(model: nn.Module, peft_model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probs of each row's completion tokens, ``[rows, width - 1]`` (column t scores the token of column
    t + 1, zero where it is not a completion token), in the model's dtype; the LM head runs on those positions only.

    ``model`` is what the trainer calls (possibly wrapped: DDP, a DeepSpeed engine), ``peft_model`` the PeftModel
    inside it. TRL's fused LM head (patched into the causal LM by `DPOTrainer.__init__`) runs the backbone
    (``causal_lm.base_model``), then, without materialising the logits, scores labels against the backbone's
    ``last_hidden_state``: pre-shifted ``shift_labels`` position by position, as under sequence parallelism. It drops
    the ``-100`` positions before its LM head on Triton devices only, and scores every position elsewhere (the CPU).
    Here a forward hook on the backbone hands it the hidden states of the completion positions only, ``[1, n,
    hidden]``, with their labels as ``shift_labels`` ``[1, n]``, on every device: the blocks still run on every
    position, the LM head (with the model's soft-capping and logit scale, which TRL applies) on those ``n``. The
    result equals TRL's own all-position call token for token.
    """
    completion_mask = batch["completion_mask"]
    scored = completion_mask[:, 1:] != 0  # hidden state of column t predicts the token of column t + 1
    shift_labels = batch["input_ids"][:, 1:][scored][None]
    with _completion_hidden_states(peft_model.get_base_model(), scored):
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            shift_labels=shift_labels,
            use_cache=False,
            fused_lm_head=True,
        )
    return outputs.log_probs.new_zeros(scored.shape).masked_scatter(scored, outputs.log_probs[0])


def completion_logps(model: nn.Module, peft_model: PeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs of each row's completion tokens (``completion_mask``), in the model's dtype; see
    `completion_token_logps`."""
    return completion_token_logps(model, peft_model, batch).sum(dim=1)


@contextmanager
def _completion_hidden_states(causal_lm: nn.Module, scored: torch.Tensor) -> Iterator[None]:
    """Within the block, the backbone that TRL's fused forward runs (``base_model``, transformers >= 5) returns only
    the ``scored`` positions of its ``last_hidden_state[:, :-1]``, as one row ``[1, n, hidden]``."""

    def keep_scored(module: nn.Module, args: Any, output: Any) -> Any:
        output["last_hidden_state"] = output.last_hidden_state[:, :-1][scored.to(output.last_hidden_state.device)][None]
        return output

    handle = causal_lm.base_model.register_forward_hook(keep_scored)
    try:
        yield
    finally:
        handle.remove()


def record_metrics(trainer: Any, mode: str, metrics: dict[str, float]) -> None:
    """Queue metrics for `DPOTrainer.log`, which averages what was queued since the last log line."""
    for name, value in metrics.items():
        trainer._metrics[mode][name].append(value)


def prepare_inputs(trainer: Any, inputs: dict[str, Any]) -> dict[str, Any]:
    """A collated batch on the trainer's device, as `Trainer` prepares it before `compute_loss`."""
    return trainer._prepare_inputs(inputs)


def checkpoints(folder: str) -> list[str]:
    """The ``checkpoint-<step>`` folders of ``folder``, oldest step first, as `Trainer` finds them to resume."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [
        (int(match.group(1)), os.path.join(folder, name))
        for name in (os.listdir(folder) if os.path.isdir(folder) else [])
        if (match := pattern.match(name)) and os.path.isdir(os.path.join(folder, name))
    ]
    return [path for _, path in sorted(found)]


def is_complete_checkpoint(folder: str) -> bool:
    """Whether `Trainer` finished writing the checkpoint ``folder`` (see `checkpoint_problem`)."""
    return checkpoint_problem(folder) is None


def checkpoint_problem(folder: str) -> str | None:
    """Why `Trainer` cannot resume from the checkpoint ``folder``, or None when it can.

    `Trainer._save_checkpoint` writes straight into ``checkpoint-<step>`` (no temporary folder): the adapter, then
    the optimizer, scheduler and RNG states, and ``trainer_state.json`` last. A folder without it was cut off while
    being written; one whose state does not parse (0 bytes after a full disk) too, and resuming from either fails.
    """
    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return f"no {TRAINER_STATE_NAME}: it was cut off while being written"
    try:
        with open(path, encoding="utf-8") as file:
            if isinstance(json.load(file), dict):
                return None
    except (OSError, ValueError, RecursionError):
        pass
    return f"its {TRAINER_STATE_NAME} does not parse: it was cut off while being written (a full disk?)"


def is_checkpoint_folder(folder: str) -> bool:
    """Whether ``folder`` is a checkpoint of a run, complete or not: named ``checkpoint-<step>``, or holding a
    ``trainer_state.json``."""
    name = os.path.basename(os.path.normpath(folder))
    return bool(re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", name)) or os.path.exists(
        os.path.join(folder, TRAINER_STATE_NAME)
    )


def close_progress_bars(trainer: Any) -> None:
    """Close the progress bars of `ProgressCallback`, which only `on_train_end` / `on_evaluate` close: after a run
    that raised, an open bar leaves its line unfinished and the error would be printed on the end of it."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ProgressCallback):
            for name in ("training_bar", "prediction_bar"):
                if getattr(callback, name, None) is not None:
                    getattr(callback, name).close()
                    setattr(callback, name, None)


def trl_parser_options(config_class: type) -> list[tuple[list[str], dict[str, Any]]]:
    """The ``add_argument`` calls that `trl.TrlParser` makes for ``config_class``: its flags and keywords.

    Recorded by overriding ``add_argument``, which `HfArgumentParser` (TrlParser's base) calls once per dataclass
    field: the command line then takes each field as `trl dpo` does, with TRL's types, choices and help.
    """
    calls: list[tuple[list[str], dict[str, Any]]] = []

    class Recorder(TrlParser):
        def add_argument(self, *flags: str, **kwargs: Any) -> argparse.Action:
            calls.append((list(flags), dict(kwargs)))
            return super().add_argument(*flags, **kwargs)

    Recorder(config_class, add_help=False)
    return calls


def update_steps_per_epoch(trainer: Any) -> int:
    """Optimizer steps in one epoch, as `Trainer.set_initial_training_values` counts them from the train dataloader:
    batches of ``_train_batch_size`` pairs (a short last one dropped with ``dataloader_drop_last``), shared out
    between the processes as accelerate does (each gets as many, ``even_batches``), grouped by
    ``gradient_accumulation_steps``. Counted without a dataloader: preparing one draws from the global random state.
    """
    args = trainer.args
    if not hasattr(trainer.train_dataset, "__len__"):
        raise ValueError("schedule_epochs needs a train_dataset with a length (not streamed): set it to None.")
    batch, processes = trainer._train_batch_size, trainer.accelerator.num_processes
    pairs = len(trainer.train_dataset)
    batches = pairs // batch if args.dataloader_drop_last else (pairs + batch - 1) // batch
    if processes > 1:
        batches = batches // processes if args.dataloader_drop_last else (batches + processes - 1) // processes
    accumulation = args.gradient_accumulation_steps
    return max((batches + accumulation - 1) // accumulation, 1)
