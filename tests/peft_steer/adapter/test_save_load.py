"""save_pretrained / from_pretrained / load_adapter / AutoPeftModel / push_to_hub, and what a bad checkpoint gets."""

import json
import os
import subprocess
import sys

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.interop import read_adapter
from tests.conftest import make_model


def trained_like(arch="llama", layers=(1, 3), seed=5, **config):
    model = get_peft_model(make_model(arch), SteeringConfig(layers=list(layers), **config))
    generator = torch.Generator().manual_seed(seed)
    peft_steer.set_vectors(model, {block: 0.05 * torch.randn(32, generator=generator) for block in layers})
    return model


def test_round_trip_gives_identical_logits_and_only_safetensors(tmp_path, input_ids):
    model = trained_like(multiplier=-0.5)
    with torch.no_grad():
        expected = model(input_ids).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "base_model.steering_vectors.1",
        "base_model.steering_vectors.3",
    }
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)
    assert peft_steer.get_multiplier(loaded) == -0.5
    assert not any(p.requires_grad for p in loaded.parameters())  # inference mode by default
    trainable = PeftModel.from_pretrained(make_model(), tmp_path, is_trainable=True)
    assert [n for n, p in trainable.named_parameters() if p.requires_grad] == [
        "base_model.steering_vectors.default.1",
        "base_model.steering_vectors.default.3",
    ]


def test_read_adapter_without_a_model(tmp_path):
    model = trained_like()
    model.save_pretrained(tmp_path)
    config, vectors = read_adapter(str(tmp_path))
    assert config.layers == [1, 3] and config.hidden_size == 32 and config.num_blocks == 4
    for block, vector in peft_steer.get_vectors(model).items():
        assert torch.equal(vectors[block], vector)


def test_load_adapter_adds_a_second_named_vector(tmp_path, input_ids):
    trained_like(seed=1).save_pretrained(tmp_path / "a")
    trained_like(seed=2, layers=(2,)).save_pretrained(tmp_path / "b")
    model = PeftModel.from_pretrained(make_model(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert sorted(model.peft_config) == ["a", "b"]
    assert set(peft_steer.get_vectors(model, "b")) == {2}
    model.set_adapter("b")
    with torch.no_grad():
        only_b = model(input_ids).logits
    reference = PeftModel.from_pretrained(make_model(), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(only_b, reference(input_ids).logits)


def test_auto_peft_model_loads_base_and_adapter_from_local_folders(tmp_path, input_ids):
    base = make_model()
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(make_model(), SteeringConfig(layers=[2], init="random"))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids).logits
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, expected)


def test_model_card_states_method_base_blocks_size_and_sign(tmp_path):
    model = trained_like()
    model.peft_config["default"].base_model_name_or_path = "meta-llama/Llama-2-7b-chat-hf"
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving twice replaces the section instead of repeating it
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Steering vector (peft-steer)") == 1
    assert "BiPO" in card and "meta-llama/Llama-2-7b-chat-hf" in card
    assert "1, 3 of 4" in card and "**Hidden size:** 32" in card
    assert "positive multiplier" in card and "import peft_steer" in card
    assert "library_name: peft" in card  # PEFT's own card metadata is kept


def test_push_to_hub_uploads_the_card_with_the_weights(tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def fake_upload(self, working_dir, repo_id, files_timestamps, **kwargs):
        for name in os.listdir(working_dir):
            uploaded[name] = (os.path.join(working_dir, name), open(os.path.join(working_dir, name), "rb").read())

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi(), raising=False)
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", fake_upload)
    monkeypatch.setattr(hub.PushToHubMixin, "_get_files_timestamps", lambda self, d: {}, raising=False)
    trained_like().push_to_hub("me/llama-power-bipo")
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(uploaded)
    assert b"Sign convention" in uploaded["README.md"][1]


def test_saved_vectors_that_do_not_fit_the_model_are_refused_before_anything_changes(tmp_path):
    trained_like().save_pretrained(tmp_path)
    wide = make_model(hidden=64)
    before = {k: v.clone() for k, v in wide.state_dict().items()}
    with pytest.raises(ValueError, match="hidden size 32.*has 64"):
        PeftModel.from_pretrained(wide, tmp_path)
    shallow = make_model(layers=2)
    with pytest.raises(ValueError, match="4 decoder blocks.*has 2"):
        PeftModel.from_pretrained(shallow, tmp_path)
    for model in (wide, shallow):
        assert not any(isinstance(m, peft_steer.SteeringLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in wide.state_dict().items())


def test_checkpoint_with_a_wrong_shape_or_nan_is_refused(tmp_path):
    trained_like().save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "base_model.steering_vectors.3": torch.zeros(48)}, weights)
    with pytest.raises(ValueError, match="block 3 has shape \\(48,\\)"):
        PeftModel.from_pretrained(make_model(), tmp_path)
    save_file({**tensors, "base_model.steering_vectors.1": torch.full((32,), float("nan"))}, weights)
    with pytest.raises(ValueError, match="block 1 contains NaN"):
        PeftModel.from_pretrained(make_model(), tmp_path)
    save_file({**tensors, "base_model.steering_vectors.1": torch.full((32,), 1e300, dtype=torch.float64)}, weights)
    with pytest.raises(ValueError, match="block 1 .*float32"):
        PeftModel.from_pretrained(make_model(), tmp_path)
    save_file({"base_model.steering_vectors.1": tensors["base_model.steering_vectors.1"]}, weights)
    with pytest.raises(ValueError, match="vectors for blocks \\[1\\].*lists layers \\[1, 3\\]"):
        PeftModel.from_pretrained(make_model(), tmp_path)


@pytest.mark.parametrize("text", ["NaN", "-Infinity", "1e400", "1e300"])
def test_a_bad_multiplier_in_adapter_config_is_refused_at_load(tmp_path, text):
    """Python's json reads NaN, Infinity and 1e400 (inf); 1e300 is finite but inf in the vectors' float32."""
    trained_like().save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"multiplier": 1.0', f'"multiplier": {text}'))
    assert f'"multiplier": {text}' in path.read_text()
    with pytest.raises(ValueError, match="SteeringConfig\\(multiplier=.*\\).*finite"):
        PeftModel.from_pretrained(make_model(), tmp_path)


@pytest.mark.slow
def test_loading_without_import_peft_steer_fails_with_peft_keyerror(tmp_path):
    """PEFT has no plugin entry points: without `import peft_steer` it cannot know the type (documented)."""
    trained_like().save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "STEERING"
    script = (
        "import sys; from peft import PeftConfig\n"
        "try:\n    PeftConfig.from_pretrained(sys.argv[1])\n"
        "except KeyError as e:\n    print('KeyError', e.args[0])\n"
        "import peft_steer\n"
        "print(type(PeftConfig.from_pretrained(sys.argv[1])).__name__)\n"
        "print(peft_steer.is_missing_registration(KeyError('STEERING')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["KeyError", "STEERING", "SteeringConfig", "True"]
