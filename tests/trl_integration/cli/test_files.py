"""`peft-steer info | import-official | export-gguf | import-gguf`: what they write, and one clear line with exit code
2 (nothing written, nothing overwritten) for every file they cannot use."""

import errno
import json
import sys

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import save_file

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.interop import WEIGHTS_NAME, read_adapter, read_gguf
from peft_steer.interop import adapter_files as adapter_files_module
from tests.conftest import make_model
from tests.peft_steer.interop.test_adapter_files import BAD_ADAPTERS, KEY, _edit_weights, _retype, save_adapter
from tests.peft_steer.interop.test_gguf import BAD_GGUF, write_gguf
from trl_integration.cli import main


def test_info_prints_blocks_size_and_norms(tmp_path, capsys):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1, 3]))
    peft_steer.set_vectors(model, {1: torch.full((32,), 0.5), 3: torch.zeros(32)})
    model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == [1, 3] and summary["hidden_size"] == 32 and summary["num_blocks"] == 4
    assert summary["vector_norms"] == {"1": round(0.5 * 32**0.5, 6), "3": 0.0}


def test_info_refuses_a_non_finite_vector_instead_of_printing_invalid_json(tmp_path, capsys):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1]))
    model.save_pretrained(tmp_path)
    save_file({KEY: torch.full((32,), float("nan"))}, str(tmp_path / WEIGHTS_NAME))
    assert main(["info", str(tmp_path)]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "block 1 contains NaN or inf" in out.err and out.err.count("\n") == 1


def test_info_on_a_folder_without_an_adapter(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "adapter_config.json does not exist" in capsys.readouterr().err


# ---- bad input: one line naming the file, exit code 2, nothing lost --------------------------------------------


def fails(argv: list[str], capsys, *names) -> str:
    """Run the command line, check it fails with exit code 2 and one line naming each of ``names``."""
    capsys.readouterr()  # what the test's own setup printed (progress bars)
    assert main([str(arg) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"peft-steer {argv[0]}: error: "), err
    for name in names:
        assert str(name) in err, err
    return err


@pytest.mark.parametrize("command", ["info", "export-gguf"])
@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_a_damaged_adapter_is_one_line_naming_the_file(tmp_path, capsys, case, command):
    damage, culprit, message = BAD_ADAPTERS[case]
    adapter = save_adapter(tmp_path / "adapter")
    damage(adapter)
    args = [command, adapter] + ([tmp_path / "out.gguf"] if command == "export-gguf" else [])
    fails(args, capsys, adapter / culprit, message)
    assert not (tmp_path / "out.gguf").exists()


def test_export_gguf_keeps_an_existing_file_unless_overwrite(tmp_path, capsys):
    pytest.importorskip("gguf")
    adapter = save_adapter(tmp_path / "adapter")
    (tmp_path / "power.gguf").write_text("mine")
    fails(["export-gguf", adapter, tmp_path / "power.gguf"], capsys, tmp_path / "power.gguf", "--overwrite")
    assert (tmp_path / "power.gguf").read_text() == "mine"
    weights = adapter / WEIGHTS_NAME
    fails(["export-gguf", adapter, weights, "--overwrite"], capsys, weights)
    assert read_adapter(str(adapter))[1].keys() == {1, 3}
    assert main(["export-gguf", str(adapter), str(tmp_path / "power.gguf"), "--overwrite"]) == 0
    assert sorted(read_gguf(tmp_path / "power.gguf")[0]) == [1, 3]


def test_export_gguf_refuses_nan_and_converts_bf16(tmp_path, capsys):
    pytest.importorskip("gguf")
    adapter = save_adapter(tmp_path / "adapter")
    _retype(torch.bfloat16)(adapter)
    assert main(["export-gguf", str(adapter), str(tmp_path / "bf16.gguf")]) == 0
    assert torch.equal(read_gguf(tmp_path / "bf16.gguf")[0][1], read_adapter(str(adapter))[1][1].float())
    _edit_weights(lambda tensors: tensors[KEY].__setitem__(0, float("nan")))(adapter)
    fails(["export-gguf", adapter, tmp_path / "nan.gguf"], capsys, adapter / WEIGHTS_NAME, "NaN")
    assert not (tmp_path / "nan.gguf").exists()


@pytest.mark.parametrize("case", list(BAD_GGUF))
def test_import_gguf_of_a_bad_file_is_one_line_naming_it(tmp_path, capsys, case):
    pytest.importorskip("gguf")
    make_model().save_pretrained(tmp_path / "base")
    make, message = BAD_GGUF[case]
    path = make(tmp_path / "bad.gguf")
    fails(["import-gguf", path, "--base-model", tmp_path / "base", "--out", tmp_path / "out"], capsys, path, message)
    assert not (tmp_path / "out").exists()


def test_import_gguf_of_a_truncated_file_is_one_line_naming_it(tmp_path, capsys):
    pytest.importorskip("gguf")
    make_model().save_pretrained(tmp_path / "base")
    path = write_gguf(tmp_path / "cut.gguf", [("direction.1", np.ones(32, np.float32))])
    path.write_bytes(path.read_bytes()[:-40])
    fails(["import-gguf", path, "--base-model", tmp_path / "base", "--out", tmp_path / "out"], capsys, path)
    assert not (tmp_path / "out").exists()


def test_import_official_of_a_text_file_is_one_line_naming_it(tmp_path, capsys):
    make_model().save_pretrained(tmp_path / "base")
    (tmp_path / "vector.pt").write_text("hello world\n")
    args = ["import-official", tmp_path / "vector.pt", "--layer", "1", "--base-model", tmp_path / "base"]
    fails([*args, "--out", tmp_path / "out"], capsys, tmp_path / "vector.pt", "not a PyTorch tensor file")
    assert not (tmp_path / "out").exists()


def test_import_official_with_a_negative_layer_writes_a_loadable_folder(tmp_path, capsys):
    make_model().save_pretrained(tmp_path / "base")
    torch.save(torch.ones(32), tmp_path / "vector.pt")
    args = ["import-official", tmp_path / "vector.pt", "--layer", "-1", "--base-model", tmp_path / "base"]
    assert main([str(arg) for arg in [*args, "--out", tmp_path / "last"]]) == 0
    assert "block 3 of 4" in capsys.readouterr().out
    config, vectors = read_adapter(str(tmp_path / "last"))
    assert config.layers == [3] and torch.equal(vectors[3], torch.ones(32))
    loaded = PeftModel.from_pretrained(make_model(), tmp_path / "last")
    assert torch.equal(peft_steer.get_vectors(loaded)[3], torch.ones(32))


def test_import_on_a_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    make_model().save_pretrained(tmp_path / "base")
    torch.save(torch.ones(32), tmp_path / "vector.pt")

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_files_module, "save_file", half_written)
    args = ["import-official", tmp_path / "vector.pt", "--layer", "1", "--base-model", tmp_path / "base"]
    fails([*args, "--out", tmp_path / "out"], capsys, tmp_path / "out", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "vector.pt"]


def test_export_and_import_without_gguf_installed_say_how_to_install_it(tmp_path, capsys, monkeypatch):
    model = get_peft_model(make_model(), SteeringConfig(layers=[1]))
    model.save_pretrained(tmp_path / "vec")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    assert main(["export-gguf", str(tmp_path / "vec"), str(tmp_path / "v.gguf")]) == 2
    assert 'pip install "peft-steer[gguf]"' in capsys.readouterr().err
    assert not (tmp_path / "v.gguf").exists()
