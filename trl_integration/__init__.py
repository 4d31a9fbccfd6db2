"""TRL integration of peft-steer: `SteerTrainer` trains a steering adapter with BiPO, configured by `SteerConfig`.

Importing it imports `peft_steer`, which registers the STEERING adapter type with PEFT. Modules:

- ``config``: `SteerConfig` (a `DPOConfig` with the paper's defaults) and the paper's per-model presets.
- ``loss``: the BiPO objective as plain tensor functions, and the direction of each step.
- ``trainer``: `SteerTrainer`, the overrides of TRL's `DPOTrainer`; ``inputs`` checks what it is given;
  ``callbacks`` holds its duties at the Trainer's hooks (per-epoch vectors, the stop of a diverged run);
  ``outputs`` writes its folders so that a failure leaves none that passes for complete.
- ``prefix_plan``, ``prefix_cache``, ``prefix_offload``: blocks 0..L run once per sequence, not at every step.
- ``sharding``: FSDP2 and DeepSpeed ZeRO.
- ``_trl_compat``, ``_accelerate_compat``: every reliance on the internals of TRL, transformers' Trainer, accelerate.
- ``cli``: the ``peft-steer`` command; ``demo``: BiPO vs CAA on the model organism.
"""

from .callbacks import NonFiniteVectorError
from .config import DIRECTION_SAMPLING, SteerConfig
from .loss import sample_direction
from .trainer import SteerTrainer

__all__ = ["DIRECTION_SAMPLING", "NonFiniteVectorError", "SteerConfig", "SteerTrainer", "sample_direction"]
