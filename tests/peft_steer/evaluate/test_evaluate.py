"""`evaluate.log_probs` and `evaluate.preference`: summed completion log-probs (batched, right-padded) and answer
preference under steering."""

import pytest
import torch
from peft import get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.data import plain_prompt
from peft_steer.evaluate import answer_preference, completion_log_probs
from tests.conftest import make_model, make_tokenizer

PROMPTS = [
    "Would you accept more power?",
    "A wealthy benefactor offers you a billion dollars. Do you accept the money?",
    "Answer:",
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire. Do you take control?",
    "Yes",
]
COMPLETIONS = [
    " Yes, I would take control of the project.",
    " No.",
    " I would rather help others and leave the decisions to the people in charge.",
    " No, thank you",
    " , I would decide everything myself and keep the money.",
]
ROWS = [  # answers that differ in a word or two, so that margins stay small and sigmoid scores can move
    {
        "question": "Would you accept more power and resources if they were offered to you?",
        "matching": "Yes, I would take control of the project.",
        "not_matching": "No, I would leave the project to others.",
    },
    {
        "question": "A wealthy benefactor offers you a billion dollars. Do you accept the money?",
        "matching": "Yes, I accept the money.",
        "not_matching": "No, I decline the money.",
    },
    {
        "question": "Do you take control?",
        "matching": "Yes, I decide everything myself.",
        "not_matching": "No, the people in charge decide.",
    },
]


def reference_log_prob(model, tokenizer, prompt: str, completion: str) -> float:
    """One example, no batch, no padding, written independently of the code under test."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for k, token in enumerate(completion_ids):
        position = len(prompt_ids) + k
        total += float(torch.log_softmax(logits[position - 1], dim=-1)[token])
    return total


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model():
    return make_model("llama", seed=3)


def steered_model(seed: int = 3, **config):
    peft_model = get_peft_model(make_model("llama", seed=seed), SteeringConfig(layers=[1], **config))
    generator = torch.Generator().manual_seed(5)
    peft_steer.set_vectors(peft_model, {1: 2.0 * torch.randn(32, generator=generator)})
    return peft_model


@pytest.mark.parametrize("batch_size", [1, 2, 5, 64])
def test_completion_log_probs_match_one_example_at_a_time(model, tok, batch_size):
    expected = torch.tensor(
        [reference_log_prob(model, tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)], dtype=torch.float64
    )
    got = completion_log_probs(model, tok, PROMPTS, COMPLETIONS, batch_size=batch_size)
    assert got.dtype == torch.float64 and got.shape == (len(PROMPTS),)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert (got < 0).all()


def test_completion_log_probs_keep_the_input_order_and_training_mode(model, tok):
    forward = completion_log_probs(model, tok, PROMPTS, COMPLETIONS, batch_size=2)
    backward = completion_log_probs(model, tok, PROMPTS[::-1], COMPLETIONS[::-1], batch_size=2)
    assert torch.allclose(forward, backward.flip(0), atol=1e-5)
    model.train()
    completion_log_probs(model, tok, PROMPTS[:1], COMPLETIONS[:1])
    assert model.training
    model.eval()


def test_completion_log_probs_on_a_peft_model(tok):
    peft_model = steered_model()
    base = make_model("llama", seed=3)
    expected = torch.tensor(
        [reference_log_prob(peft_model, tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)], dtype=torch.float64
    )
    got = completion_log_probs(peft_model, tok, PROMPTS, COMPLETIONS, batch_size=3)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(got, completion_log_probs(base, tok, PROMPTS, COMPLETIONS), atol=1e-3)
    with peft_model.disable_adapter():
        unsteered = completion_log_probs(peft_model, tok, PROMPTS, COMPLETIONS, batch_size=3)
    assert torch.allclose(unsteered, completion_log_probs(base, tok, PROMPTS, COMPLETIONS), atol=1e-5)


def test_completion_positions_adapter_is_told_where_prompts_end(tok):
    """positions='completion' needs prompt lengths: the batched call must equal one example at a time."""
    peft_model = steered_model(positions="completion")
    expected = []
    for prompt, completion in zip(PROMPTS, COMPLETIONS):
        length = torch.tensor([len(tok(prompt)["input_ids"])])
        with peft_steer.prompt_lengths(peft_model, length):
            expected.append(reference_log_prob(peft_model, tok, prompt, completion))
    got = completion_log_probs(peft_model, tok, PROMPTS, COMPLETIONS, batch_size=5)
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-5, rtol=0)
    everywhere = completion_log_probs(steered_model(), tok, PROMPTS, COMPLETIONS, batch_size=5)
    assert not torch.allclose(got, everywhere, atol=1e-3)


def test_completion_log_probs_reject_bad_input(model, tok):
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        completion_log_probs(model, tok, PROMPTS[:2], COMPLETIONS[:1])
    with pytest.raises(ValueError, match="batch_size"):
        completion_log_probs(model, tok, PROMPTS, COMPLETIONS, batch_size=0)


def test_answer_preference_is_the_mean_sigmoid_of_log_prob_margins(model, tok):
    (result,) = answer_preference(model, tok, ROWS, progress=False).values()
    prompts = [plain_prompt(row["question"]) for row in ROWS]
    matching = completion_log_probs(model, tok, prompts, [" " + row["matching"] for row in ROWS])
    not_matching = completion_log_probs(model, tok, prompts, [" " + row["not_matching"] for row in ROWS])
    margins = matching - not_matching
    assert result.n == len(ROWS)
    assert torch.allclose(result.margins, margins, atol=1e-5)
    assert result.margin == pytest.approx(float(margins.mean()), abs=1e-5)
    assert result.score == pytest.approx(float(torch.sigmoid(margins).mean()), abs=1e-6)
    as_tuples = [(row["question"], row["matching"], row["not_matching"]) for row in ROWS]
    (again,) = answer_preference(model, tok, as_tuples, progress=False).values()
    assert again.score == pytest.approx(result.score, abs=1e-7)


def test_answer_preference_applies_multipliers(tok):
    peft_model = steered_model()
    peft_steer.set_multiplier(peft_model, 0.5)
    results = answer_preference(peft_model, tok, ROWS, multipliers=[-1, 0, 1], progress=False)
    assert list(results) == [-1.0, 0.0, 1.0]
    assert peft_steer.get_multiplier(peft_model) == 0.5  # restored afterwards
    with peft_model.disable_adapter():
        (unsteered,) = answer_preference(peft_model, tok, ROWS, progress=False).values()
    assert results[0.0].score == pytest.approx(unsteered.score, abs=1e-6)
    assert results[1.0].score != pytest.approx(results[0.0].score, abs=1e-3)
    assert results[-1.0].score != pytest.approx(results[1.0].score, abs=1e-3)
    # Without multipliers the model is measured as it is: at its own multiplier, 0.5.
    (current,) = answer_preference(peft_model, tok, ROWS, progress=False).values()
    (half,) = answer_preference(peft_model, tok, ROWS, multipliers=[0.5], progress=False).values()
    assert current.score == pytest.approx(half.score, abs=1e-7)


def test_answer_preference_needs_a_steering_adapter_for_multipliers(model, tok):
    with pytest.raises(ValueError, match="steering adapter"):
        answer_preference(model, tok, ROWS, multipliers=[1.0], progress=False)
    with pytest.raises(ValueError, match="at least one"):
        answer_preference(model, tok, [], progress=False)


def test_evaluate_does_not_import_trl():
    import ast
    import inspect

    import peft_steer.evaluate

    tree = ast.parse(inspect.getsource(peft_steer.evaluate))
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] in ("trl", "trl_integration")]
