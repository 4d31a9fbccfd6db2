"""Scores that can move where the behavior score cannot: a mean of sigmoids sits at 0 or 1 when one answer is far
likelier than the other (a long compliant answer against a short refusal, an answer that restates the question), and
no strength can then show a move. Two readings of the same per-pair margins do not saturate: the mean margin per
answer token (`peft_steer.evaluate.Preference.token_margin`), and the share of pairs whose margin moved up against the
unsteered model (`share_moved_up`)."""

from __future__ import annotations

import torch

__all__ = ["SATURATION_TOLERANCE", "saturation_warning", "share_moved_up"]

SATURATION_TOLERANCE = 0.03


def share_moved_up(margins: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of pairs whose margin is above its ``reference`` (the same pair's margin in the unsteered model),
    a tie counting half: 0.5 when nothing moved, towards 1 as steering raises the matching answer's margin pair by
    pair and towards 0 as it lowers it, however saturated the sigmoid of the margins is."""
    if margins.shape != reference.shape or margins.numel() == 0:
        raise ValueError(
            f"share_moved_up needs margins and references of one non-empty shape, got "
            f"{tuple(margins.shape)} and {tuple(reference.shape)}."
        )
    up = (margins > reference).double() + 0.5 * (margins == reference).double()
    return float(up.mean())


def saturation_warning(score: float, name: str, tolerance: float = SATURATION_TOLERANCE) -> str | None:
    """A one-line warning when the unsteered ``score`` (a share between 0 and 1, named ``name``) is within
    ``tolerance`` of 0 or 1, where a strength can hardly move it; ``None`` otherwise."""
    if min(score, 1.0 - score) >= tolerance:
        return None
    return (
        f"warning: the {name} of the unsteered model (multiplier 0) is {score:.3f}, within {tolerance:g} of "
        f"{round(score):d}: it can hardly move; read the scores that do not saturate (share up, margin/token)."
    )
