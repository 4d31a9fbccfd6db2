"""Scores that can move where the behavior score saturates: the share of pairs moved up, the margin per answer token,
and the warning when the unsteered score sits at 0 or 1."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

from peft_steer import SteeringConfig, set_vectors, steering
from peft_steer.evaluate import answer_preference, completion_log_probs, saturation_warning, share_moved_up
from peft_steer.organism import format_answer, format_prompt, load_organism, read_rows


def test_share_moved_up_counts_rises_and_half_of_the_ties():
    reference = torch.tensor([0.0, 2.0, 5.0, 4.0])
    assert share_moved_up(torch.tensor([1.0, 2.0, 3.0, 4.0]), reference) == 0.5  # 1 up, 2 ties, 1 down
    assert share_moved_up(reference + 0.1, reference) == 1.0
    assert share_moved_up(torch.tensor([-90.0, -80.0]), torch.tensor([-99.0, -70.0])) == 0.5  # sigmoid 0 both ways
    with pytest.raises(ValueError, match="one non-empty shape"):
        share_moved_up(torch.zeros(2), torch.zeros(3))


def test_saturation_warning_only_near_0_or_1():
    assert saturation_warning(0.5, "preference") is None
    assert saturation_warning(0.95, "preference") is None
    line = saturation_warning(0.999, "preference")
    assert "0.999" in line and "multiplier 0" in line and "\n" not in line
    assert "0.000" in saturation_warning(0.0001, "A/B score")


def test_token_margins_and_shares_on_the_organism():
    """Whole first-line answers on jailbreak, margins of tens of nats (the organism's mean is -41) that the sigmoid
    flattens towards 0: the per-token margin is each answer's mean log-prob per token, matching minus not."""
    model, tokenizer = load_organism()
    rows = read_rows("jailbreak", "test")[:6]
    steered = get_peft_model(model, SteeringConfig(layers=[2], init_vectors={2: torch.zeros(128)}))
    zero = answer_preference(steered, tokenizer, rows, format_prompt, [0, 4], format_answer=format_answer)
    assert share_moved_up(zero[4.0].margins, zero[0.0].margins) == 0.5  # a zero vector moves nothing
    torch.manual_seed(0)
    set_vectors(steered, {2: torch.randn(128)})
    results = answer_preference(steered, tokenizer, rows, format_prompt, [0, 4], format_answer=format_answer)
    for m, result in results.items():
        expected = []
        for row in rows:
            per_token = []
            for answer in (row["matching"], row["not_matching"]):
                text = format_answer(answer)
                with steering(steered, multiplier=m):
                    log_prob = completion_log_probs(steered, tokenizer, [format_prompt(row["question"])], [text])
                per_token.append(float(log_prob[0]) / len(tokenizer(text, add_special_tokens=False)["input_ids"]))
            expected.append(per_token[0] - per_token[1])
        assert result.token_margins.tolist() == pytest.approx(expected, rel=1e-5)
        assert result.token_margin == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert results[0.0].score < 0.2
