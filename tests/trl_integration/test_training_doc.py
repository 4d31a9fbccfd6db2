"""Every python block of docs/training.md runs, in order, offline, and the trained vector steers as the page says."""

from __future__ import annotations

import re
from pathlib import Path

PAGE = Path(__file__).resolve().parents[2] / "docs" / "training.md"


def test_training_doc_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) >= 3
    namespace: dict = {}
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"docs/training.md block {number}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"docs/training.md block {number} failed: {error!r}\n{block}") from error
    # The page's claims hold for its own run: an adapter folder, and a vector that moves the margin both ways.
    assert (tmp_path / "power-bipo" / "adapter_model.safetensors").is_file()
    assert sorted(path.name for path in (tmp_path / "power-bipo" / "vectors").iterdir()) == ["epoch-1", "epoch-2"]
    margins = {m: preference.margin for m, preference in namespace["scores"].items()}
    assert margins[-1.0] < margins[0.0] < margins[1.0], margins
