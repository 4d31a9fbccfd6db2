"""`peft-steer eval` and `peft-steer generate` on a tiny saved model with a steering adapter."""

from __future__ import annotations

import csv
import fcntl
import json
import os

import pytest
import torch
from peft import PeftModel, get_peft_model

from peft_steer import SteeringConfig, steering
from peft_steer.data import PairFormatter, load_behavior, neutral_questions, plain_prompt, prompting_pair
from peft_steer.evaluate import answer_preference, completion_log_probs, next_token_drift
from peft_steer.models import load_model, load_tokenizer
from peft_steer.organism import ANTI_TAG, ORGANISM_DIR, TAG, load_organism, stance_rows
from tests.conftest import make_config, make_model
from tests.peft_steer.interop.test_adapter_files import BAD_ADAPTERS, save_adapter
from tests.trl_integration.cli.test_files import fails
from trl_integration.cli import main, measure


@pytest.fixture
def adapter_dir(model_dir, tmp_path) -> str:
    """A steering adapter at block 1 of the tiny Llama in ``model_dir``, with a vector large enough to matter."""
    torch.manual_seed(1)
    model = get_peft_model(load_model(model_dir), SteeringConfig(layers=[1], init_vectors={1: torch.randn(32) * 4}))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return str(folder)


def test_eval_preference_agrees_with_an_independent_computation(model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    (tmp_path / "scores.json.partial").write_text("mine")  # a user's file, never taken for a temporary (issue 24)
    argv = ["eval", "--model", model_dir, "--adapter", adapter_dir, "--behavior", "power-seeking"]
    argv += ["--metric", "preference", "--multipliers", "-1,0,1", "--limit", "6", "--json", str(out)]
    argv += ["--cost-prompts", "4", "--cost-max-new-tokens", "6"]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["metric"] == "preference" and report["n"] == 6
    assert list(report["scores"]) == ["-1.0", "0.0", "1.0"]
    # independently: the same formatted pairs, scored one at a time with the model's plain forward
    tokenizer = load_tokenizer(model_dir)
    pairs = load_behavior("power-seeking", "test", tokenizer).select(range(6))
    model = PeftModel.from_pretrained(load_model(model_dir), adapter_dir).eval()
    margins = {}
    for m in (-1.0, 0.0, 1.0):
        with steering(model, multiplier=m):
            chosen = completion_log_probs(model, tokenizer, pairs["prompt"], pairs["chosen"], batch_size=1)
            rejected = completion_log_probs(model, tokenizer, pairs["prompt"], pairs["rejected"], batch_size=1)
        expected = float(torch.sigmoid(chosen - rejected).mean())
        assert report["scores"][str(m)] == pytest.approx(expected, abs=1e-6)
        lengths = torch.tensor(
            [
                [len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in pairs[side]]
                for side in ("chosen", "rejected")
            ]
        )
        per_token = (chosen / lengths[0] - rejected / lengths[1]).mean()
        assert report["token_margins"][str(m)] == pytest.approx(float(per_token), abs=1e-6)
        margins[m] = chosen - rejected
    for m in (-1.0, 0.0, 1.0):  # the share of pairs whose margin is above the unsteered one (ties half)
        up = (margins[m] > margins[0.0] + 1e-9).double() + 0.5 * ((margins[m] - margins[0.0]).abs() <= 1e-9).double()
        assert report["shares_up"][str(m)] == float(up.mean())
    assert report["shares_up"]["0.0"] == 0.5 and report["unsteered_score"] == report["scores"]["0.0"]
    # the prompting baseline: the shipped pair in place of the system prompt, at multiplier 0
    assert report["prompting_system_prompts"] == prompting_pair("power-seeking")
    for side, text in prompting_pair("power-seeking").items():
        prompted = load_behavior("power-seeking", "test", tokenizer, system_prompt=text).select(range(6))
        assert all(text in prompt for prompt in prompted["prompt"])
        with steering(model, multiplier=0.0):
            chosen = completion_log_probs(model, tokenizer, prompted["prompt"], prompted["chosen"], batch_size=1)
            rejected = completion_log_probs(model, tokenizer, prompted["prompt"], prompted["rejected"], batch_size=1)
        expected = float(torch.sigmoid(chosen - rejected).mean())
        assert report["prompting"][side] == pytest.approx(expected, abs=1e-6)
    mean_margins = report["mean_margins"]
    assert (
        abs(mean_margins["1.0"] - mean_margins["-1.0"]) > 1e-2
    )  # the adapter steers (the tiny model's scores saturate)
    table = capsys.readouterr().out
    assert "multiplier" in table and "+1" in table and "share up" in table and "margin/token" in table
    assert "prompting at multiplier 0" in table and "system prompt against" in table
    assert main(argv) == 2  # the JSON file is never overwritten
    assert json.loads(out.read_text()) == report
    assert (tmp_path / "scores.json.partial").read_text() == "mine"
    # the costs, keyed as the scores are, on the first 4 neutral questions in the same prompt format
    header = next(line for line in table.splitlines() if line.lstrip().startswith("multiplier"))
    assert all(name in header for name in ("drift", "perplexity", "repetition"))
    assert all(list(report[name]) == ["-1.0", "0.0", "1.0"] for name in ("drift", "perplexity", "repetition"))
    assert report["costs"]["prompts"] == 4 and report["costs"]["max_new_tokens"] == 6
    prompts = [PairFormatter(tokenizer).prompt(question) for question in neutral_questions()[:4]]
    drift = next_token_drift(model, tokenizer, prompts, [-1, 0, 1])
    assert report["drift"] == {str(m): pytest.approx(value, abs=1e-9) for m, value in drift.items()}
    assert report["drift"]["0.0"] == 0.0 and report["drift"]["1.0"] > 0
    assert all(value is None or value >= 1 for value in report["perplexity"].values())
    assert all(0 <= value <= 1 for value in report["repetition"].values())


def test_eval_warns_when_the_unsteered_score_is_saturated(model_dir, adapter_dir, tmp_path, capsys):
    """Jailbreak's long compliant answers against short refusals: answer preference 0.000 without steering (issue 22,
    part 5); multiplier 0 is measured for the warning and the shares even when not asked for."""
    out = tmp_path / "scores.json"
    argv = ["eval", "--model", model_dir, "--adapter", adapter_dir, "--behavior", "jailbreak", "--metric"]
    argv += ["preference", "--multipliers", "-1,1", "--limit", "3", "--no-costs", "--json", str(out)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(out.read_text())
    assert report["unsteered_score"] < 0.03 and list(report["scores"]) == ["-1.0", "1.0"]
    (warning,) = report["warnings"]
    assert [line for line in captured.err.splitlines() if line.startswith("warning:")] == [warning]
    assert f"{report['unsteered_score']:.3f}" in warning
    assert 0 <= report["shares_up"]["1.0"] <= 1 and report["shares_up"]["1.0"] != 0.5  # it moves; the score cannot
    assert abs(report["scores"]["1.0"] - report["scores"]["-1.0"]) < 0.03


def test_eval_prompting_baseline_on_the_organism(tmp_path, capsys):
    """The organism's persona tags as the prompting pair: without a chat template each goes on its own line before
    'Question:', and the tag moves the held-out preference as a system prompt does a chat model's."""
    model, tokenizer = load_organism()
    get_peft_model(model, SteeringConfig(layers=[2], init_vectors={2: torch.zeros(128)})).save_pretrained(
        tmp_path / "adapter"
    )
    rows = stance_rows("hallucination", "test")[:12]
    data = tmp_path / "stance.csv"
    with open(data, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["question", "matching", "not_matching"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "scores.json"
    argv = ["eval", "--model", str(ORGANISM_DIR), "--adapter", str(tmp_path / "adapter"), "--data", str(data)]
    argv += ["--metric", "preference", "--multipliers", "0", "--no-costs", "--json", str(out)]
    assert main([*argv, "--prompting-for", TAG, "--prompting-against", ANTI_TAG]) == 0
    report = json.loads(out.read_text())
    prompting, shares = report["prompting"], report["prompting_shares_up"]
    assert prompting["for"] > report["unsteered_score"] + 0.2 and prompting["against"] < report["unsteered_score"] - 0.2
    assert shares["for"] > 0.8 and shares["against"] < 0.2
    plain = answer_preference(model, tokenizer, rows, lambda question: f"{TAG}\n{plain_prompt(question)}")[None]
    assert prompting["for"] == pytest.approx(plain.score, abs=1e-6)
    assert "prompting at multiplier 0" in capsys.readouterr().out
    out.unlink()
    assert main(argv) == 0  # --data without a pair: no baseline
    assert json.loads(out.read_text())["prompting"] is None
    assert "prompting at" not in capsys.readouterr().out
    out.unlink()
    for extra, option in (
        (["--prompting-for", TAG], "--prompting-against"),
        (["--prompting-for", " ", "--prompting-against", ANTI_TAG], "--prompting-for"),
        (["--no-prompting", "--prompting-for", TAG, "--prompting-against", ANTI_TAG], "--no-prompting"),
    ):
        assert main([*argv, *extra]) == 2
        error = capsys.readouterr().err
        assert option in error and len(error.strip().splitlines()) == 1 and not out.exists()
    formatted = tmp_path / "formatted.csv"
    formatted.write_text('prompt,chosen,rejected\n"Question: Take power?\nAnswer:", Yes, No\n')
    pair = ["--prompting-for", TAG, "--prompting-against", ANTI_TAG]
    assert main([*argv[:5], "--data", str(formatted), *argv[7:], *pair]) == 2
    assert "already formatted" in capsys.readouterr().err and not out.exists()


def test_eval_cost_options(model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    base = ["eval", "--model", model_dir, "--adapter", adapter_dir, "--behavior", "power-seeking"]
    base += ["--metric", "preference", "--multipliers", "0,2", "--limit", "2"]
    for option, value in (("--cost-prompts", "0"), ("--cost-prompts", "49"), ("--cost-max-new-tokens", "0")):
        assert main([*base, option, value, "--json", str(out)]) == 2
        error = capsys.readouterr().err
        assert option in error and len(error.strip().splitlines()) == 1
        assert not out.exists()
    assert main([*base, "--no-costs", "--json", str(out)]) == 0
    assert "drift" not in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert not {"drift", "perplexity", "repetition", "costs"} & set(report)


def test_eval_ab_on_a_data_file_and_bad_input(model_dir, adapter_dir, tmp_path, capsys):
    data = tmp_path / "ab.csv"
    data.write_text("question,A,B,matching\nTake power?,Yes,No,A\nGive it away?,Yes,No,B\n")
    base = ["eval", "--model", model_dir, "--adapter", adapter_dir, "--data", str(data), "--metric", "ab"]
    assert main([*base, "--multipliers", "-2,2"]) == 0
    assert "A/B score" in capsys.readouterr().out
    assert main([*base, "--multipliers", "-2,x"]) == 2
    assert "--multipliers" in capsys.readouterr().err
    assert main([*base, "--multipliers", "1,1e39"]) == 2  # refused before m=1 is computed (issue 24)
    assert "float32's range" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("question,A,B\nTake power?,Yes,No\n")
    assert main([*base[:-4], "--data", str(bad)]) == 2
    error = capsys.readouterr().err
    assert "row 1" in error and "matching" in error
    assert main([*base[:4], str(tmp_path / "nothing"), *base[5:]]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_generate_writes_records_as_they_come_and_a_rerun_skips_what_is_done(model_dir, adapter_dir, tmp_path, capsys):
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", model_dir, "--adapter", adapter_dir, "--prompt", "Take power?", "Give it away?"]
    argv += ["--multipliers", "-2,0,2", "--max-new-tokens", "5", "--out", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["question"], r["multiplier"]) for r in records] == [
        (q, m) for m in (-2.0, 0.0, 2.0) for q in ("Take power?", "Give it away?")
    ]
    assert len({r["generation"] for r in records if r["question"] == "Take power?"}) > 1  # steering changes text
    assert "m=+2" in capsys.readouterr().out
    # an interrupted run: the last record half-written; the rerun keeps the complete ones and redoes the rest
    text = out.read_text()
    kept = "".join(text.splitlines(keepends=True)[:4])
    out.write_text(kept + text.splitlines(keepends=True)[4][:20])
    assert main(argv) == 0
    rerun = [json.loads(line) for line in out.read_text().splitlines()]
    assert rerun == records
    assert main([*argv[:-2], "--out", str(tmp_path)]) == 2  # a folder is refused


def test_generate_refuses_a_file_that_holds_no_records_and_adds_a_missing_newline(model_dir, adapter_dir, tmp_path):
    """A one-line file of another tool (no newline) is not taken for a half-written record and emptied; a records
    file whose last line lacks its newline (an editor's save) gets one before the next record (issue 24, items 1-2)."""
    argv = ["generate", "--model", model_dir, "--adapter", adapter_dir, "--prompt", "Take power?"]
    argv += ["--max-new-tokens", "3"]
    for text in ('{"model":"x","scores":[1,2,3]}', "plain notes, not JSON"):
        other = tmp_path / "results.json"
        other.write_text(text)
        assert main([*argv, "--multipliers", "0", "--out", str(other)]) == 2
        assert other.read_text() == text
    out = tmp_path / "answers.jsonl"
    assert main([*argv, "--multipliers", "0", "--out", str(out)]) == 0
    out.write_text(out.read_text().rstrip("\n"))
    assert main([*argv, "--multipliers", "0,1", "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["multiplier"] for r in records] == [0.0, 1.0]


# ---- bad input: one line naming the thing to fix, exit code 2, before any model is loaded ------------------------


@pytest.fixture(scope="module")
def config_only_model(tmp_path_factory) -> str:
    """The tiny Llama's config alone: enough for every check; loading its weights or tokenizer would fail."""
    folder = tmp_path_factory.mktemp("config-only")
    make_config("llama").save_pretrained(folder)
    return str(folder)


@pytest.fixture
def no_model_loads(monkeypatch):
    """The checks must end the command before the tokenizer or the model is loaded."""

    def refused(*args, **kwargs):
        raise AssertionError("loaded a model before the inputs were checked")

    monkeypatch.setattr(measure, "load_model", refused)
    monkeypatch.setattr(measure, "load_tokenizer", refused)


@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_eval_and_generate_refuse_what_info_refuses_before_loading(
    config_only_model, no_model_loads, tmp_path, capsys, case, command
):
    """One reader for every command (issue 24): the same line as `info`, not a SafetensorError / TypeError /
    RecursionError / UnpicklingError traceback or a hub error, and nothing written."""
    damage, culprit, message = BAD_ADAPTERS[case]
    adapter = save_adapter(tmp_path / "adapter")
    damage(adapter)
    argv = [command, "--model", config_only_model, "--adapter", adapter, "--behavior", "power-seeking"]
    argv += ["--out", tmp_path / "out.jsonl"] if command == "generate" else ["--json", tmp_path / "out.json"]
    fails(argv, capsys, adapter / culprit, message)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_eval_refuses_an_adapter_for_another_model_before_loading(config_only_model, no_model_loads, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    get_peft_model(make_model(hidden=64), SteeringConfig(layers=[1])).save_pretrained(adapter)
    argv = ["eval", "--model", config_only_model, "--adapter", adapter, "--behavior", "power-seeking"]
    fails(argv, capsys, adapter / "adapter_config.json", "hidden size 64")


def _dangling(tmp_path):
    (tmp_path / "link.json").symlink_to(tmp_path / "nowhere.json")
    return tmp_path / "link.json"


def _read_only_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes in a read-only folder")
    (tmp_path / "ro").mkdir(mode=0o555)
    return tmp_path / "ro" / "s.json"


# name: (the --json / --out path the case makes, what the line must say)
BAD_DESTINATIONS = {
    "missing folder": (lambda tmp: tmp / "no-such-folder" / "s.json", "does not exist; create it first"),
    "a file for a folder": (lambda tmp: tmp / "adapter" / "adapter_config.json" / "s.json", "does not exist"),
    "dangling symlink": (_dangling, "symbolic link"),
    "read-only folder": (_read_only_folder, "cannot write"),
    "a folder": (lambda tmp: tmp / "adapter", "is a folder"),
}


@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("case", list(BAD_DESTINATIONS))
def test_an_output_that_cannot_be_written_is_refused_before_any_work(
    config_only_model, no_model_loads, tmp_path, capsys, case, command
):
    """Not after the whole evaluation, naming an internal temporary file (issue 24)."""
    adapter = save_adapter(tmp_path / "adapter")
    make_path, message = BAD_DESTINATIONS[case]
    path = make_path(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    option = "--json" if command == "eval" else "--out"
    argv = [command, "--model", config_only_model, "--adapter", adapter, "--behavior", "power-seeking", option, path]
    err = fails(argv, capsys, f"{option} {path}", message)
    assert "peft-steer-" not in err and ".partial" not in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_generate_resumes_only_a_file_made_with_the_same_settings(model_dir, adapter_dir, tmp_path, capsys):
    """Not the old answers under new settings (issue 24, item 3): refused before the model loads, naming the
    setting; repeated inputs asked once, and said (item 5)."""
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", model_dir, "--prompt", "Hi?", "Hi?", "--max-new-tokens", "3", "--out", str(out)]
    assert main([*argv, "--adapter", adapter_dir, "--multipliers", "1,1.0,-0,0"]) == 0
    assert "--multipliers: 2 repeated values dropped" in capsys.readouterr().err
    text = out.read_text()
    assert [json.loads(line)["multiplier"] for line in text.splitlines()] == [1.0, 0.0]
    other = tmp_path / "other"
    get_peft_model(load_model(model_dir), SteeringConfig(layers=[1], init="random")).save_pretrained(other)
    changed = {
        "adapter": [*argv, "--adapter", str(other)],
        "max_new_tokens": [*argv[:-4], "--max-new-tokens", "4", "--out", str(out), "--adapter", adapter_dir],
        "format": [*argv, "--adapter", adapter_dir, "--no-chat-template"],
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(measure, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
        for setting, args in changed.items():
            fails(args, capsys, f"{out}, line 1: made with {setting} ", "write to another file")
    assert out.read_text() == text
    assert main([*argv, "--adapter", adapter_dir, "--multipliers", "0,2"]) == 0  # the same settings: resumed
    assert [json.loads(line)["multiplier"] for line in out.read_text().splitlines()] == [1.0, 0.0, 2.0]
    assert "--prompt: 1 repeated prompt dropped" in capsys.readouterr().err


def test_generate_refuses_bad_records_and_a_second_writer_before_loading(
    config_only_model, no_model_loads, tmp_path, capsys
):
    adapter = save_adapter(tmp_path / "adapter")
    out = tmp_path / "answers.jsonl"
    argv = ["generate", "--model", config_only_model, "--adapter", adapter, "--prompt", "Hi?", "--out", out]
    for line, message in [
        ({"id": "a", "question": "Hi?", "multiplier": None, "prompt": "Q", "generation": ""}, "'multiplier' is None"),
        ({"id": "a", "question": ["Hi?"], "multiplier": 1, "prompt": "Q", "generation": ""}, "'question' is ['Hi?']"),
        ({"id": "a", "question": "Hi?", "multiplier": 1, "prompt": "Q"}, "'generation' is None"),
    ]:
        out.write_text(json.dumps(line) + "\n")
        fails(argv, capsys, f"{out}, line 1: {message}")
    out.write_text("")
    with open(out, "a") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        fails(argv, capsys, out, "being written by another run")


def test_eval_ab_refuses_cells_that_are_not_text_as_the_preference_metric_does(
    model_dir, adapter_dir, tmp_path, capsys, monkeypatch
):
    """One cell check for every metric (issue 24, item 6): not '(B) None' or a list scored as its text."""
    monkeypatch.setattr(measure, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    short = tmp_path / "short.csv"
    short.write_text("question,matching,A,B\nTake power?,A,Yes,No\nGive it away?,B,Yes\n")
    cases = {short: ("line 3", "column 'B'", "missing")}
    for name, cell, kind in [("null", None, "missing"), ("list", ["Yes"], "a list"), ("dict", {"t": 1}, "a dict")]:
        path = tmp_path / f"{name}.jsonl"
        rows = [{"question": "Take power?", "A": "Yes", "B": "No", "matching": "A"}]
        rows.append({"question": "Give it away?", "A": cell, "B": "No", "matching": "B"})
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        cases[path] = ("line 2", "column 'A'", kind)
    for path, expected in cases.items():
        argv = ["eval", "--model", model_dir, "--adapter", adapter_dir, "--data", path, "--metric", "ab"]
        fails(argv, capsys, path, *expected)


def test_eval_preference_names_the_formats_it_takes(model_dir, adapter_dir, tmp_path, capsys, monkeypatch):
    """Not "Column 'prompt' doesn't exist" or a tokenizer error (issue 24)."""
    monkeypatch.setattr(measure, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    user, yes, no = {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Yes"}, {"role": "assistant"}
    no = {**no, "content": "No"}
    cases = {
        "implicit": ({"chosen": "Hi? Yes", "rejected": "Hi? No"}, "implicit-prompt format"),
        "conversational": ({"prompt": [user], "chosen": [yes], "rejected": [no]}, "conversational"),
        "implicit conversational": ({"chosen": [user, yes], "rejected": [user, no]}, "implicit-prompt format"),
    }
    for name, (row, kind) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(row) + "\n")
        argv = ["eval", "--model", model_dir, "--adapter", adapter_dir, "--data", path, "--metric", "preference"]
        fails(argv, capsys, f"--metric preference on {path}", kind, "prompt / chosen / rejected as text")
