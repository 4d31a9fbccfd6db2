"""Every place peft-steer touches PEFT or transformers internals, each with why, so that a release that changes one
breaks here, in one module, with a clear error (tests/peft_steer/adapter/test_registry.py and test_generation.py
watch them).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import peft
import peft.mapping
import torch
from peft import PeftModel
from torch import nn
from transformers import Cache

# The attribute of SteeringModel that holds the vectors (it carries the tuner prefix "steering_", as PEFT expects of
# every adapter attribute).
VECTORS = "steering_vectors"

# PEFT's type tables. `register_peft_method` only accepts members of PEFT's fixed `PeftType` enum, so a third-party
# type is added as a plain string key; `PeftType` is a `str` enum, so PEFT's lookups work with it.
_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def add_peft_type(name: str, config_cls: type, tuner_cls: type, prefix: str) -> None:
    """Add ``name`` to PEFT's type tables (idempotent). Raises if PEFT's internals have changed underneath."""
    entries = dict(zip(_TABLES, (config_cls, tuner_cls, prefix)))
    for table_name, entry in entries.items():
        table = getattr(peft.mapping, table_name, None)
        if not isinstance(table, dict):
            raise RuntimeError(
                f"peft-steer cannot register its adapter type: peft.mapping.{table_name} is missing in peft "
                f"{peft.__version__}. peft-steer is tested with peft 0.21; install a version it supports."
            )
        current = table.get(name)
        if current is not None and not _same(current, entry):
            raise RuntimeError(f"Another package already registered a PEFT type named {name!r}: {current!r}.")
        table[name] = entry


def _same(registered: object, ours: object) -> bool:
    # equal, or the same class imported again (e.g. after importlib.reload)
    return registered == ours or (
        getattr(registered, "__qualname__", None) == getattr(ours, "__qualname__", "")
        and getattr(registered, "__module__", None) == getattr(ours, "__module__", "")
    )


def add_card_to_push_to_hub(card_writer: Callable[[PeftModel, str], bool]) -> None:
    """Make ``PeftModel.push_to_hub`` call ``card_writer(model, folder)`` on the folder it uploads (idempotent).

    transformers' ``push_to_hub`` (which PeftModel inherits) replaces the README.md that ``save_pretrained`` wrote with
    the repository's card or a generic one; its private ``_upload_modified_files`` is the one step that sees the
    folder about to be uploaded. ``card_writer`` returns False for models it leaves alone.
    """
    push_to_hub = PeftModel.push_to_hub
    if getattr(push_to_hub, "_adds_steering_card", False):
        return

    @functools.wraps(push_to_hub)
    def wrapper(self, *args, **kwargs):
        upload = self._upload_modified_files

        def upload_with_card(working_dir, *upload_args, **upload_kwargs):
            card_writer(self, working_dir)
            return upload(working_dir, *upload_args, **upload_kwargs)

        self._upload_modified_files = upload_with_card  # for this call only
        try:
            return push_to_hub(self, *args, **kwargs)
        finally:
            del self._upload_modified_files

    wrapper._adds_steering_card = True
    PeftModel.push_to_hub = wrapper


@contextmanager
def own_peft_config(model: nn.Module) -> Iterator[None]:
    """Hide a LoRA's ``peft_config`` on ``model`` while a steering tuner is created around it.

    `BaseTuner.__init__` looks up ``peft_config`` through the wrapped model; a LoRA underneath keeps its own configs
    there, which BaseTuner would otherwise extend and then overwrite with the steering ones.
    """
    lora_configs = model.__dict__.pop("peft_config", None)
    try:
        yield
    finally:
        if lora_configs is not None:
            model.peft_config = lora_configs


def drop_peft_config(model: nn.Module, configs: dict) -> None:
    """Remove the ``peft_config`` that `BaseTuner` set on the wrapped model, if it is ``configs`` (unload)."""
    if model.__dict__.get("peft_config") is configs:
        del model.peft_config


def saved_vector_key(block: int) -> str:
    """The key of block ``block``'s vector in PEFT's saved ``adapter_model.safetensors`` (adapter name removed)."""
    return f"base_model.{VECTORS}.{block}"


def block_of_saved_key(key: str) -> int | None:
    """The block of a saved vector key (see `saved_vector_key`), or None for a key that is no steering vector."""
    block = key.rsplit(".", 1)[-1]
    return int(block) if f".{VECTORS}." in f".{key}" and block.isdigit() else None


def first_column(args: tuple, kwargs: dict) -> int:
    """Column, in the whole (padded) sequence, of the first token that a forward call with these inputs processes.

    0 for a full forward; the number of cached tokens for a KV-cached generation step. Read from public inputs only,
    never from how ``generate`` names or fills them (transformers 5.24 renamed ``past_key_values`` to ``cache`` and
    stopped passing an all-ones attention mask): a 2-D attention mask covers the cached and the new tokens; without
    one, a ``Cache`` passed under any keyword holds the tokens before this call; with neither, the call sees the
    whole sequence.
    """
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    if tokens is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.shape[1] - tokens.shape[1]
    cache = next((value for value in kwargs.values() if isinstance(value, Cache)), None)
    return int(cache.get_seq_length()) if cache is not None else 0


def data_parallel_replica(module: nn.Module, **carried: object) -> nn.Module:
    """The copy of ``module`` that nn.DataParallel runs on one device, with ``carried`` set on it as attributes.

    nn.DataParallel (which the transformers Trainer uses on several GPUs without a launcher) copies every module with
    torch's private ``Module._replicate_for_data_parallel``, in the caller's thread, then runs each copy in a new
    thread, whose context is empty: a module that overrides that method with this one hands the copy what the
    caller's context holds.
    """
    replica = nn.Module._replicate_for_data_parallel(module)
    for name, value in carried.items():
        setattr(replica, name, value)
    return replica


__all__ = [
    "VECTORS",
    "add_card_to_push_to_hub",
    "add_peft_type",
    "block_of_saved_key",
    "data_parallel_replica",
    "drop_peft_config",
    "first_column",
    "own_peft_config",
    "saved_vector_key",
]
