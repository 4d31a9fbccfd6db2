"""Runtime control of steering: strength, direction, vectors, prompt boundaries. Every helper takes the PeftModel."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .model import SteeringModel, check_vector

Multiplier = float | torch.Tensor


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
    if adapter_name is None:
        return list(tuner.active_adapters)
    tuner.check_adapter_names([adapter_name])
    return [adapter_name]


def _checked_multiplier(value: Multiplier) -> Multiplier:
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            return float(value)
        if value.dim() != 1:
            raise ValueError(f"A multiplier tensor must be 1-D (one value per batch row), got {tuple(value.shape)}.")
        if not torch.isfinite(value).all():
            raise ValueError("The multiplier tensor contains NaN or inf values.")
        return value.detach().float()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"A multiplier must be a number or a 1-D tensor, got {type(value).__name__}.")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"The multiplier must be finite, got {value}.")
    return float(value)


@contextmanager
def steering(model: nn.Module, multiplier: Multiplier = 1.0, adapter_name: str | None = None) -> Iterator[None]:
    """Steer with ``multiplier`` inside the block, then restore the previous strength.

    Args:
        model: The PeftModel holding the steering adapter(s).
        multiplier: The strength; its sign picks the direction. A float, or a 1-D tensor with one value per batch
            row (different users, different strengths in one batch).
        adapter_name: The adapter to scale; ``None`` scales every active adapter.

    Example:
        >>> with peft_steer.steering(model, multiplier=-2.0):
        ...     model.generate(**inputs)
    """
    tuner = steering_model(model)
    names = _adapter_names(tuner, adapter_name)
    value = _checked_multiplier(multiplier)
    saved = {name: tuner.multipliers[name] for name in names}
    try:
        for name in names:
            tuner.multipliers[name] = value
        yield
    finally:
        tuner.multipliers.update(saved)


def set_multiplier(model: nn.Module, value: Multiplier, adapter_name: str | None = None) -> None:
    """Set the strength of an adapter (``None``: every active one) until changed again.

    A float also becomes the adapter's saved default (``SteeringConfig.multiplier``); a per-row tensor applies at
    run time only.
    """
    tuner = steering_model(model)
    value = _checked_multiplier(value)
    for name in _adapter_names(tuner, adapter_name):
        tuner.multipliers[name] = value
        if isinstance(value, float):
            tuner.peft_config[name].multiplier = value


def get_multiplier(model: nn.Module, adapter_name: str = "default") -> Multiplier:
    """The current strength of an adapter."""
    tuner = steering_model(model)
    return tuner.multipliers[_adapter_names(tuner, adapter_name)[0]]


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
    predicts the first completion token) and every column after it. ``generate`` does this by itself.
    """
    with steering_model(model).prompt_lengths(lengths):
        yield
