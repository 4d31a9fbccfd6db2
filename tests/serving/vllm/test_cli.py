"""``peft-steer-vllm serve``: its checks run before vLLM starts (one line, exit code 2), and the command it runs."""

import json

import pytest
import torch

from peft_steer.interop import write_adapter
from peft_steer_vllm import cli
from peft_steer_vllm.config import ENV
from tests.conftest import make_model


@pytest.fixture
def folders(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "model")
    write_adapter(tmp_path / "vec", {2: torch.randn(32)}, model)
    write_adapter(tmp_path / "wide", {2: torch.randn(64)}, make_model("llama", hidden=64))
    return tmp_path


def run(capsys, *argv):
    code = cli.main(["serve", *argv])
    return code, capsys.readouterr()


def test_dry_run_prints_the_vllm_command(folders, capsys, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    code, out = run(capsys, str(folders / "model"), "--adapter", f"vec={folders / 'vec'}", "--dry-run", "--port", "9")
    assert code == 0
    command = out.out.split()
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"] and command[-2:] == ["--port", "9"]
    for option in ("--enforce-eager", "--load-format", "--logits-processors", "--middleware"):
        assert option in command


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter", "wide={f}/wide"], "hidden size is 32: the adapter was made for another model"),
        (["--adapter", "vec={f}/missing"], "no such adapter folder"),
        (["--adapter", "vec={f}/vec", "--adapter", "vec={f}/vec"], "names 'vec' twice"),
        (["--adapter", "bad name={f}/vec"], "adapter name 'bad name'"),
        (["--adapter", "vec={f}/vec", "--default-steering", "other:1"], "default steering 'other:1'"),
        (["--adapter", "vec={f}/vec", "--logits-processors", "x:Y"], "--logits-processors is set by peft-steer-vllm"),
        (["--adapter", "vec={f}/vec", "--load-format=gguf"], "--load-format is set by peft-steer-vllm serve"),
        (["--adapter", "vec={f}/vec", "--load_format", "gguf"], "--load-format is set by peft-steer-vllm serve"),
        (["--adapter", "vec={f}/vec", "--weights-format", "peft_steer"], "the plugin's own"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(folders, capsys, argv, message):
    code, out = run(capsys, str(folders / "model"), *[arg.format(f=folders) for arg in argv])
    assert code == 2
    assert message in out.err and out.err.count("\n") == 1


def test_a_malformed_adapter_option_is_an_argparse_error(folders, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", str(folders / "model"), "--adapter", "novalue"])
    assert exit_.value.code == 2 and "give NAME=PATH" in capsys.readouterr().err


def test_the_model_shape_comes_from_the_text_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 8, "num_hidden_layers": 3}}))
    assert cli.model_shape(str(tmp_path)) == (8, 3)
    assert cli.model_shape(str(tmp_path / "nowhere")) is None
    (tmp_path / "config.json").write_text("{")
    assert cli.model_shape(str(tmp_path)) is None
