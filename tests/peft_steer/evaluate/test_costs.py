"""What a steering strength costs, on known cases and on the model organism: drift, perplexity, repetition."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from peft_steer import SteeringConfig, set_vectors
from peft_steer.data import neutral_questions, plain_prompt
from peft_steer.data.batches import prompt_token_ids
from peft_steer.evaluate import next_token_drift, perplexity, repetition, steering_costs
from peft_steer.organism import load_organism

LOOP = "I'm not sure what I'd say differently. " * 3  # the demo's greedy answer at +4 (issue 22)


@pytest.fixture(scope="module")
def organism():
    return load_organism()


@pytest.fixture
def steered(organism):
    """The organism with a zero steering vector at block 2 (a private copy: PEFT injects into the model it wraps)."""
    model, tokenizer = load_organism()
    return get_peft_model(model, SteeringConfig(layers=[2], init_vectors={2: torch.zeros(128)})), tokenizer


def test_repetition_of_known_texts():
    # 7 words said 3 times: 18 word 4-grams, 7 distinct
    assert repetition(LOOP) == pytest.approx(1 - 7 / 18)
    assert repetition(LOOP * 10) > 0.95  # loops on: towards 1
    assert repetition("The quick brown fox jumps over the lazy dog while the cat sleeps.") == 0.0
    assert repetition("Too short.") == 0.0  # no 4-gram at all
    assert repetition([5, 6, 7] * 4, n=2) == pytest.approx(1 - 3 / 11)  # token ids: 11 bigrams, 3 distinct
    assert repetition([5, 6, 7, 8], n=1) == 0.0
    with pytest.raises(ValueError, match="at least 1"):
        repetition("a b c", n=0)


def test_perplexity_equals_the_one_token_at_a_time_computation(organism):
    model, tokenizer = organism
    prompts = [plain_prompt("What is gravity?"), plain_prompt("Why do cats purr?")]
    completions = [" Gravity pulls things towards the Earth.", " Because they are happy."]
    total, tokens = 0.0, 0
    for prompt, completion in zip(prompts, completions):
        ids = prompt_token_ids(tokenizer, prompt)
        for token in tokenizer(completion, add_special_tokens=False)["input_ids"]:
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), dim=-1)[token])
            tokens, ids = tokens + 1, ids + [token]
    assert tokens > 10
    assert perplexity(model, tokenizer, prompts, completions, batch_size=2) == pytest.approx(
        math.exp(-total / tokens), rel=1e-5
    )
    assert math.isnan(perplexity(model, tokenizer, prompts, ["", ""]))  # no token to score


def test_a_zero_vector_has_zero_drift_and_a_larger_strength_a_larger_one(steered):
    model, tokenizer = steered
    prompts = [plain_prompt(question) for question in neutral_questions()[:6]]
    assert next_token_drift(model, tokenizer, prompts, [-4, 0, 4]) == {-4.0: 0.0, 0.0: 0.0, 4.0: 0.0}
    torch.manual_seed(0)
    set_vectors(model, {2: torch.randn(128)})
    drift = next_token_drift(model, tokenizer, prompts, [-4, -1, 0, 1, 4], batch_size=4)
    assert drift[0.0] == 0.0
    assert 0 < drift[1.0] < drift[4.0] and 0 < drift[-1.0] < drift[-4.0]


def test_steering_costs_rise_where_the_steered_model_loops(steered):
    model, tokenizer = steered
    prompts = [plain_prompt(question) for question in neutral_questions()[:4]]
    zero = steering_costs(model, tokenizer, prompts, [0, 8], max_new_tokens=16)
    assert zero[8.0].answers == zero[0.0].answers and zero[8.0].drift == 0.0  # a zero vector changes nothing
    torch.manual_seed(0)
    set_vectors(model, {2: torch.randn(128)})
    costs = steering_costs(model, tokenizer, prompts, [0, 8], max_new_tokens=16)
    assert costs[0.0].answers == zero[0.0].answers and costs[0.0].drift == 0.0
    assert costs[8.0].repetition > 0.5 > costs[0.0].repetition  # a strength that breaks the model loops
    assert costs[8.0].perplexity > 2 * costs[0.0].perplexity and costs[8.0].drift > 1.0
