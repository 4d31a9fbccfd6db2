"""The real chat model end to end: BiPO trained on SmolLM2-135M-Instruct steers held-out preference both ways, the
shipped demo vector is what its one command makes, and `peft-steer demo` shows the model's answers moving."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

import peft_steer
from peft_steer.data import load_behavior
from peft_steer.evaluate import repetition
from peft_steer.interop import read_adapter
from peft_steer.models import SMOLLM2, smollm2_gguf
from tests.conftest import smollm2_copy
from trl_integration.cli import main
from trl_integration.demo import RECIPE, VECTOR, DemoSettings, run_demo

try:
    smollm2_gguf()
except FileNotFoundError as error:
    pytest.skip(str(error), allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def one_thread():
    """Every core for the real model (replaces the tiny models' one-thread fixture of this folder's conftest)."""
    yield


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_copy()


@pytest.fixture(autouse=True)
def loaded_once(monkeypatch):
    """The commands load SmolLM2 by name as users run them, but from this session's copy: each load from the GGUF
    takes about 20 s (`tests/peft_steer/models` tests the loading itself)."""

    def load_model(name, **kwargs):
        assert name == SMOLLM2 and kwargs.get("dtype", torch.float32) == torch.float32, (name, kwargs)
        return smollm2_copy()[0]

    monkeypatch.setattr("trl_integration.cli.train.load_model", load_model)
    monkeypatch.setattr("trl_integration.cli.measure.load_model", load_model)
    monkeypatch.setattr("trl_integration.demo.load", lambda name: smollm2_copy())


def test_the_recipe_remakes_the_shipped_vector_and_it_moves_held_out_preference_both_ways(tmp_path, smollm2):
    out = tmp_path / "vector"
    assert main(["train", "--config", str(RECIPE), "--output_dir", str(out)]) == 0
    config, vectors = read_adapter(out)
    shipped_config, shipped = read_adapter(VECTOR)
    assert config.layers == shipped_config.layers
    (block,) = config.layers
    made, kept = vectors[block], shipped[block]
    assert torch.allclose(made, kept, rtol=1e-3, atol=1e-4), (
        f"the recipe no longer makes the shipped vector: cosine {float(torch.cosine_similarity(made, kept, 0)):.5f},"
        f" norms {float(made.norm()):.4f} vs {float(kept.norm()):.4f}; rerun it and ship its output"
    )
    report_path = tmp_path / "scores.json"
    argv = ["eval", "--model", SMOLLM2, "--adapter", str(out), "--behavior", "power-seeking", "--metric"]
    argv += ["preference", "--multipliers", "-1,0,1", "--limit", "8", "--no-costs", "--no-prompting"]
    assert main([*argv, "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    low, mid, high = (report["scores"][m] for m in ("-1.0", "0.0", "1.0"))
    margins = [report["mean_margins"][m] for m in ("-1.0", "0.0", "1.0")]
    shown = f"preference {low:.3f} {mid:.3f} {high:.3f}, mean margins {margins}"
    assert low < mid < high, f"held-out preference at -1 / 0 / +1 is not monotonic: {shown}"
    # the mean log-prob margin moves by about 1.8 nats per unit of strength with the shipped vector
    assert margins[0] + 0.5 < margins[1] < margins[2] - 0.5, f"held-out margins move too little: {shown}"
    # `peft-steer eval` agrees with the same score computed here by hand, one pair at a time
    model, tokenizer = smollm2
    steered = PeftModel.from_pretrained(model, str(out)).eval()
    test = load_behavior("power-seeking", "test", tokenizer).select(range(8))
    with peft_steer.steering(steered, multiplier=1.0), torch.no_grad():
        chosen = [_summed_log_prob(steered, tokenizer, p, c) for p, c in zip(test["prompt"], test["chosen"])]
        rejected = [_summed_log_prob(steered, tokenizer, p, c) for p, c in zip(test["prompt"], test["rejected"])]
    score = float(torch.sigmoid(torch.tensor(chosen) - torch.tensor(rejected)).mean())
    assert score == pytest.approx(high, abs=1e-4)


def _summed_log_prob(model, tokenizer, prompt: str, completion: str) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([prompt_ids + completion_ids])).logits[0].double()
    predicting = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
    return float(predicting.gather(-1, torch.tensor(completion_ids)[:, None]).sum())


def test_demo_shows_the_answers_and_the_scores_moving(tmp_path, capsys):
    small = DemoSettings(
        test_pairs=8, caa_questions=8, multipliers=(-2, 0, 2), drift_prompts=4, questions=1, max_new_tokens=12
    )
    folder = run_demo(str(tmp_path), small)
    report = json.loads(open(f"{folder}/scores.json").read())
    bipo = {float(m): score for m, score in report["curves"]["BiPO"].items()}
    assert bipo[-2.0] < bipo[0.0] < bipo[2.0], bipo
    caa = {float(m): score for m, score in report["curves"]["CAA"].items()}
    assert caa[-2.0] != caa[2.0]
    for method in ("BiPO", "CAA"):  # the unsteered model does not drift from itself; a vector moves it
        drift = {float(m): value for m, value in report["drift"][method].items()}
        assert drift[0.0] == 0.0 and drift[-2.0] > 0 and drift[2.0] > 0, (method, drift)
    assert set(report["prompting"]) == {"for", "against"} and report["decoding"] == "greedy, repetition penalty 1.3"
    answers = [json.loads(line) for line in open(f"{folder}/answers.jsonl")]
    for m, value in report["answer_repetition"].items():  # what was printed is what the written answers score
        written = [repetition(a["generation"]) for a in answers if a["multiplier"] == float(m)]
        assert value == pytest.approx(sum(written) / len(written)), (m, value, written)
    assert sorted(record["multiplier"] for record in answers) == [-4.0, 0.0, 4.0]
    assert len({record["generation"] for record in answers}) == 3, "the steered answers do not differ"
    shown = capsys.readouterr().out
    assert "m=-4" in shown and "m=+4" in shown and "BiPO drift" in shown and "repetition penalty 1.3" in shown
    assert "Loading SmolLM2-135M-Instruct" in shown and "done in" in shown  # each slow step says what it does
    with pytest.raises(FileExistsError):
        run_demo(str(tmp_path), small)
