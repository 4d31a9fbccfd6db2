"""TRL integration of peft-steer: `SteerTrainer` trains a steering adapter with BiPO, configured by `SteerConfig`.

Importing it imports `peft_steer`, which registers the STEERING adapter type with PEFT.
"""

from .config import DIRECTION_SAMPLING, SteerConfig
from .trainer import SteerTrainer, sample_direction

__all__ = ["DIRECTION_SAMPLING", "SteerConfig", "SteerTrainer", "sample_direction"]
