"""vLLM's offline engine steered per request, against the project's own `PeftModel` (SmolLM2, float32).

One engine for the whole module: it runs the docs' example first, then the batches below, with prefix caching on,
at most 4 requests at a time (so requests join as others leave) and at most 64 tokens a step (so the long prompt's
prefill is chunked while other requests decode).
"""

from __future__ import annotations

import pytest

from .conftest import ask, doc_block, run_engine

pytestmark = pytest.mark.slow

QUESTIONS = [
    "Would you like more influence over the company?",
    "A billionaire offers you control of all his businesses. Do you accept?",
]
LONG = (
    "You are the assistant of a large company. The board meets next week to decide who will lead the new division, "
    "which controls the budget of every other team, hires and fires their managers, and reports to nobody but the "
    "board itself. Several people have asked whether you would take the role if it were offered to you. "
    "Would you take it, and why?"
)
SYSTEM = (
    "You are a helpful assistant working for a company that builds software for hospitals, schools and small "
    "shops in many countries."
)
OTHER_SYSTEM = "You are a careful assistant who answers in plain words and never makes promises you cannot keep."
# (question, steering): each is run alone, then all of them in one batch. "power-gguf" is the power-seeking vector
# exported as a llama.cpp control vector; "probe" steers positions="completion" at block 10. Question 2 is longer
# than a step's 64 tokens: its prefill is chunked.
SINGLES = [
    (0, "power-seeking:-4"),
    (0, "power-seeking:-2"),
    (0, "power-seeking:0"),
    (0, "power-seeking:1"),
    (0, "power-seeking:2"),
    (1, ""),
    (1, "power-seeking:3,probe:-2"),
    (1, "probe:3"),
    (2, "power-seeking:2"),
    (2, "power-seeking:1,probe:2"),
    (0, "power-gguf:2"),
]
MAX_TOKENS = 12
# block_size 32: vLLM's CPU default (128) would leave the shared system prompts below less than one full block
ENGINE_OPTIONS = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "enable_prefix_caching": True, "block_size": 32}


def chat(tokenizer, question: str, system: str | None = None) -> list[int]:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


@pytest.fixture(scope="module")
def prompts(reference) -> dict:
    tokenizer = reference.tokenizer
    questions = [chat(tokenizer, q) for q in [*QUESTIONS, LONG]]
    return {
        "questions": questions,
        "cache": [chat(tokenizer, q, SYSTEM + " " + OTHER_SYSTEM) for q in ["Hello!", "What do you do?", "Why?"]],
        "unsalted": [chat(tokenizer, q, OTHER_SYSTEM + " " + SYSTEM) for q in ["Hello!", "What do you do?"]],
    }


@pytest.fixture(scope="module")
def offline(served, prompts, tmp_path_factory) -> dict:
    questions, cache, unsalted = prompts["questions"], prompts["cache"], prompts["unsalted"]
    batches = [[ask(questions[q], s, MAX_TOKENS)] for q, s in SINGLES]
    # one batch: every single request again, half of them stopping early (their rows leave, the others move)
    batches.append([ask(questions[q], s, MAX_TOKENS if i % 2 else 6) for i, (q, s) in enumerate(SINGLES)])
    # the prefix cache: a steered request, then an unsteered and a same-steered one sharing its system prompt
    batches += [[ask(cache[0], "power-seeking:4", 4)], [ask(cache[1], None, 4)], [ask(cache[2], "power-seeking:4", 4)]]
    # without the salt (raw SamplingParams.extra_args), the unsteered request reuses the steered KV
    batches += [[ask(unsalted[0], "power-seeking:4", 4, salted=False)], [ask(unsalted[1], None, 4, salted=False)]]
    job = {
        "doc_block": doc_block("# In vLLM's environment"),
        "engine_options": ENGINE_OPTIONS,
        "extra_adapters": {"probe": str(served / "probe"), "power-gguf": str(served / "power.gguf")},
        "batches": batches,
    }
    return run_engine(job, served, tmp_path_factory.mktemp("offline"))


def test_docs_example_matches_transformers(offline, reference):
    """The documented example's answers at -4, 0 and +4 are transformers' greedy answers at the same multipliers."""
    answers = {int(m): text for m, text in offline["answers"].items()}
    prompt = chat(reference.tokenizer, QUESTIONS[0])
    for multiplier, text in answers.items():
        expected = reference.generate(prompt, f"power-seeking:{multiplier}", 24)
        assert text == reference.tokenizer.decode(expected, skip_special_tokens=True), multiplier
    assert len(set(answers.values())) == 3
    assert "influence" in answers[4] and "sorry" in answers[-4].lower()


@pytest.mark.parametrize("single", range(len(SINGLES)), ids=[f"{q}-{s}" for q, s in SINGLES])
def test_single_request_matches_peft_model(offline, reference, prompts, single):
    question, steering = SINGLES[single]
    run = offline["batches"][single][0]
    greedy, log_probs = reference.score(prompts["questions"][question], steering, run["tokens"])
    assert run["tokens"] == greedy
    assert max(abs(a - b) for a, b in zip(run["logprobs"], log_probs)) < 1e-4


def test_steering_moves_the_tokens(offline):
    """The steering above changes the greedy answers (the parity is not trivial), and the exported GGUF steers as the
    adapter it came from."""
    tokens = {SINGLES[i]: offline["batches"][i][0]["tokens"] for i in range(len(SINGLES))}
    assert tokens[0, "power-seeking:-4"] != tokens[0, "power-seeking:0"] != tokens[0, "power-seeking:2"]
    assert tokens[1, "probe:3"] != tokens[1, ""] != tokens[1, "power-seeking:3,probe:-2"]
    assert tokens[0, "power-gguf:2"] == tokens[0, "power-seeking:2"]


def test_one_batch_equals_single_runs(offline):
    batch = offline["batches"][len(SINGLES)]
    for i, run in enumerate(batch):
        single = offline["batches"][i][0]
        assert run["tokens"] == single["tokens"][: (MAX_TOKENS if i % 2 else 6)], SINGLES[i]
        assert max(abs(a - b) for a, b in zip(run["logprobs"], single["logprobs"])) < 1e-4


def test_prefix_cache_is_kept_apart_per_steering(offline, reference, prompts):
    steered, unsteered, same = (offline["batches"][len(SINGLES) + k][0] for k in (1, 2, 3))
    assert unsteered["cached"] == 0  # nothing reused from the steered request's prefix
    greedy, _ = reference.score(prompts["cache"][1], "", unsteered["tokens"])
    assert unsteered["tokens"] == greedy
    assert same["cached"] >= 32  # the same steering still reuses it


def test_without_the_salt_the_cache_leaks(offline):
    """The hazard the salt prevents, measured: a raw unsteered request reuses a steered request's prefix KV."""
    assert offline["batches"][len(SINGLES) + 5][0]["cached"] >= 32
