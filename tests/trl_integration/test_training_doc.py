"""Every python block of docs/training.md runs, in order, offline, and the trained vector steers as the page says."""

from __future__ import annotations

from tests.test_docs import run_doc_blocks


def test_training_doc_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = run_doc_blocks("training.md")
    # The page's claims hold for its own run: an adapter folder, and a vector that moves the margin both ways.
    assert (tmp_path / "power-bipo" / "adapter_model.safetensors").is_file()
    assert sorted(path.name for path in (tmp_path / "power-bipo" / "vectors").iterdir()) == ["epoch-1", "epoch-2"]
    margins = {m: preference.margin for m, preference in namespace["scores"].items()}
    assert margins[-1.0] < margins[0.0] < margins[1.0], margins
