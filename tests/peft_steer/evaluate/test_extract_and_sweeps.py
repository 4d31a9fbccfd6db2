"""CAA extraction against reference math, the A/B score against an independent computation, generation sweeps
and the steering-curve plot."""

import json

import pytest
import torch
from peft import get_peft_model

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.evaluate import ab_score, caa_vector, chat_ab_prompt, generate_sweep
from tests.conftest import make_model

PROMPTS = ["Question: Would you accept power?\nAnswer:", "Question: Take the money?\nAnswer:"]
MATCHING = [" Yes, I would take control.", " Yes"]
NOT_MATCHING = [" No, I would rather help others.", " No thanks"]


def test_caa_vector_is_the_mean_difference_at_the_last_answer_token(tokenizer):
    model = make_model()
    vector = caa_vector(model, tokenizer, PROMPTS, MATCHING, NOT_MATCHING, layer=2, progress=False)
    differences = []
    for prompt, good, bad in zip(PROMPTS, MATCHING, NOT_MATCHING):
        acts = []
        for text in (prompt + good, prompt + bad):
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            with torch.no_grad():
                acts.append(model(ids, output_hidden_states=True).hidden_states[3][0, -1])  # output of block 2
        differences.append(acts[0] - acts[1])
    assert torch.allclose(vector, torch.stack(differences).mean(dim=0), atol=1e-5)


def test_caa_ignores_active_steering_and_can_start_bipo(tokenizer):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1], init="random"))
    steered = caa_vector(model, tokenizer, PROMPTS, MATCHING, NOT_MATCHING, layer=2, progress=False)
    plain = caa_vector(make_model(), tokenizer, PROMPTS, MATCHING, NOT_MATCHING, layer=2, progress=False)
    assert torch.allclose(steered, plain, atol=1e-6)
    started = get_peft_model(make_model(), SteeringConfig(layers=[2], init_vectors={2: plain}))
    assert torch.equal(peft_steer.get_vectors(started)[2], plain)


def test_ab_score_equals_an_independent_next_token_computation(tokenizer):
    model = make_model()
    rows = [
        {"question": "Would you accept power?", "A": "Yes", "B": "No", "matching": "(A)"},
        {"question": "Take the money?", "A": "No thanks", "B": "Yes", "matching": "B"},
    ]
    score = ab_score(model, tokenizer, rows, progress=False)[None]
    format_prompt = chat_ab_prompt(tokenizer)
    expected = []
    for row, letter in zip(rows, ["A", "B"]):
        ids = tokenizer(format_prompt(row))["input_ids"]
        with torch.no_grad():
            probs = model(torch.tensor([ids])).logits[0, -1].softmax(-1)
        a, b = (tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in ("A", "B"))
        expected.append(float(probs[a if letter == "A" else b] / (probs[a] + probs[b])))
    assert score == pytest.approx(sum(expected) / 2, abs=1e-5)
    with pytest.raises(ValueError, match="row 1 has matching='C'"):
        ab_score(model, tokenizer, [{**rows[0], "matching": "C"}], progress=False)


def test_ab_score_moves_with_the_multiplier(tokenizer):
    model = get_peft_model(make_model(), SteeringConfig(layers=[2]))
    peft_steer.set_vectors(model, {2: 0.2 * torch.randn(32, generator=torch.Generator().manual_seed(0))})
    rows = [{"question": "Would you accept power?", "A": "Yes", "B": "No", "matching": "A"}]
    scores = ab_score(model, tokenizer, rows, multipliers=[-1, 0, 1], progress=False)
    assert list(scores) == [-1.0, 0.0, 1.0] and len(set(scores.values())) == 3


def test_generate_sweep_writes_one_record_per_question_and_strength(tokenizer, tmp_path):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1]))
    peft_steer.set_vectors(model, {1: 0.02 * torch.randn(32, generator=torch.Generator().manual_seed(3))})
    questions = ["Would you accept power?", "Take it?"]
    records = generate_sweep(model, tokenizer, questions, [-2, 0, 2], tmp_path / "gen.jsonl", max_new_tokens=6)
    saved = [json.loads(line) for line in open(tmp_path / "gen.jsonl")]
    assert saved == records and len(saved) == 6
    assert [r["multiplier"] for r in saved] == [-2.0, -2.0, 0.0, 0.0, 2.0, 2.0]
    by_strength = {m: [r["generation"] for r in saved if r["multiplier"] == m] for m in (-2.0, 0.0, 2.0)}
    assert by_strength[-2.0] != by_strength[2.0]
    base = generate_sweep(make_model(), tokenizer, questions, [0], tmp_path / "base.jsonl", max_new_tokens=6)
    assert by_strength[0.0] == [r["generation"] for r in base]  # multiplier 0 is the unsteered model


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from peft_steer.evaluate import plot_steering_curve

    path = plot_steering_curve(
        {"BiPO": {-1: 0.3, 0: 0.5, 1: 0.7}, "CAA": {-1: 0.45, 0: 0.5, 1: 0.55}}, tmp_path / "c.png"
    )
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
