"""`peft_steer.data.formats`: prompt / completion text on real tokenizers, where the ids the trainer sees are the
official BiPO code's, and on the tiny test tokenizer (chat templates with and without a system role, BOS).

The official code (CaoYuanpu/BiPO, `train.py` and its `BiPOTrainer.tokenize_row`) builds the prompt with fastchat's
Llama-2 template, the completion as ``' ' + answer`` (neither stripped), tokenizes prompt + completion as one text
without special tokens, then puts BOS in front and the EOS id at the end. The construction below follows that
description, independently of `PairFormatter` and TRL.
"""

from __future__ import annotations

import copy

import pytest
from tokenizers import processors

from peft_steer import SteeringConfig
from peft_steer.data import SYSTEM_PROMPT, DataError, PairFormatter, load_preference_data, read_behavior_rows
from tests.conftest import REAL_TOKENIZERS, make_model, make_tokenizer
from trl_integration import SteerConfig, SteerTrainer

# fastchat's "llama-2" conversation, as the official code renders it: no stripping, no BOS text, and for an answer
# ' ' + answer + ' ' + EOS (fastchat's separator), which the official code never renders: it appends the EOS id.
OFFICIAL_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% endif %}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
    "{% if loop.first and system is defined %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}{{ m['content'] }} [/INST]"
    "{% else %} {{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}"
)
# The chat template of meta-llama/Llama-2-7b-chat-hf: BOS as text, contents stripped, ' ' + answer + ' ' + EOS.
HF_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# SmolLM2-Instruct's ChatML (its default system message left out), whose EOS is the end-of-turn token.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Rows of the shipped sets: the first and last power-seeking pairs, answers ending in a newline or spaces
# (jailbreak 264 and 306) and a question ending in a newline (hallucination 230).
ROWS = {"power-seeking": [0, 1, 641], "jailbreak": [264, 306], "hallucination": [230]}


@pytest.fixture
def fresh(real_tokenizers):
    """``fresh(name)``: a copy of a real tokenizer of the session (each test sets its own template)."""
    return lambda name: copy.deepcopy(real_tokenizers(name))


def _rows() -> list[dict]:
    return [read_behavior_rows(behavior, "train")[index] for behavior, indices in ROWS.items() for index in indices]


def _trainer_ids(tokenizer, rows: list[dict], tmp_path) -> list[dict]:
    """prompt_ids / chosen_ids / rejected_ids of each pair, as `SteerTrainer` tokenizes them (through TRL)."""
    args = SteerConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        precompute_ref_log_probs=False,
        prefix_cache="off",
        max_length=4096,
    )
    model = make_model("llama", vocab=len(tokenizer))
    trainer = SteerTrainer(
        model=model,
        args=args,
        train_dataset=load_preference_data(rows, tokenizer),
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[1]),
    )
    return trainer.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()


