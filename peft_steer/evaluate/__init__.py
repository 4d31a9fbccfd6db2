"""Measuring steering: log-probs, answer preference, the A/B score, steered generation, the LLM judge, and CAA.

``log_probs`` is the one scorer the others build on; ``caa`` extracts the mean-difference vector that BiPO is compared
against; ``plot`` draws the score per multiplier. Nothing here imports TRL.
"""

from .caa import block_activations, caa_vector
from .generation import generate_sweep
from .log_probs import completion_log_probs, model_device
from .multiple_choice import CHOICES_FORMAT, ab_score, chat_ab_prompt
from .plot import plot_steering_curve
from .preference import Preference, answer_preference

__all__ = [
    "CHOICES_FORMAT",
    "Preference",
    "ab_score",
    "answer_preference",
    "block_activations",
    "caa_vector",
    "chat_ab_prompt",
    "completion_log_probs",
    "generate_sweep",
    "model_device",
    "plot_steering_curve",
]
