"""`peft-steer train --config run.yaml`, TRL's convention: every `SteerConfig` field and the exposed `SteeringConfig`
fields by their own names, in the file or on the command line (which overrides the file); `--report_to`,
`--push_to_hub`, `--hub_model_id`; data that `datasets.load_dataset` reads."""

from __future__ import annotations

import csv
import dataclasses
import os
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from huggingface_hub import HfApi, RepoUrl
from peft import PeftModel

import trl_integration.cli.train as train_module
from tests.conftest import make_model
from tests.trl_integration.conftest import QUESTIONS, bipo_rows
from trl_integration import SteerConfig
from trl_integration.cli import build_parser, main

FAST = ["--max-steps", "2", "--batch-size", "2", "--warmup-steps", "0", "--learning-rate", "0.05"]
FAST += ["--max-length", "256", "--logging-steps", "1", "--seed", "0"]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes what it reads into its cache: a temporary one here."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))


@pytest.fixture
def pairs_csv(tmp_path) -> str:
    rows = bipo_rows(QUESTIONS[:8])
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


class Recorder:
    """Stands in for `SteerTrainer`: keeps what the command built and trains nothing."""

    runs: list[Recorder] = []

    def __init__(self, model, args, train_dataset, processing_class, peft_config):
        self.args, self.train_dataset, self.peft_config = args, train_dataset, peft_config
        self.env = dict(os.environ)
        self.accelerator = SimpleNamespace(end_training=lambda: None)
        self.hub_model_id = args.hub_model_id
        self.pushed: list[dict] = []
        Recorder.runs.append(self)

    def train(self, resume_from_checkpoint=None):
        self.resume_from_checkpoint = resume_from_checkpoint

    def save_model(self, output_dir):
        self.saved_to, self.push_while_saving = output_dir, self.args.push_to_hub

    def push_to_hub(self, **kwargs):
        self.pushed.append(kwargs)


@pytest.fixture
def recorded(monkeypatch):
    """Run ``peft-steer train`` with `Recorder` in place of the trainer; returns the run's `Recorder`."""
    monkeypatch.setattr(train_module, "SteerTrainer", Recorder)
    Recorder.runs = []

    def run(arguments: list[str]) -> Recorder:
        assert main(["train", *arguments]) == 0
        assert len(Recorder.runs) == 1
        return Recorder.runs.pop()

    return run


def _yaml(path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peft-steer train: error:"), lines
    return lines[0]


def test_every_steer_config_field_is_an_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    missing = [f.name for f in dataclasses.fields(SteerConfig) if f.init and f"--{f.name}" not in text]
    assert missing == []
    for option in ("--config", "--layers", "--positions", "--init", "--report_to", "--push_to_hub", "--hub_model_id"):
        assert option in text


def test_the_file_sets_options_by_their_names_and_the_command_line_overrides_it(
    tmp_path, model_dir, pairs_csv, recorded
):
    output = tmp_path / "run"
    config = _yaml(
        tmp_path / "run.yaml",
        f"""
model: {model_dir}
data: {pairs_csv}
layers: [1, 2]
positions: completion
output_dir: {output}
learning_rate: 5e-2          # YAML reads this as text: converted as on the command line
beta: 0.2
num_train_epochs: 2
per_device_train_batch_size: 2
gradient_accumulation_steps: 3
direction_sampling: antithetic
lr_scheduler_type: linear
max_steps: 7
precompute_ref_log_probs: false
report_to: none
seed: 3
""",
    )
    run = recorded(["--config", config, "--beta", "0.3", "--max_steps", "5"])
    args = run.args
    assert (args.beta, args.max_steps) == (0.3, 5)  # the command line wins
    assert args.learning_rate == 0.05 and isinstance(args.learning_rate, float)
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.gradient_accumulation_steps) == (2, 2, 3)
    assert (args.direction_sampling, args.lr_scheduler_type, args.seed) == ("antithetic", "linear", 3)
    assert args.precompute_ref_log_probs is False and args.report_to == []
    assert args.output_dir == str(output) and run.saved_to == str(output)
    assert run.peft_config.layers == [1, 2] and run.peft_config.positions == "completion"
    assert len(run.train_dataset) == 8


