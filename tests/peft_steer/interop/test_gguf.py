"""llama.cpp control vectors: export never loses a file and checks what it writes; import refuses what llama.cpp would
not read, naming the file and the tensor."""

from __future__ import annotations

import errno
import importlib.util

import numpy as np
import pytest
import torch

from peft_steer.interop import WEIGHTS_NAME, export_gguf, read_adapter, read_gguf
from tests.peft_steer.interop.test_adapter_files import KEY, _edit_weights, _retype, save_adapter

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="needs peft-steer[gguf]")


def write_gguf(path, tensors, arch="controlvector"):
    """A GGUF file holding ``tensors`` ([(name, numpy array)]), as llama.cpp's tools write one."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=arch)
    for name, array in tensors:
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def vector(n=32):
    return np.linspace(-1, 1, n, dtype=np.float32)


# ---- export ------------------------------------------------------------------------------------------------------


def test_export_refuses_an_existing_file_unless_overwrite(tmp_path):
    adapter = save_adapter(tmp_path / "adapter")
    out = tmp_path / "power.gguf"
    out.write_text("mine")
    with pytest.raises(FileExistsError, match=r"power\.gguf exists.*overwrite"):
        export_gguf(adapter, out)
    assert out.read_text() == "mine"
    export_gguf(adapter, out, overwrite=True)
    assert sorted(read_gguf(out)[0]) == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "power.gguf"]


def test_export_keeps_a_file_that_appears_after_the_check(tmp_path, monkeypatch):
    """The existence check and the write are apart in time: a file made in between is not replaced (issue 24)."""
    from peft_steer.interop import gguf

    adapter = save_adapter(tmp_path / "adapter")
    out = tmp_path / "power.gguf"
    read = gguf.read_adapter

    def read_then_another_writer(folder):  # runs after the check, before the write
        out.write_text("theirs")
        return read(folder)

    monkeypatch.setattr(gguf, "read_adapter", read_then_another_writer)
    with pytest.raises(FileExistsError):
        export_gguf(adapter, out)
    assert out.read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "power.gguf"]  # no staging file left


def test_export_never_writes_over_the_adapter_itself(tmp_path):
    adapter = save_adapter(tmp_path / "adapter")
    weights = (adapter / WEIGHTS_NAME).read_bytes()
    with pytest.raises(ValueError, match="is a file of the adapter"):
        export_gguf(adapter, adapter / WEIGHTS_NAME, overwrite=True)
    assert (adapter / WEIGHTS_NAME).read_bytes() == weights


def test_a_failed_export_keeps_the_old_file_and_leaves_no_partial_one(tmp_path, monkeypatch):
    adapter = save_adapter(tmp_path / "adapter")
    out = tmp_path / "power.gguf"
    out.write_text("mine")

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    import gguf

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError, match=r"power\.gguf.*No space left"):
        export_gguf(adapter, out, overwrite=True)
    assert out.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "power.gguf"]


def test_export_refuses_nan_vectors(tmp_path):
    adapter = save_adapter(tmp_path / "adapter")
    _edit_weights(lambda tensors: tensors[KEY].__setitem__(0, float("nan")))(adapter)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}: the vector for block 1 contains NaN"):
        export_gguf(adapter, tmp_path / "nan.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_bf16_vectors_are_exported_as_float32(tmp_path):
    adapter = save_adapter(tmp_path / "adapter")
    _retype(torch.bfloat16)(adapter)
    config, saved = read_adapter(str(adapter))
    export_gguf(adapter, tmp_path / "bf16.gguf")
    vectors, _ = read_gguf(tmp_path / "bf16.gguf")
    for block in (1, 3):
        assert vectors[block].dtype == torch.float32
        assert torch.equal(vectors[block], config.multiplier * saved[block].float())


# ---- import ------------------------------------------------------------------------------------------------------


def _holding(path, content: bytes):
    path.write_bytes(content)
    return path


def _duplicate(path):
    write_gguf(path, [("direction.1", vector()), ("direction.2", vector())])
    path.write_bytes(path.read_bytes().replace(b"direction.2", b"direction.1"))
    return path


# name: (file maker, what the message must say besides the file)
BAD_GGUF = {
    "empty": (lambda p: _holding(p, b""), "is empty"),
    "bad magic": (lambda p: _holding(p, b"NOPE" + bytes(100)), "not a GGUF file"),
    "duplicate tensor": (_duplicate, "direction.1"),
    "integer tensor": (lambda p: write_gguf(p, [("direction.1", np.ones(32, np.int32))]), "'direction.1' is I32"),
    "2-D tensor": (lambda p: write_gguf(p, [("direction.2", np.ones((2, 16), np.float32))]), "'direction.2' has"),
    "NaN": (lambda p: write_gguf(p, [("direction.1", np.full(32, np.nan, np.float32))]), "'direction.1' contains"),
    "differing lengths": (
        lambda p: write_gguf(p, [("direction.1", vector()), ("direction.2", vector(16))]),
        "'direction.2' has 16 values",
    ),
}


@pytest.mark.parametrize("case", list(BAD_GGUF))
def test_a_bad_gguf_file_is_a_clear_error_naming_it(tmp_path, case):
    make, message = BAD_GGUF[case]
    path = make(tmp_path / "bad.gguf")
    with pytest.raises(ValueError) as raised:
        read_gguf(path)
    text = str(raised.value)
    assert str(path) in text and message in text and "\n" not in text


def test_every_truncation_of_a_gguf_file_is_a_clear_error(tmp_path):
    data = write_gguf(tmp_path / "good.gguf", [("direction.1", vector()), ("direction.2", vector())]).read_bytes()
    cut = tmp_path / "cut.gguf"
    for size in range(1, len(data)):
        cut.write_bytes(data[:size])
        with pytest.raises(ValueError, match=r"cut\.gguf is not a (valid )?GGUF file"):
            read_gguf(cut)


def test_float16_directions_are_read_as_float32(tmp_path):
    path = write_gguf(tmp_path / "half.gguf", [("direction.1", vector().astype(np.float16))])
    vectors, _ = read_gguf(path)
    assert vectors[1].dtype == torch.float32 and torch.equal(vectors[1], torch.from_numpy(vector()).half().float())