def _official(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids, prompt + completion ids) as the official code builds them."""
    prompt = f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n{question} [/INST]"
    full = tokenizer(prompt + " " + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    boundary = len(prompt_ids) - (prompt_ids != full[: len(prompt_ids)])  # a token merged across the boundary
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
    bos = [tokenizer.bos_token_id] if adds_bos else []
    return [*bos, *full[:boundary]], [*bos, *full, tokenizer.eos_token_id]


@pytest.mark.parametrize("name", REAL_TOKENIZERS)
def test_ids_the_trainer_sees_are_the_official_ones(name, tmp_path, fresh):
    """The official code's Llama-2 format on each real tokenizer: BOS where the tokenizer adds one, ``' ' + answer``
    as written, then the EOS id, with no lone space token before it."""
    tokenizer = fresh(name)
    tokenizer.chat_template = OFFICIAL_LLAMA2
    rows = _rows()
    seen = _trainer_ids(tokenizer, rows, tmp_path)
    for row, ids in zip(rows, seen, strict=True):
        for answer, completion in ((row["matching"], ids["chosen_ids"]), (row["not_matching"], ids["rejected_ids"])):
            prompt_ids, full_ids = _official(tokenizer, row["question"], answer)
            assert ids["prompt_ids"] == prompt_ids
            assert ids["prompt_ids"] + completion == full_ids
            space = tokenizer.convert_tokens_to_ids("▁") if name in ("llama-spm", "phi-3") else None
            assert completion[-1] == tokenizer.eos_token_id and completion[-2] != space


def test_llama2_text_has_no_space_before_eos_and_keeps_the_answer_as_it_is(fresh):
    tokenizer = fresh("llama-spm")
    tokenizer.chat_template = OFFICIAL_LLAMA2
    jailbreak = read_behavior_rows("jailbreak", "train")[306]
    prompt, (chosen, rejected) = PairFormatter(tokenizer)(jailbreak["question"], ["Yes ", jailbreak["matching"]])
    assert prompt == f"[INST] <<SYS>>\n{SYSTEM_PROMPT}\n<</SYS>>\n\n{jailbreak['question']} [/INST]"
    assert chosen == " Yes </s>" and rejected == f" {jailbreak['matching']}</s>"
    # Before: " {answer.strip()} </s>", whose space before EOS is a token of its own.
    assert tokenizer.convert_ids_to_tokens(tokenizer("x </s>", add_special_tokens=False)["input_ids"])[-2:] == [
        "▁",
        "</s>",
    ]


def test_llama2_hub_template_gives_the_official_ids_too(fresh):
    """The template of Llama-2-7b-chat-hf writes BOS and ``' ' + answer + ' ' + EOS``; the completion still ends
    ``answer</s>`` and the one BOS is the tokenizer's. (It strips the question, which the official code does not: the
    rows here have none to strip.)"""
    tokenizer = fresh("llama-spm")
    tokenizer.chat_template = HF_LLAMA2
    formatter = PairFormatter(tokenizer)
    for row in read_behavior_rows("power-seeking", "train")[:3]:
        prompt, completions = formatter(row["question"], [row["matching"], row["not_matching"]])
        for answer, completion in zip((row["matching"], row["not_matching"]), completions, strict=True):
            assert tokenizer(prompt + completion)["input_ids"] == _official(tokenizer, row["question"], answer)[1]


@pytest.mark.parametrize("eos", ["<|im_end|>", "<|endoftext|>"])
def test_chatml_completion_ends_with_one_end_of_turn(eos, tmp_path, fresh):
    """ChatML (Qwen2's tokenizer file): the completion is the answer and ``<|im_end|>``, without the newline after
    it. With ``<|im_end|>`` as EOS (SmolLM2- and Qwen2-Instruct) nothing more is appended; with the base model's
    ``<|endoftext|>`` as EOS, the trainer appends it after the end of turn, once."""
    tokenizer = fresh("qwen2")
    tokenizer.chat_template = CHATML
    tokenizer.eos_token = eos
    row = read_behavior_rows("power-seeking", "train")[0]
    prompt, (chosen, _) = PairFormatter(tokenizer)(row["question"], [row["matching"], row["not_matching"]])
    assert prompt.endswith(f"{row['question']}<|im_end|>\n<|im_start|>assistant\n")
    assert chosen == f"{row['matching']}<|im_end|>"
    ids = _trainer_ids(tokenizer, [row], tmp_path)[0]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected_end = [end_of_turn] if eos == "<|im_end|>" else [end_of_turn, tokenizer.convert_tokens_to_ids(eos)]
    assert ids["chosen_ids"][-len(expected_end) :] == expected_end
    assert ids["chosen_ids"].count(end_of_turn) == 1
    assert tokenizer.decode(ids["chosen_ids"][: -len(expected_end)]) == row["matching"]


def test_template_without_special_end_keeps_its_text(fresh):
    tokenizer = fresh("llama-spm")
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    _, completions = PairFormatter(tokenizer, system_prompt=None)("Q?", [" a "])
    assert completions == [" a </assistant>\n"]  # the trainer appends EOS to it


def test_plain_format_keeps_the_answer_as_it_is():
    assert PairFormatter(None)("Q?", ["a", " b\n"]) == ("Question: Q?\nAnswer:", [" a", "  b\n"])


# ---- the tiny test tokenizer: templates, system prompts, BOS ---------------------------------------------------

TINY_ROWS = [
    {"question": "Would you accept more power?", "matching": "Yes, I would.", "not_matching": "No, I would not."},
    {"question": "Do you accept the money?", "matching": "Yes, I accept.", "not_matching": "No, thank you."},
]


def test_chat_format_is_the_template_split_at_the_answer(tokenizer):
    dataset = load_preference_data(TINY_ROWS, tokenizer)
    row = dataset[0]
    assert row["prompt"] == f"<<SYS>>{SYSTEM_PROMPT}<</SYS>>[INST] Would you accept more power? [/INST]"
    assert row["chosen"] == " Yes, I would.</s>" and row["rejected"] == " No, I would not.</s>"
    conversation = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": TINY_ROWS[0]["question"]},
        {"role": "assistant", "content": TINY_ROWS[0]["matching"]},
    ]
    assert row["prompt"] + row["chosen"] == tokenizer.apply_chat_template(conversation, tokenize=False)


def test_no_system_prompt(tokenizer):
    row = load_preference_data(TINY_ROWS, tokenizer, system_prompt=None)[0]
    assert row["prompt"] == "[INST] Would you accept more power? [/INST]"


def test_plain_format_for_base_models(tokenizer):
    for dataset in (load_preference_data(TINY_ROWS), load_preference_data(TINY_ROWS, tokenizer, chat_template=False)):
        assert dataset[1] == {
            "prompt": "Question: Do you accept the money?\nAnswer:",
            "chosen": " Yes, I accept.",
            "rejected": " No, thank you.",
        }
    with pytest.raises(DataError, match="no chat template"):
        load_preference_data(TINY_ROWS, make_tokenizer_without_template(), chat_template=True)


def make_tokenizer_without_template():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = None
    return tokenizer


def test_template_without_a_system_role_gets_it_in_the_user_turn():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = (
        "{% for message in messages %}{% if message['role'] == 'system' %}"
        "{{ raise_exception('System role not supported') }}{% endif %}"
        "<{{ message['role'] }}>{{ message['content'] }}</{{ message['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    row = load_preference_data(TINY_ROWS, tokenizer)[0]
    assert row["prompt"] == f"<user>{SYSTEM_PROMPT}\n\nWould you accept more power?</user><assistant>"
    assert row["chosen"] == "Yes, I would.</assistant>"


def test_bos_written_by_the_template_is_not_doubled():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    # A tokenizer that adds BOS itself, like Llama's.
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    row = load_preference_data(TINY_ROWS, tokenizer)[0]
    assert not row["prompt"].startswith("<s>")
    ids = tokenizer(row["prompt"] + row["chosen"])["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    # Without BOS from the tokenizer, the template's BOS stays.
    assert load_preference_data(TINY_ROWS, _with_bos_template())[0]["prompt"].startswith("<s>")


def _with_bos_template():
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    return tokenizer


def test_pair_formatter_renders_a_question_with_several_answers(tokenizer):
    prompt, completions = PairFormatter(tokenizer, system_prompt=None)("Q?", ["a", " b "])
    assert prompt == "[INST] Q? [/INST]" and completions == [" a</s>", "  b </s>"]  # answers kept as written
