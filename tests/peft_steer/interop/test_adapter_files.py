"""Adapter folders read without a model: every damaged or inconsistent folder is a clear error naming the file."""

from __future__ import annotations

import codecs
import errno
import json
import os
import struct

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.interop import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    read_adapter,
    read_adapter_for,
    write_adapter,
)
from peft_steer.interop import adapter_files as adapter_files_module
from tests.conftest import make_model


def save_adapter(folder, layers=(1, 3)):
    """A steering adapter of the 4-block, hidden-size-32 test model, saved as save_pretrained writes it."""
    model = get_peft_model(make_model(), SteeringConfig(layers=list(layers), init="random"))
    model.save_pretrained(folder)
    return folder


def _edit_config(**changes):
    def edit(folder):
        config = json.loads((folder / CONFIG_NAME).read_text())
        for key, value in changes.items():
            if value is _DROP:
                del config[key]
            else:
                config[key] = value
        (folder / CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _edit_weights(change):
    def edit(folder):
        tensors = load_file(folder / WEIGHTS_NAME)
        change(tensors)
        save_file(tensors, folder / WEIGHTS_NAME)

    return edit


def _truncate(folder):
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])


def _retype(dtype):
    return _edit_weights(lambda tensors: tensors.update({k: (10 * v).to(dtype) for k, v in tensors.items()}))


def _lying_header(folder):
    header = json.dumps({KEY: {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    (folder / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))


def _with_bom(folder):
    (folder / CONFIG_NAME).write_bytes(codecs.BOM_UTF8 + (folder / CONFIG_NAME).read_bytes())


def _rekey(key):
    return _edit_weights(lambda tensors: tensors.update({key: tensors.pop(KEY)}))


def _legacy(content):
    """The weights as PEFT's older adapter_model.bin: ``content`` saved by torch (pickled)."""

    def edit(folder):
        (folder / WEIGHTS_NAME).unlink()
        torch.save(content, folder / LEGACY_WEIGHTS_NAME)

    return edit


_DROP = object()
KEY = "base_model.steering_vectors.1"

# name: (damage done to a saved folder, the file the error must name, what the message must say)
BAD_ADAPTERS = {
    "truncated weights": (_truncate, WEIGHTS_NAME, "not a readable safetensors file"),
    "config is a JSON list": (lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), CONFIG_NAME, "JSON object"),
    "config is not JSON": (lambda f: (f / CONFIG_NAME).write_text("{oops"), CONFIG_NAME, "not valid JSON"),
    "string multiplier": (_edit_config(multiplier="2"), CONFIG_NAME, "'multiplier' is '2'"),
    "unknown peft_type": (_edit_config(peft_type="FOO"), CONFIG_NAME, "'FOO' adapter"),
    "no peft_type": (_edit_config(peft_type=_DROP), CONFIG_NAME, "no 'peft_type'"),
    "no layers": (_edit_config(layers=_DROP), CONFIG_NAME, "no 'layers'"),
    "layers that are not ints": (_edit_config(layers=["1"]), CONFIG_NAME, "'layers' is"),
    "layers unlike the weights": (_edit_config(layers=[1, 2]), WEIGHTS_NAME, "lists layers [1, 2]"),
    "int64 vector": (_retype(torch.int64), WEIGHTS_NAME, "torch.int64"),
    "wrong length": (_edit_weights(lambda t: t.update({KEY: torch.ones(7)})), WEIGHTS_NAME, "shape (7,)"),
    "2-D vector": (_edit_weights(lambda t: t.update({KEY: torch.ones(2, 32)})), WEIGHTS_NAME, "shape (2, 32)"),
    "block out of range": (
        _edit_weights(lambda t: t.update({"base_model.steering_vectors.9": torch.ones(32)})),
        WEIGHTS_NAME,
        "block 9",
    ),
    # issue 24: what eval / generate took (or failed on with a traceback), and info / export-gguf too
    "empty weights": (lambda f: (f / WEIGHTS_NAME).write_bytes(b""), WEIGHTS_NAME, "not a readable safetensors"),
    "weights with a lying header": (_lying_header, WEIGHTS_NAME, "not a readable safetensors file"),
    "no weights file": (lambda f: (f / WEIGHTS_NAME).unlink(), WEIGHTS_NAME, "does not exist"),
    "config with a BOM": (_with_bom, CONFIG_NAME, "byte order mark"),
    "100k-deep config": (lambda f: (f / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000), CONFIG_NAME, "deep"),
    "layers as text": (_edit_config(layers="2"), CONFIG_NAME, "'layers' is '2'"),
    "init_vectors of lists": (_edit_config(init_vectors={"1": [0.5] * 32}), CONFIG_NAME, "'init_vectors'"),
    "float hidden_size": (_edit_config(hidden_size=128.0), CONFIG_NAME, "'hidden_size' is 128.0"),
    "int32 vector": (_retype(torch.int32), WEIGHTS_NAME, "torch.int32"),
    "nan vector": (_edit_weights(lambda t: t[KEY].__setitem__(0, float("nan"))), WEIGHTS_NAME, "block 1 contains NaN"),
    "superscript block": (_rekey("base_model.steering_vectors.\u00b2"), WEIGHTS_NAME, "steering_vectors.\u00b2"),
    "two keys for one block": (
        _edit_weights(lambda t: t.update({"base_model.steering_vectors.01": torch.ones(32)})),
        WEIGHTS_NAME,
        "'base_model.steering_vectors.01'",
    ),
    "a vector for another block": (_rekey("base_model.steering_vectors.2"), WEIGHTS_NAME, "blocks [2, 3]"),
    "legacy .bin of another pickle": (_legacy(os.getcwd), LEGACY_WEIGHTS_NAME, "not a file of tensors"),
    "legacy .bin of a list": (_legacy([torch.ones(32)]), LEGACY_WEIGHTS_NAME, "mapping of names to tensors"),
}


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_a_damaged_adapter_folder_is_a_clear_error_naming_the_file(tmp_path, case):
    damage, culprit, message = BAD_ADAPTERS[case]
    folder = save_adapter(tmp_path / "adapter")
    damage(folder)
    with pytest.raises((ValueError, FileNotFoundError)) as raised:
        read_adapter(str(folder))
    text = str(raised.value)
    assert str(folder / culprit) in text and message in text and "\n" not in text
    assert "weights_only=False" not in text  # torch's advice for a pickle would run arbitrary code


def test_a_legacy_bin_of_tensors_is_read_as_peft_reads_it(tmp_path):
    folder = save_adapter(tmp_path / "adapter")
    tensors = load_file(folder / WEIGHTS_NAME)
    _legacy(tensors)(folder)
    config, vectors = read_adapter(folder)
    assert sorted(vectors) == [1, 3] and torch.equal(vectors[1], tensors[KEY])
    assert torch.equal(peft_steer.get_vectors(PeftModel.from_pretrained(make_model(), folder))[1], tensors[KEY])


def test_read_adapter_for_a_model_of_another_width_names_the_config(tmp_path):
    folder = save_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="adapter_config.json: .*hidden size 32; .* has 64"):
        read_adapter_for(folder, make_model(hidden=64))


