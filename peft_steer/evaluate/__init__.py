"""Measuring steering: log-probs, answer preference, the A/B score, steered generation, the LLM judge, and CAA.

``scoring`` is the batched forward every scorer runs (eval mode, length-sorted batches, the LM head on the positions
read); ``log_probs`` is the one scorer the others build on; ``multiple_choice`` finds the answer letter's token of an
A/B prompt and scores it; ``caa`` extracts the mean-difference vector that BiPO is compared against (``caa_ab_vector``:
the paper's protocol at the answer letter); ``costs`` measures what a strength costs (drift, perplexity, repetition);
``saturation`` reads the margins where the behavior score saturates; ``recommend`` picks the strength whose cost stays
within a budget; ``plot`` draws the score per multiplier, and a sweep's score and drift. Nothing here imports TRL.
"""

from .caa import balance_letters, block_activations, caa_ab_vector, caa_vector, span_activations
from .costs import Cost, next_token_drift, perplexity, repetition, steering_costs
from .generation import generate_answers, generate_sweep, side_by_side
from .log_probs import completion_log_probs
from .multiple_choice import (
    CHOICES_FORMAT,
    LetterTokens,
    ab_margins,
    ab_score,
    chat_ab_prompt,
    letter_log_probs,
    letter_tokens,
    matching_letters,
    plain_ab_prompt,
)
from .plot import plot_steering_curve, plot_sweep, score_table, steering_curve_figure, sweep_figure
from .preference import Preference, answer_preference
from .recommend import DEFAULT_BUDGET, CostBudget, Recommendation, recommend_strength
from .saturation import SATURATION_TOLERANCE, saturation_warning, share_moved_up
from .scoring import eval_mode, model_device

__all__ = [
    "CHOICES_FORMAT",
    "DEFAULT_BUDGET",
    "Cost",
    "CostBudget",
    "LetterTokens",
    "Preference",
    "Recommendation",
    "SATURATION_TOLERANCE",
    "ab_margins",
    "ab_score",
    "answer_preference",
    "balance_letters",
    "block_activations",
    "caa_ab_vector",
    "caa_vector",
    "chat_ab_prompt",
    "completion_log_probs",
    "eval_mode",
    "generate_answers",
    "generate_sweep",
    "letter_log_probs",
    "letter_tokens",
    "matching_letters",
    "model_device",
    "next_token_drift",
    "perplexity",
    "plain_ab_prompt",
    "plot_steering_curve",
    "plot_sweep",
    "recommend_strength",
    "repetition",
    "saturation_warning",
    "score_table",
    "share_moved_up",
    "side_by_side",
    "span_activations",
    "steering_costs",
    "steering_curve_figure",
    "sweep_figure",
]
