"""Runtime control of steering: strength, direction, vectors, prompt boundaries. Every helper takes the PeftModel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import checked_multiplier
from .context import Multiplier, prompt_ends, strengths
from .model import SteeringModel, check_vector


def steering_model(model: nn.Module) -> SteeringModel:
    """The `SteeringModel` inside ``model`` (a PeftModel from ``get_peft_model(..., SteeringConfig(...))``)."""
    if has_steering(model):
        return model if isinstance(model, SteeringModel) else model.base_model
    raise ValueError(
        f"{type(model).__name__} has no steering adapter: create one with get_peft_model(model, SteeringConfig(...)) "
        "or load one with PeftModel.from_pretrained(model, path) after `import peft_steer`."
    )


def has_steering(model: nn.Module) -> bool:
    """Whether ``model`` (a PeftModel, or the tuner itself) holds a steering adapter."""
    return isinstance(model, SteeringModel) or isinstance(getattr(model, "base_model", None), SteeringModel)


def _adapter_names(tuner: SteeringModel, adapter_name: str | None) -> list[str]:
    if adapter_name is not None:
        tuner.check_adapter_names([adapter_name])
        return [adapter_name]
    if not tuner.active_adapters:
        raise ValueError(
            f"The model has no active steering adapter (its adapters: {sorted(tuner.peft_config)}): activate one with "
            "model.set_adapter(name), or name the one to scale with adapter_name=..."
        )
    return list(tuner.active_adapters)


@contextmanager
def steering(model: nn.Module, multiplier: Multiplier = 1.0, adapter_name: str | None = None) -> Iterator[None]:
    """Steer with ``multiplier`` inside the block, for the calling thread or asyncio task only.

    Args:
        model: The PeftModel holding the steering adapter(s).
        multiplier: The strength; its sign picks the direction. A float, or a 1-D tensor with one value per batch
            row (different users, different strengths in one batch).
        adapter_name: The adapter to scale; ``None`` scales every active adapter.

    Thread safety: the strength belongs to the current `contextvars` context (the thread, or the asyncio task), not
    to the model. Blocks in concurrent threads or tasks each steer one shared model at their own strength, blocks
    nest, and each block's exit removes only its own strength, in whatever order blocks close. A forward outside any
    block uses the stored strength (``set_multiplier``, saved as ``SteeringConfig.multiplier``), which no block ever
    changes. Work that copies the context carries the block along (asyncio tasks created inside it,
    ``asyncio.to_thread``, nn.DataParallel's replicas); a ``threading.Thread`` or an executor started inside it does
    not: enter ``steering()`` in that thread's function, or run it with ``contextvars.copy_context().run``. The
    model's other state (vectors, active adapters, stored strengths) is shared: change it while no forward runs.

    Example:
        >>> with peft_steer.steering(model, multiplier=-2.0):
        ...     model.generate(**inputs)
    """
    tuner = steering_model(model)
    names = _adapter_names(tuner, adapter_name)
    value = checked_multiplier(multiplier)
    with strengths(tuner, dict.fromkeys(names, value)):
        yield


def set_multiplier(model: nn.Module, value: Multiplier, adapter_name: str | None = None) -> None:
    """Set the stored strength of an adapter (``None``: every active one) until changed again, for every thread.

    A float also becomes the adapter's saved default (``SteeringConfig.multiplier``); a per-row tensor applies at
    run time only. An open ``steering()`` block keeps its own strength until it closes.
    """
    tuner = steering_model(model)
    value = checked_multiplier(value)
    for name in _adapter_names(tuner, adapter_name):
        tuner.multipliers[name] = value
        if isinstance(value, float):
            tuner.peft_config[name].multiplier = value


def get_multiplier(model: nn.Module, adapter_name: str = "default") -> Multiplier:
    """The strength of an adapter for the caller: its innermost open ``steering()`` block here, else the stored one."""
    tuner = steering_model(model)
    return tuner.multiplier_of(_adapter_names(tuner, adapter_name)[0])


def get_vectors(model: nn.Module, adapter_name: str = "default") -> dict[int, torch.Tensor]:
    """Block index -> a detached float32 copy of the adapter's vector at that block."""
    vectors = steering_model(model).vectors_of(adapter_name)
    return {int(block): vector.detach().clone() for block, vector in vectors.items()}


def set_vectors(model: nn.Module, vectors: dict[int, torch.Tensor], adapter_name: str = "default") -> None:
    """Overwrite the adapter's vectors at the given blocks (negative indices count from the end).

    Every vector is checked first (block steered by this adapter, shape, finite values); on an error nothing
    changes.
    """
    tuner = steering_model(model)
    own = tuner.vectors_of(adapter_name)
    config = tuner.peft_config[adapter_name]
    resolved = {}
    for block, vector in vectors.items():
        index = block % config.num_blocks if -config.num_blocks <= block < 0 else block
        if str(index) not in own:
            raise ValueError(
                f"set_vectors: adapter {adapter_name!r} steers blocks {sorted(config.layers)}, not block {block}."
            )
        check_vector(torch.as_tensor(vector), index, config.hidden_size, "set_vectors")
        resolved[index] = torch.as_tensor(vector)
    with torch.no_grad():
        for index, vector in resolved.items():
            own[str(index)].copy_(vector.to(own[str(index)].device, torch.float32))


@contextmanager
def prompt_lengths(model: nn.Module, lengths: torch.Tensor) -> Iterator[None]:
    """Tell adapters with ``positions='completion'`` where each row's prompt ends, for a plain forward.

    ``lengths[row]`` is the column just after the row's prompt: its length when padded on the right, the padded
    width when padded on the left. Steering covers column ``lengths[row] - 1`` (the last prompt token, whose output
    predicts the first completion token) and every column after it. ``generate`` does this by itself. Like
    ``steering()``, the block belongs to the calling thread or asyncio task only.
    """
    with prompt_ends(steering_model(model), lengths):
        yield