def test_bf16_vectors_are_read_as_saved(tmp_path):
    folder = save_adapter(tmp_path / "adapter")
    _retype(torch.bfloat16)(folder)
    config, vectors = read_adapter(str(folder))
    assert {block: vector.dtype for block, vector in vectors.items()} == {1: torch.bfloat16, 3: torch.bfloat16}


def test_a_negative_block_is_written_as_the_block_it_names(tmp_path):
    make_model().save_pretrained(tmp_path / "base")
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    config = write_adapter(tmp_path / "last", {-1: vector}, tmp_path / "base")
    assert config.layers == [3]
    assert list(load_file(tmp_path / "last" / WEIGHTS_NAME)) == ["base_model.steering_vectors.3"]
    _, vectors = read_adapter(str(tmp_path / "last"))
    assert list(vectors) == [3] and torch.equal(vectors[3], vector)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path / "last")
    assert torch.equal(peft_steer.get_vectors(loaded)[3], vector)


def test_a_full_disk_while_writing_leaves_nothing(tmp_path, monkeypatch):
    make_model().save_pretrained(tmp_path / "base")

    def half_written(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_files_module, "save_file", half_written)
    with pytest.raises(OSError) as raised:
        write_adapter(tmp_path / "out", {1: torch.ones(32)}, tmp_path / "base")
    assert raised.value.errno == errno.ENOSPC
    assert str(tmp_path / "out") in str(raised.value) and "No space left" in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_an_output_that_is_a_file_is_refused(tmp_path):
    make_model().save_pretrained(tmp_path / "base")
    (tmp_path / "out").write_text("mine")
    with pytest.raises(FileExistsError, match="out is a file"):
        write_adapter(tmp_path / "out", {1: torch.ones(32)}, tmp_path / "base")
    assert (tmp_path / "out").read_text() == "mine"


def test_every_file_of_a_saved_adapter_gets_the_usual_permissions(tmp_path):
    """safetensors creates its files 0600; the project's folders get one mode for all files (issue 24)."""
    import os
    import stat

    from peft import get_peft_model

    from peft_steer import SteeringConfig
    from peft_steer.interop import write_adapter

    get_peft_model(make_model(), SteeringConfig(layers=[1])).save_pretrained(tmp_path / "saved")
    write_adapter(tmp_path / "written", {1: torch.ones(32)}, make_model())
    for folder in ("saved", "written"):
        modes = {
            name: stat.S_IMODE(os.stat(tmp_path / folder / name).st_mode) for name in os.listdir(tmp_path / folder)
        }
        assert len(set(modes.values())) == 1, modes
