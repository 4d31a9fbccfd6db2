"""Resuming a generation sweep only from records that can be trusted (issue 24): every line checked before any
generation, the settings that made them stored and compared, ids that name (question, multiplier, settings), inputs
asked once, and one writer at a time."""

from __future__ import annotations

import fcntl
import json

import pytest
import torch
from peft import get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.evaluate import generate_sweep
from peft_steer.evaluate.generation import check_resumable, record_id, run_settings
from tests.conftest import make_model

SETTINGS = {"model": "tiny", "adapter": "abc"}


@pytest.fixture(scope="module")
def steered():
    model = get_peft_model(make_model(), SteeringConfig(layers=[1]))
    peft_steer.set_vectors(model, {1: 0.02 * torch.randn(32, generator=torch.Generator().manual_seed(3))})
    return model


def sweep(model, tokenizer, path, questions=("Hi?",), multipliers=(0,), **kwargs):
    kwargs = {"max_new_tokens": 2, "progress": False, "settings": SETTINGS, **kwargs}
    return generate_sweep(model, tokenizer, list(questions), list(multipliers), path, **kwargs)


def record(**changes):
    settings = run_settings(2, {}, SETTINGS)
    base = {
        "id": record_id("Hi?", 0.0, settings),
        "question": "Hi?",
        "multiplier": 0.0,
        "prompt": "Q",
        "generation": "",
    }
    return {**base, "settings": settings, **changes}


# name: (the line an existing file holds, what the error must say)
BAD_RECORDS = {
    "null multiplier": (record(multiplier=None), "'multiplier' is None, not a finite number"),
    "list question": (record(question=["Hi?"]), "'question' is ['Hi?'], not text"),
    "no generation": ({k: v for k, v in record().items() if k != "generation"}, "'generation' is None"),
    "an earlier peft-steer's record": (
        {"id": "+0/0", "question": "Hi?", "multiplier": 0.0, "prompt": "Q", "generation": ""},
        "does not say what made it",
    ),
    "a repeated record": (record(question="Fine?", id="1"), "repeats the record 1"),
    "other max_new_tokens": (record(settings=run_settings(5, {}, SETTINGS)), "made with max_new_tokens 5"),
    "another adapter": (record(settings=run_settings(2, {}, {**SETTINGS, "adapter": "xyz"})), "made with adapter"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_file_of_records_that_cannot_be_resumed_is_refused_before_generating(tokenizer, tmp_path, case):
    line, message = BAD_RECORDS[case]
    out = tmp_path / "gen.jsonl"
    text = json.dumps(record(question="Fine?", id="1")) + "\n" + json.dumps(line) + "\n"
    out.write_text(text)
    model = make_model()
    model.generate = lambda *args, **kwargs: pytest.fail("generated before the file was checked")
    for check in (lambda: check_resumable(out, 2, SETTINGS), lambda: sweep(model, tokenizer, out)):
        with pytest.raises(ValueError) as raised:
            check()
        assert "gen.jsonl, line 2: " in str(raised.value) and message in str(raised.value)
    assert out.read_text() == text


def test_ids_name_question_multiplier_and_settings_and_inputs_are_asked_once(steered, tokenizer, tmp_path):
    first = sweep(steered, tokenizer, tmp_path / "a.jsonl", ["Take it?"], [0.5, 0.5000001, 1, 1.0, -0.0, 0])
    assert [r["multiplier"] for r in first] == [0.5, 0.5000001, 1.0, 0.0]
    assert len({r["id"] for r in first}) == 4  # not the run index: 0.5 and 0.5000001 were one id
    # a question added in front: the old question keeps its id
    again = sweep(steered, tokenizer, tmp_path / "b.jsonl", ["New?", "Take it?", "Take it?"], [1])
    assert [r["question"] for r in again] == ["New?", "Take it?"]
    assert again[1]["id"] == first[2]["id"] and again[0]["id"] != again[1]["id"]
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 2


def test_a_second_writer_is_refused_while_the_first_holds_the_file(steered, tokenizer, tmp_path):
    out = tmp_path / "gen.jsonl"
    sweep(steered, tokenizer, out)
    text = out.read_text()
    with open(out, "a") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run, writing
        for check in (lambda: check_resumable(out, 2, SETTINGS), lambda: sweep(steered, tokenizer, out, ["New?"])):
            with pytest.raises(BlockingIOError, match="being written by another run"):
                check()
    assert out.read_text() == text
    assert len(sweep(steered, tokenizer, out, ["New?"])) == 1  # the lock is gone with the other run
