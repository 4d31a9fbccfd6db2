"""`SteeringConfig`: which decoder blocks get a steering vector, how strong, and from where."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
from peft.config import PeftConfig

from ..staging import usual_permissions
from .card import write_model_card

STEERING = "STEERING"
WEIGHTS_NAME = "adapter_model.safetensors"  # PEFT's name for the saved vectors
POSITIONS = ("all", "completion")
INITS = ("zeros", "random")
# The vectors are float32: a strength beyond this makes ``m * v`` inf even where ``m`` is a finite Python float.
FLOAT32_MAX = torch.finfo(torch.float32).max


def finite_strength(value: float, what: str) -> float:
    """``value`` as a float; a ValueError naming ``what`` when it is NaN, inf, or beyond float32's range."""
    value = float(value)
    if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
        raise ValueError(
            f"{what} must be a finite number within float32's range (the vectors' dtype, |m| <= {FLOAT32_MAX:.4g}), "
            f"got {value!r}."
        )
    return value


def check_real(tensor: torch.Tensor, what: str) -> None:
    """A TypeError naming ``what`` when ``tensor`` holds complex or bool values."""
    if tensor.is_complex() or tensor.dtype == torch.bool:
        # float32 would silently drop an imaginary part, and read True / False as 1 / 0
        raise TypeError(f"{what} must hold real numbers, got dtype {tensor.dtype}.")


def checked_multiplier(value: object, what: str = "The multiplier", per_row: bool = True) -> float | torch.Tensor:
    """A strength as steering uses it: a finite float within float32's range, or with ``per_row`` a 1-D tensor of
    them (one per batch row; float32, the vectors' dtype; a 0-D tensor is a float). Errors name ``what``."""
    if per_row and isinstance(value, torch.Tensor):
        return _checked_rows(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        wanted = (
            "a number or a 1-D tensor"
            if per_row
            else "a number; for one strength per batch row use peft_steer.steering(model, multiplier=tensor)"
        )
        raise TypeError(f"{what} must be {wanted}, got {type(value).__name__}.")
    return finite_strength(value, what)


def _checked_rows(value: torch.Tensor) -> float | torch.Tensor:
    check_real(value, "A multiplier tensor")
    if value.dim() == 0:
        return finite_strength(value.item(), "The multiplier")
    if value.dim() != 1:
        raise ValueError(f"A multiplier tensor must be 1-D (one value per batch row), got {tuple(value.shape)}.")
    strengths = value.detach().float()
    bad = ~torch.isfinite(strengths)
    if bad.any():  # checked in float32, the vectors' dtype: a float64 1e300 becomes inf there
        raise ValueError(
            f"The multiplier tensor contains NaN or inf values in float32 (the vectors' dtype): rows "
            f"{bad.nonzero().flatten().tolist()[:5]} hold {value[bad].tolist()[:5]}."
        )
    return strengths


@dataclass
class SteeringConfig(PeftConfig):
    """Configuration of a steering adapter: one learned vector added to the output of each chosen decoder block.

    The vector of block ``L`` is added to the residual stream after block ``L`` (0-indexed, Hugging Face's block
    numbering), at every position chosen by ``positions``, times the adapter's multiplier: the sign of the
    multiplier picks the direction of the behavior, its size the strength.

    Args:
        layers: Indices of the decoder blocks to steer; negative values count from the end (``-1`` is the last
            block). Stored resolved (non-negative) once the adapter is attached to a model.
        multiplier: Default strength of this adapter; ``steering(model, multiplier=...)`` changes it temporarily,
            ``set_multiplier`` permanently (and it is saved).
        init: ``"zeros"`` (the paper's BiPO start) or ``"random"`` (a Gaussian vector of expected norm 1).
        init_vectors: Optional starting vectors, block index -> tensor of the model's hidden size (e.g. a CAA
            vector). Not written to ``adapter_config.json``: the vectors are saved as weights.
        positions: ``"all"`` steers every prompt, completion and generated token (the paper's setting).
            ``"completion"`` steers the last prompt token and every token after it, i.e. exactly the positions
            whose outputs predict the completion; ``generate`` finds each row's prompt from the attention mask
            (left or right padding, with or without KV cache); a plain forward needs
            ``peft_steer.prompt_lengths(model, lengths)``.
        blocks_path: Dotted path of the decoder block list inside the transformers model (e.g. ``"model.layers"``).
            Found automatically for Llama, Mistral, Qwen2, Gemma, Phi3, GPT-2, GPT-NeoX and most others; set it by
            hand for a model where it is not found.
        hidden_size: Hidden size of the model the adapter was made for. Filled in when the adapter is attached, and
            checked when it is loaded onto a model.
        num_blocks: Number of decoder blocks of that model. Filled in and checked the same way.
    """

    layers: list[int] = field(
        default_factory=lambda: [15],
        metadata={"help": "Decoder block indices to steer (0-indexed; negative counts from the end)."},
    )
    multiplier: float = field(default=1.0, metadata={"help": "Default strength; its sign is the direction."})
    init: Literal["zeros", "random"] = field(default="zeros", metadata={"help": "'zeros' (paper) or 'random'."})
    init_vectors: dict[int, torch.Tensor] | None = field(
        default=None, metadata={"help": "Starting vectors, block index -> tensor. Not saved in the config."}
    )
    positions: Literal["all", "completion"] = field(
        default="all", metadata={"help": "'all' tokens (paper) or 'completion': last prompt token onwards."}
    )
    blocks_path: str | None = field(
        default=None, metadata={"help": "Dotted path of the decoder block list, when it is not found automatically."}
    )
    hidden_size: int | None = field(default=None, metadata={"help": "Filled in when attached; checked on load."})
    num_blocks: int | None = field(default=None, metadata={"help": "Filled in when attached; checked on load."})
    task_type: str | None = field(
        default="CAUSAL_LM", metadata={"help": "PEFT task type; None for a model that is not a causal LM."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Filled in with the resolved block paths; not meant to be set by hand."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = STEERING
        if isinstance(self.layers, int):
            self.layers = [self.layers]
        self.layers = list(self.layers)
        if not self.layers:
            raise ValueError("SteeringConfig(layers=...) needs at least one decoder block index.")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise TypeError(f"SteeringConfig(layers=...) must be block indices (ints), got {self.layers!r}.")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"SteeringConfig(layers=...) lists a block twice: {self.layers}.")
        if self.positions not in POSITIONS:
            raise ValueError(f"SteeringConfig(positions={self.positions!r}): choose one of {POSITIONS}.")
        if self.init not in INITS:
            raise ValueError(f"SteeringConfig(init={self.init!r}): choose one of {INITS}, or pass init_vectors.")
        # Checked here, not only in set_multiplier: adapter_config.json is read through this constructor, and Python's
        # json reads NaN, Infinity and 1e400 (inf).
        what = f"SteeringConfig(multiplier={self.multiplier!r})"
        self.multiplier = checked_multiplier(self.multiplier, what, per_row=False)

    def to_dict(self) -> dict:
        # init_vectors are tensors (not JSON) and are saved as the adapter's weights anyway.
        config = super().to_dict()
        config["init_vectors"] = None
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` and the steering section of the folder's model card (``README.md``).

        PEFT writes its model card before the configs and offers no other hook; the card therefore lives here.
        """
        super().save_pretrained(save_directory, **kwargs)
        write_model_card(save_directory, self)
        weights = os.path.join(save_directory, WEIGHTS_NAME)
        if os.path.isfile(weights):  # PEFT writes it just before the config, with safetensors' private mode
            usual_permissions(weights)
