"""The BiPO objective as plain tensor functions: no model, no trainer, no distributed state.

For a preference pair (x, y_w, y_l) and a direction d in {-1, +1}:

    r_d(y) = log pi_{L + d v}(y | x) - log pi(y | x)          (log-probs summed over the completion tokens)
    loss   = -log sigmoid(d * beta * (r_d(y_w) - r_d(y_l)))

pi is the model with the steering adapter disabled.
"""

from __future__ import annotations

import random
import textwrap
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

BIPO_CITATION = textwrap.dedent("""\
    @inproceedings{cao2024personalized,
        title        = {{Personalized Steering of Large Language Models: Versatile Steering Vectors Through
                         Bi-directional Preference Optimization}},
        author       = {Yuanpu Cao and Tianrong Zhang and Bochuan Cao and Ziyi Yin and Lu Lin and Fenglong Ma and
                         Jinghui Chen},
        year         = 2024,
        booktitle    = {Advances in Neural Information Processing Systems 38 (NeurIPS 2024)},
    }""")

BIPO_PAPER = {
    "title": "Personalized Steering of Large Language Models: Versatile Steering Vectors Through Bi-directional "
    "Preference Optimization",
    "id": "2406.00045",
    "citation": BIPO_CITATION,
}


class BipoLoss(NamedTuple):
    """The loss, averaged over pairs and directions, and the signed rewards ``d * beta * r_d(y)`` of each direction
    and pair (``[directions, pairs]``, detached): a positive margin means the pair is ordered the way d wants."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def sample_direction(seed: int, step: int) -> float:
    """The direction (+1.0 or -1.0) of optimizer step ``step``: a pure function of ``(seed, step)``.

    Seeding a fresh generator from a string (hashed with SHA-512 by `random.Random`, the same in every process)
    makes every data-parallel rank, every micro-batch of the step and a resumed run draw the same direction, with no
    random state to carry around.
    """
    return 1.0 if random.Random(f"bipo-direction:{seed}:{step}").random() < 0.5 else -1.0


def bipo_loss(
    logps_chosen: torch.Tensor,
    logps_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    directions: torch.Tensor,
    beta: float,
) -> BipoLoss:
    """The BiPO loss of a batch of pairs under several directions.

    Args:
        logps_chosen: Summed completion log-probs of the chosen answers under the steered policy, one row per
            direction: ``[directions, pairs]``, float32.
        logps_rejected: The same for the rejected answers.
        ref_chosen: Summed completion log-probs of the chosen answers under the reference, ``[pairs]``, float32.
        ref_rejected: The same for the rejected answers.
        directions: The direction d of each row, ``[directions]``, float32 (+1.0 or -1.0).
        beta: Scale of the reward margin inside the sigmoid.
    """
    chosen_rewards = logps_chosen - ref_chosen
    rejected_rewards = logps_rejected - ref_rejected
    signed = directions[:, None] * beta
    logits = signed * (chosen_rewards - rejected_rewards)  # [directions, pairs]
    loss = -F.logsigmoid(logits).mean()
    return BipoLoss(loss, (signed * chosen_rewards).detach(), (signed * rejected_rewards).detach())


def bipo_metrics(
    result: BipoLoss,
    logps_chosen: torch.Tensor,
    logps_rejected: torch.Tensor,
    directions: Sequence[float],
    gather: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """The metrics the trainer logs for one loss: rewards in the sign convention of d = +1 (see `BipoLoss`), the
    policy's log-probs, and the margin of each direction. ``gather`` collects a tensor from every process."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    metrics = {
        "direction": sum(directions) / len(directions),
        "rewards/chosen": gather(chosen.flatten()).mean().item(),
        "rewards/rejected": gather(rejected.flatten()).mean().item(),
        "rewards/margins": gather((chosen - rejected).flatten()).mean().item(),
        "rewards/accuracies": gather((chosen > rejected).float().flatten()).mean().item(),
        "logps/chosen": gather(logps_chosen.detach().flatten()).mean().item(),
        "logps/rejected": gather(logps_rejected.detach().flatten()).mean().item(),
    }
    for index, direction in enumerate(directions):
        label = "+1" if direction > 0 else "-1"
        metrics[f"rewards/margins_d{label}"] = gather((chosen[index] - rejected[index]).flatten()).mean().item()
    return metrics
