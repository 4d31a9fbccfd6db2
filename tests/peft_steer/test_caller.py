"""`warn_at_caller`: a warning points at the user's line, however deep in the libraries the check runs."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest


@pytest.fixture
def fakelib(tmp_path, monkeypatch):
    """A package whose check runs two calls deep, and warns through `warn_at_caller`."""
    package = tmp_path / "fakelib"
    package.mkdir()
    (package / "__init__.py").write_text(
        "from peft_steer.caller import warn_at_caller\n\n"
        "def entry():\n    return _inner()\n\n"
        "def _inner():\n    warn_at_caller('checked', libraries=('peft_steer', 'fakelib'))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("fakelib")
    sys.modules.pop("fakelib", None)


def test_the_warning_names_the_line_that_called_the_library(fakelib):
    with pytest.warns(UserWarning, match="checked") as caught:
        line = inspect.currentframe().f_lineno + 1
        fakelib.entry()
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
