"""Every python block of the user docs runs, in order, offline."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("page", ["adapter.md", "interop.md", "evaluation.md"])
def test_doc_snippets_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks(DOCS / page)
    assert blocks, f"docs/{page} has no python blocks"
    namespace: dict = {}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"docs/{page} block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"docs/{page} block {number} failed: {error!r}\n{block}") from error
