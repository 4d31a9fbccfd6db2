"""Every python block of the user docs runs, in order, offline."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def run_doc_blocks(page: str) -> dict:
    """Run the python blocks of ``docs/<page>`` in one namespace, in order; return the namespace."""
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), flags=re.DOTALL)
    assert blocks, f"docs/{page} has no python blocks"
    namespace: dict = {}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"docs/{page} block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"docs/{page} block {number} failed: {error!r}\n{block}") from error
    return namespace


@pytest.mark.parametrize("page", ["adapter.md", "interop.md", "evaluation.md"])
def test_doc_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_doc_blocks(page)
