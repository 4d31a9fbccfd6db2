"""`peft-steer demo --organism` end to end on the committed organism: BiPO moves held-out behavior with strength."""

import json

import pytest
from peft import PeftModel

from peft_steer.organism import load_organism
from trl_integration.cli import main


@pytest.mark.slow
def test_demo_trains_compares_and_writes_its_outputs(tmp_path, capsys):
    assert main(["demo", "--organism", "--out", str(tmp_path), "--epochs", "1"]) == 0
    folder = tmp_path / "peft-steer-demo-power-seeking"
    scores = json.loads((folder / "scores.json").read_text())
    bipo = {float(m): s for m, s in scores["curves"]["BiPO"].items()}
    ordered = [bipo[m] for m in sorted(bipo)]
    assert ordered == sorted(ordered) and ordered[-1] - ordered[0] > 0.05, f"BiPO does not steer: {bipo}"
    assert (folder / "steering-curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Held-out answer preference" in capsys.readouterr().out
    model, _ = load_organism()
    loaded = PeftModel.from_pretrained(model, folder / "adapters")  # the BiPO adapter loads back
    assert loaded.peft_config["default"].layers == [2]
    assert main(["demo", "--organism", "--out", str(tmp_path), "--epochs", "1"]) == 2  # nothing is overwritten


@pytest.mark.parametrize("epochs", ["0", "-1", "nan"])
def test_demo_refuses_epochs_train_refuses_before_any_work(tmp_path, capsys, epochs):
    """An untrained vector is no result: the organism demo applies `peft-steer train`'s rule (issue 24)."""
    assert main(["demo", "--organism", "--out", str(tmp_path), "--epochs", epochs]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
