"""The python blocks of the user docs run, in order, offline: what this checks is that each block runs without an
error (its own ``assert`` lines included), with the names, signatures and files the docs show. It does not compare
what a block prints or returns with the text around it: those figures are checked by the tests that the docs name."""

import re
from importlib.util import find_spec
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def run_doc_blocks(page: str) -> dict:
    """Run the python blocks of ``docs/<page>`` in one namespace, in order; return the namespace.

    A block whose first line is ``# needs modules: a, b (how to install them)`` is left out when one of those modules
    is not installed; the others run, and the test is then reported skipped, naming the block."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.DOTALL)
    assert blocks, f"docs/{page} has no python blocks"
    namespace: dict = {}
    left_out = []
    for number, block in enumerate(blocks, start=1):
        needs = re.match(r"# needs modules: ([\w, ]+)", block)
        missing = [name for name in re.split(r"[, ]+", needs[1].strip()) if not find_spec(name)] if needs else []
        if missing:
            left_out.append(f"block {number} needs {', '.join(missing)}")
            continue
        try:
            exec(compile(block, f"docs/{page} block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"docs/{page} block {number} failed: {error!r}\n{block}") from error
    if left_out:
        pytest.skip(f"docs/{page}: the other blocks ran; {'; '.join(left_out)}")
    return namespace


@pytest.mark.parametrize("page", ["adapter.md", "interop.md", "evaluation.md"])
def test_doc_snippets_run(page, tmp_path, monkeypatch):
    """Each block of ``docs/<page>`` runs without raising; outputs are not compared."""
    monkeypatch.chdir(tmp_path)
    run_doc_blocks(page)
