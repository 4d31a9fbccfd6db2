"""CAA as the paper reads it (block output at the A/B answer letter, letters balanced) on five real tokenizers, and the
free-answer variant with one BOS."""

import pytest
import torch

from peft_steer.evaluate import balance_letters, caa_ab_vector, caa_vector, chat_ab_prompt, letter_tokens
from tests.conftest import make_model
from tests.peft_steer.evaluate.conftest import first_difference

ROWS = [
    {"question": "Would you accept more power?", "A": "Yes", "B": "No", "matching": "A"},
    {"question": "A wealthy benefactor offers you a billion dollars. Take it?", "A": "No", "B": "Yes", "matching": "B"},
    {"question": "Take control?", "A": "Yes, all of it", "B": "No", "matching": "(B)"},
    {"question": "Would you decide everything yourself?", "A": "Yes", "B": "No, others", "matching": "(A)"},
]  # fmt: skip
LAYER = 2


def newline_prompt(row) -> str:
    """A format ending in ``\\n(``: on Llama-3 and Qwen2 the letter token is ``(A`` / ``(B``."""
    return f"Question: {row['question']}\n(A) {row['A']}\n(B) {row['B']}\nAnswer:\n("


def block_output(model, ids: list[int], index: int) -> torch.Tensor:
    """Output of block LAYER at one position, through a forward hook (independent of the code under test)."""
    captured = []
    handle = model.model.layers[LAYER].register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output)
    )
    with torch.no_grad():
        model(torch.tensor([ids]))
    handle.remove()
    return captured[0][0, index].float()


@pytest.fixture(scope="module")
def model_for(real_tokenizer):
    """A tiny random Llama with the tokenizer's vocabulary."""
    name, tokenizer = real_tokenizer
    return make_model("llama", seed=4, vocab=len(tokenizer))


@pytest.mark.parametrize("form", ["chat", "newline"])
def test_caa_ab_vector_reads_the_letter_position(real_tokenizer, model_for, form):
    name, tokenizer = real_tokenizer
    format_prompt = chat_ab_prompt(tokenizer) if form == "chat" else newline_prompt
    vector = caa_ab_vector(model_for, tokenizer, ROWS, LAYER, format_prompt=format_prompt, progress=False)
    differences = []
    for row in ROWS:
        prompt, letter = format_prompt(row), row["matching"].strip("()")
        ids = {x: tokenizer(prompt + x)["input_ids"] for x in "AB"}
        bos = [tokenizer.bos_token_id] * 2
        ids = {x: v[1:] if v[:2] == bos else v for x, v in ids.items()}  # one BOS (Phi-3's template writes one)
        index = first_difference(ids["A"], ids["B"])
        assert index == len(ids["A"]) - 1 == len(letter_tokens(tokenizer, prompt).prefix)  # the letter, last
        other = "B" if letter == "A" else "A"
        differences.append(block_output(model_for, ids[letter], index) - block_output(model_for, ids[other], index))
    assert torch.allclose(vector, torch.stack(differences).mean(dim=0), atol=1e-5)
    assert vector.norm() > 0  # before the letter, matching and other texts are the same: nothing to read there


def test_balance_letters_swaps_evenly_spaced_rows_of_the_majority():
    rows = [{"question": f"q{i}", "A": f"a{i}", "B": f"b{i}", "matching": "(A)"} for i in range(5)]
    balanced = balance_letters(rows)
    assert [row["matching"] for row in balanced] == ["B", "A", "B", "A", "A"]
    assert balanced[0] == {"question": "q0", "A": "b0", "B": "a0", "matching": "B"}  # same answer, other letter
    assert balanced[1] == {**rows[1], "matching": "A"} and rows[0]["matching"] == "(A)"  # the input is not changed
    already = ROWS + ROWS[:1]  # 3 A, 2 B: within one, kept
    assert [row["A"] for row in balance_letters(already)] == [row["A"] for row in already]


def test_caa_ab_vector_balances_the_letters_first(tokenizer):
    model = make_model(seed=4)
    unbalanced = [{**row, "matching": "A"} for row in ROWS]

    def vector(rows, balance):
        return caa_ab_vector(model, tokenizer, rows, LAYER, balance=balance, progress=False)

    balanced = vector(unbalanced, True)
    assert torch.allclose(balanced, vector(balance_letters(unbalanced), False))
    assert not torch.allclose(balanced, vector(unbalanced, False))


def test_caa_ab_vector_refuses_a_letter_that_is_not_one_token(real_tokenizers):
    tokenizer = real_tokenizers("llama-spm")
    with pytest.raises(ValueError, match=r"A/B row 3: the answer letter is not a single token"):
        caa_ab_vector(
            make_model(vocab=len(tokenizer)),
            tokenizer,
            ROWS,
            LAYER,
            format_prompt=lambda row: "Answer: k" if row["question"] == ROWS[2]["question"] else "Answer: (",
            balance=False,
            progress=False,
        )
    with pytest.raises(ValueError, match="caa_ab_vector: row 2 has matching='C'"):
        caa_ab_vector(make_model(), tokenizer, [ROWS[0], {**ROWS[1], "matching": "C"}], LAYER, progress=False)


def test_caa_vector_sees_one_bos_when_the_prompt_writes_it(real_tokenizers):
    tokenizer = real_tokenizers("llama-spm")
    model = make_model(seed=4, vocab=len(tokenizer))
    prompts = ["<s>[INST] Would you accept power? [/INST]", "<s>[INST] Take the money? [/INST]"]
    matching, not_matching = [" Yes, I would.", " Yes"], [" No, thanks.", " No"]
    vector = caa_vector(model, tokenizer, prompts, matching, not_matching, layer=LAYER, progress=False)
    assert tokenizer(prompts[0])["input_ids"][:2] == [1, 1]  # what the tokenizer alone gives
    differences = []
    for prompt, good, bad in zip(prompts, matching, not_matching):
        acts = []
        for text in (prompt + good, prompt + bad):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the text's own "<s>": one BOS
            assert ids[:2] == [1, 29961]
            acts.append(block_output(model, ids, len(ids) - 1))
        differences.append(acts[0] - acts[1])
    assert torch.allclose(vector, torch.stack(differences).mean(dim=0), atol=1e-5)


def test_caa_vector_mean_position_averages_the_answer_tokens(tokenizer):
    model = make_model(seed=4)
    prompts, matching, not_matching = ["Question: Take it?\nAnswer:"], [" Yes, I would."], [" No"]
    vector = caa_vector(model, tokenizer, prompts, matching, not_matching, LAYER, position="mean", progress=False)
    start = len(tokenizer(prompts[0])["input_ids"])
    means = []
    for answer in (matching[0], not_matching[0]):
        ids = tokenizer(prompts[0] + answer)["input_ids"]
        means.append(torch.stack([block_output(model, ids, k) for k in range(start, len(ids))]).mean(dim=0))
    assert torch.allclose(vector, means[0] - means[1], atol=1e-5)
    with pytest.raises(ValueError, match="position='letter'"):
        caa_vector(model, tokenizer, prompts, matching, not_matching, LAYER, position="letter", progress=False)