def test_the_old_flags_and_the_field_names_set_the_same_fields(tmp_path, model_dir, pairs_csv, recorded):
    base = ["--model", model_dir, "--data", pairs_csv, "--output-dir", str(tmp_path / "run"), "--use_cpu"]
    old = recorded([*base, "--layer", "1", "--epochs", "4", "--batch-size", "3", "--gradient-checkpointing", "--bf16"])
    old_args = old.args
    assert old.peft_config.layers == [1] and old_args.num_train_epochs == 4
    assert old_args.per_device_train_batch_size == 3 and old_args.activation_checkpointing is True
    assert old_args.bf16 is True
    new = recorded(
        [*base, "--layers", "1", "--num_train_epochs", "4", "--per_device_train_batch_size", "3"]
        + ["--activation_checkpointing", "--bf16", "false", "--no-precompute-ref-log-probs"]
    )
    assert new.peft_config.layers == [1] and new.args.num_train_epochs == 4
    assert new.args.per_device_train_batch_size == 3 and new.args.activation_checkpointing is True
    assert new.args.bf16 is False and new.args.precompute_ref_log_probs is False


def test_defaults_without_a_file(tmp_path, model_dir, pairs_csv, recorded):
    run = recorded(["--model", model_dir, "--data", pairs_csv, "--layer", "1", "--output-dir", str(tmp_path / "r")])
    args = run.args
    assert (args.learning_rate, args.beta, args.per_device_train_batch_size) == (5e-4, 0.1, 4)
    assert args.num_train_epochs == 3 and args.report_to == [] and args.push_to_hub is False
    assert args.save_strategy == "steps" and run.peft_config.positions == "all"


def test_the_command_line_source_replaces_the_file_one(tmp_path, model_dir, pairs_csv, recorded):
    config = _yaml(tmp_path / "run.yaml", f"model: {model_dir}\nbehavior: power-seeking\nlayer: 1\n")
    run = recorded(["--config", config, "--data", pairs_csv, "--output-dir", str(tmp_path / "run")])
    assert len(run.train_dataset) == 8  # the CSV, not the shipped power-seeking set
    run = recorded(["--config", config, "--layers", "2", "--output-dir", str(tmp_path / "run2")])
    assert run.peft_config.layers == [2]


def test_env_sets_environment_variables(tmp_path, model_dir, pairs_csv, recorded, monkeypatch):
    monkeypatch.setenv("PEFT_STEER_TEST_VARIABLE", "before")
    config = _yaml(tmp_path / "run.yaml", "env:\n  PEFT_STEER_TEST_VARIABLE: 7\n")
    arguments = ["--config", config, "--model", model_dir, "--data", pairs_csv, "--layer", "1"]
    run = recorded([*arguments, "--output-dir", str(tmp_path / "run")])
    assert run.env["PEFT_STEER_TEST_VARIABLE"] == "7"


def test_report_to_and_the_hub_options_reach_the_config(tmp_path, model_dir, pairs_csv, recorded):
    arguments = ["--model", model_dir, "--data", pairs_csv, "--layer", "1", "--output-dir", str(tmp_path / "run")]
    run = recorded([*arguments, "--report_to", "none", "--push_to_hub", "--hub_model_id", "me/steer"])
    assert run.args.report_to == [] and run.args.push_to_hub is True and run.args.hub_model_id == "me/steer"
    # The final adapter is written whole first, then pushed once.
    assert run.push_while_saving is False and len(run.pushed) == 1
    config = _yaml(tmp_path / "hub.yaml", "report_to: [none]\npush_to_hub: true\nhub_model_id: me/other\n")
    run = recorded(["--config", config, *arguments[:-1], str(tmp_path / "run2")])
    assert run.args.push_to_hub is True and run.args.hub_model_id == "me/other"


def test_a_parquet_file_and_a_folder_as_data(tmp_path, model_dir, recorded):
    table = pa.Table.from_pylist(bipo_rows(QUESTIONS[:6]))
    pq.write_table(table, tmp_path / "pairs.parquet")
    folder = tmp_path / "folder"
    folder.mkdir()
    pq.write_table(table.slice(0, 3), folder / "a.parquet")
    pq.write_table(table.slice(3), folder / "b.parquet")
    base = ["--model", model_dir, "--layer", "1"]
    run = recorded([*base, "--data", str(tmp_path / "pairs.parquet"), "--output-dir", str(tmp_path / "r1")])
    assert len(run.train_dataset) == 6
    run = recorded([*base, "--data", str(folder), "--output-dir", str(tmp_path / "r2")])
    assert len(run.train_dataset) == 6


