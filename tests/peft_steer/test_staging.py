"""`peft_steer.staging.written_whole`: a file or folder appears whole, or the destination stays as it was."""

from __future__ import annotations

import errno

import pytest

from peft_steer.staging import publish_new, written_whole


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(OSError, match=r"writing .*out\.txt failed, nothing was written: No space left") as raised:
        with written_whole(str(target)) as staging, open(staging, "w") as file:
            file.write("new, half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert [path.name for path in tmp_path.iterdir()] == ["out.txt"]


def test_publish_new_never_replaces_a_file(tmp_path):
    target = tmp_path / "report.json"
    with written_whole(str(target), publish=publish_new) as staging, open(staging, "w") as file:
        file.write("first")
    with pytest.raises(FileExistsError):
        with written_whole(str(target), publish=publish_new) as staging, open(staging, "w") as file:
            file.write("second")
    assert target.read_text() == "first"
    assert [path.name for path in tmp_path.iterdir()] == ["report.json"]


def test_a_folder_replaces_an_empty_one_only(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    with written_whole(str(target), folder=True) as staging:
        (tmp_path / staging / "a.txt").write_text("a")
    assert [path.name for path in target.iterdir()] == ["a.txt"]
    with pytest.raises(OSError, match="nothing was written"):
        with written_whole(str(target), folder=True) as staging:
            (tmp_path / staging / "b.txt").write_text("b")
    assert [path.name for path in target.iterdir()] == ["a.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["adapter"]