# 0.9 kB of YAML: each list holds the one before it 9 times, 9**9 items in all
ALIAS_BOMB = (
    "learning_rate: [&a [x, x, x, x, x, x, x, x, x], "
    + ", ".join(f"&{b} [" + ", ".join([f"*{a}"] * 9) + "]" for a, b in zip("abcdefgh", "bcdefghi"))
    + "]\n"
)
BAD_FILES = {
    "unknown key": ("lerning_rate: 0.1\n", "unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
    "bad choice": ("direction_sampling: sideways\n", "direction_sampling: 'sideways' is not one of"),
    "bad number": ("learning_rate: fast\n", "learning_rate: 'fast' is not a float"),
    "bad flag value": ("no_chat_template: 3\n", "no_chat_template: expected true or false"),
    "two sources": ("behavior: power-seeking\ndata: pairs.csv\n", "behavior and data: give one of them"),
    "same option twice": ("epochs: 2\nnum_train_epochs: 3\n", "epochs and num_train_epochs set the same option"),
    "not a mapping": ("- learning_rate\n", "expected a mapping of option names to values, got a list"),
    "bad YAML": ("beta: [0.1\n", "not valid YAML"),
    "a bad number in the file is checked too": ("beta: .nan\n", "--beta nan: must be a finite number above 0"),
    # issue 24: an error quotes a bounded part of a value (the whole repr of the alias bomb ran out of memory)
    "an alias bomb": (ALIAS_BOMB, "learning_rate: [['x', 'x', 'x', 'x', 'x', 'x', ...], [['x', 'x', 'x',"),
    # issue 24: not "Stop argument for islice()" from inside the Trainer
    "a batch size past any index": (
        "per_device_train_batch_size: 1.0e+20\n",
        "--batch-size 1e+20: must be a whole number, at most 2147483647",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_a_bad_file_exits_2_with_one_line_naming_it(tmp_path, model_dir, pairs_csv, capsys, case):
    text, message = BAD_FILES[case]
    config = _yaml(tmp_path / "run.yaml", text)
    output = tmp_path / "run"
    arguments = ["--model", model_dir, "--layer", "1", "--output-dir", str(output)]
    if "data" not in text and "behavior" not in text:
        arguments += ["--data", pairs_csv]
    assert main(["train", "--config", config, *arguments]) == 2
    line = _one_error_line(capsys)
    assert message in line
    if not message.startswith("--"):  # a number's check names its option
        assert config in line
    assert not output.exists()


def test_a_missing_file_and_missing_required_options(tmp_path, model_dir, pairs_csv, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml"), "--model", model_dir, "--data", pairs_csv]) == 2
    assert f"--config {tmp_path / 'none.yaml'}: no such file" in _one_error_line(capsys)
    assert main(["train", "--data", pairs_csv, "--layer", "1"]) == 2
    assert "--model is required" in _one_error_line(capsys)
    assert main(["train", "--model", model_dir, "--layer", "1"]) == 2
    assert "--behavior or --data is required" in _one_error_line(capsys)


def test_push_to_hub_uploads_the_final_adapter_once_written(tmp_path, model_dir, pairs_csv, monkeypatch, capsys):
    uploads: list[dict] = []
    created: list[str] = []

    def create_repo(self, repo_id, **kwargs):
        created.append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        folder = kwargs["folder_path"]
        kwargs["files"] = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        uploads.append(kwargs)
        if kwargs.get("run_as_future"):
            done: Future = Future()
            done.set_result(None)
            return done
        return None

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    output = tmp_path / "run"
    arguments = ["train", "--model", model_dir, "--data", pairs_csv, "--layer", "1", "--output-dir", str(output)]
    assert main([*arguments, *FAST, "--push_to_hub", "--hub_model_id", "me/steer-test"]) == 0
    assert created == ["me/steer-test"]
    final = uploads[-1]
    assert final["repo_id"] == "me/steer-test" and final["commit_message"] == "End of training"
    assert os.path.abspath(final["folder_path"]) == str(output)
    assert "adapter_model.safetensors" in final["files"] and "adapter_config.json" in final["files"]
    assert all(upload["repo_id"] == "me/steer-test" for upload in uploads)
    assert "Pushed the adapter to https://huggingface.co/me/steer-test" in capsys.readouterr().out
    PeftModel.from_pretrained(make_model("llama"), output)  # the local adapter is whole


def test_the_yaml_example_of_the_docs_names_only_options(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # restored after the test: the example's env sets it
    text = (Path(__file__).resolve().parents[3] / "docs" / "cli.md").read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    args = build_parser().parse_args(["train", "--config", _yaml(tmp_path / "run.yaml", example)])
    args.config_file.apply(args, args.config)
    assert args.layers == [14] and args.learning_rate == 5e-4 and args.hub_model_id == "me/bipo-qwen-power-seeking"


def test_a_number_for_a_text_option_is_its_text(tmp_path, model_dir, pairs_csv, recorded, monkeypatch):
    """`output_dir: 123` names the folder 123, as `--output_dir 123` does (issue 24: it was a TypeError)."""
    monkeypatch.chdir(tmp_path)
    config = _yaml(tmp_path / "run.yaml", "output_dir: 123\n")
    run = recorded(["--config", config, "--model", model_dir, "--data", pairs_csv, "--layer", "1"])
    assert run.args.output_dir == "123"
