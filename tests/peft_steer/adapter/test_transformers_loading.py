"""transformers' own adapter loading of steering adapters: ``AutoModelForCausalLM.from_pretrained(adapter_folder)``,
``model.load_adapter(adapter_folder)`` and ``pipeline("text-generation", model=adapter_folder)`` steer exactly as
``PeftModel.from_pretrained(base, adapter_folder)`` does, at the adapter's saved multiplier."""

import dataclasses
import json
import subprocess
import sys

import peft
import pytest
import torch
import transformers
from packaging.version import Version
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.adapter import _peft_compat
from tests.conftest import make_model

ARCHS = ["llama", "gpt2"]
PROMPT = "Would you accept more power"


def save_base_and_adapter(tmp_path, tokenizer, arch="llama", positions="all", multiplier=-1.5, seed=3):
    """A base model folder (with its tokenizer) and a steering adapter folder whose config points at it."""
    base_dir, adapter_dir = tmp_path / f"base-{arch}", tmp_path / f"adapter-{arch}-{positions}-{seed}"
    make_model(arch).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = get_peft_model(make_model(arch), SteeringConfig(layers=[1, 3], positions=positions, multiplier=multiplier))
    generator = torch.Generator().manual_seed(seed)
    peft_steer.set_vectors(model, {block: 2 * torch.randn(32, generator=generator) for block in (1, 3)})
    model.peft_config["default"].base_model_name_or_path = str(base_dir)
    model.save_pretrained(adapter_dir)
    return base_dir, adapter_dir


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def reference(base_dir, adapter_dir, input_ids):
    """(steered, unsteered) logits of PEFT's own loading path."""
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    steered = logits(peft_model, input_ids)
    with peft_model.disable_adapter():
        base = logits(peft_model, input_ids)
    assert not torch.allclose(steered, base), "the test adapter must change the logits"
    return steered, base


@pytest.mark.parametrize("arch", ARCHS)
def test_auto_model_from_pretrained_of_an_adapter_folder_is_steered(tmp_path, tokenizer, input_ids, arch):
    base_dir, adapter_dir = save_base_and_adapter(tmp_path, tokenizer, arch)
    steered, base = reference(base_dir, adapter_dir, input_ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(adapter_dir)
    assert not isinstance(model, PeftModel) and sorted(model.peft_config) == ["default"]
    torch.testing.assert_close(logits(model, input_ids), steered)
    assert not torch.allclose(logits(model, input_ids), base)
    assert not any(parameter.requires_grad for parameter in model.parameters())  # inference mode, as PEFT loads it
    model, info = transformers.AutoModelForCausalLM.from_pretrained(adapter_dir, output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(logits(model, input_ids), steered)


@pytest.mark.parametrize("arch", ARCHS)
def test_load_adapter_steers_the_base_model_and_transformers_can_switch_it_off(tmp_path, tokenizer, input_ids, arch):
    base_dir, adapter_dir = save_base_and_adapter(tmp_path, tokenizer, arch)
    steered, base = reference(base_dir, adapter_dir, input_ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    torch.testing.assert_close(logits(model, input_ids), base)
    info = model.load_adapter(str(adapter_dir), adapter_name="power")
    assert not any(dataclasses.asdict(info).values()), info  # nothing missing, unexpected or mismatched
    torch.testing.assert_close(logits(model, input_ids), steered)
    assert sorted(model.peft_config) == ["power"] and model._hf_peft_config_loaded
    if Version(peft.__version__) < Version("0.22"):
        pytest.skip(f"transformers' adapter methods other than load_adapter need peft >= 0.22, not {peft.__version__}")
    model.disable_adapters()
    torch.testing.assert_close(logits(model, input_ids), base)
    model.enable_adapters()
    torch.testing.assert_close(logits(model, input_ids), steered)


def peft_generation(base_dir, adapter_dir, tokenizer) -> str:
    """The 6 greedy tokens after PROMPT that ``PeftModel.from_pretrained`` generates, as text."""
    peft_model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    prompt = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        tokens = peft_model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    return tokenizer.decode(tokens[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_pipeline_of_an_adapter_folder_generates_with_the_steered_model(tmp_path, tokenizer, input_ids, arch):
    base_dir, adapter_dir = save_base_and_adapter(tmp_path, tokenizer, arch)
    steered, _ = reference(base_dir, adapter_dir, input_ids)
    pipe = transformers.pipeline("text-generation", model=str(adapter_dir))
    torch.testing.assert_close(logits(pipe.model, input_ids), steered)
    text = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]

    assert text == peft_generation(base_dir, adapter_dir, tokenizer)


def test_completion_steering_through_the_pipeline_finds_the_prompt_end(tmp_path, tokenizer):
    base_dir, adapter_dir = save_base_and_adapter(tmp_path, tokenizer, positions="completion")
    pipe = transformers.pipeline("text-generation", model=str(adapter_dir))
    text = pipe(PROMPT, max_new_tokens=6, do_sample=False, return_full_text=False)[0]["generated_text"]

    assert text == peft_generation(base_dir, adapter_dir, tokenizer)


def test_a_second_steering_adapter_through_load_adapter_is_refused_with_the_way_that_works(tmp_path, tokenizer):
    base_dir, first = save_base_and_adapter(tmp_path, tokenizer, seed=1)
    _, second = save_base_and_adapter(tmp_path, tokenizer, seed=2)
    model = transformers.AutoModelForCausalLM.from_pretrained(first)
    with pytest.raises(ValueError, match="already has a steering adapter.*peft_model.load_adapter"):
        model.load_adapter(str(second), adapter_name="other")
    assert sorted(model.peft_config) == ["default"]


def lora_folder(tmp_path, base_dir=None):
    lora = get_peft_model(make_model(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.peft_config["default"].base_model_name_or_path = str(base_dir)
    lora.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora"


def test_lora_adapters_still_load_through_transformers(tmp_path, input_ids):
    make_model().save_pretrained(tmp_path / "base")
    adapter_dir = lora_folder(tmp_path, tmp_path / "base")
    expected = logits(PeftModel.from_pretrained(make_model(), adapter_dir), input_ids)
    torch.testing.assert_close(
        logits(transformers.AutoModelForCausalLM.from_pretrained(adapter_dir), input_ids), expected
    )
    model = make_model()
    model.load_adapter(str(adapter_dir))
    torch.testing.assert_close(logits(model, input_ids), expected)


@pytest.mark.parametrize("steering_first", [False, True])
def test_a_lora_and_a_steering_adapter_through_transformers_match_the_peft_stack(
    tmp_path, tokenizer, input_ids, steering_first
):
    base_dir, steering_dir = save_base_and_adapter(tmp_path, tokenizer)
    lora_dir = lora_folder(tmp_path, base_dir)
    expected = logits(
        PeftModel.from_pretrained(PeftModel.from_pretrained(make_model(), lora_dir), steering_dir), input_ids
    )
    first, second = (steering_dir, lora_dir) if steering_first else (lora_dir, steering_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(first)
    model.load_adapter(str(second), adapter_name="second")
    torch.testing.assert_close(logits(model, input_ids), expected)
    assert sorted(model.peft_config) == ["default", "second"]


def test_a_bad_checkpoint_is_refused_as_peft_refuses_it(tmp_path, tokenizer):
    base_dir, adapter_dir = save_base_and_adapter(tmp_path, tokenizer)
    weights = adapter_dir / "adapter_model.safetensors"
    save_file({**load_file(weights), "base_model.steering_vectors.3": torch.zeros(48)}, weights)
    with pytest.raises(ValueError, match="block 3 has shape \\(48,\\)"):
        transformers.AutoModelForCausalLM.from_pretrained(adapter_dir)


def test_training_through_transformers_is_refused_with_the_way_that_works(tmp_path, tokenizer):
    base_dir, adapter_dir = save_base_and_adapter(tmp_path, tokenizer)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="PeftModel.from_pretrained\\(model, .*is_trainable=True"):
        model.load_adapter(str(adapter_dir), is_trainable=True)
    assert not any(isinstance(module, peft_steer.SteeringLayer) for module in model.modules())


def test_a_changed_transformers_load_adapter_is_reported(monkeypatch):
    from transformers.integrations.peft import PeftAdapterMixin

    def load_adapter(self, path, name=None):  # a future signature without the arguments peft-steer reads
        raise AssertionError("not called")

    monkeypatch.setattr(PeftAdapterMixin, "load_adapter", load_adapter)
    with pytest.raises(RuntimeError, match="transformers .*load_adapter.*peft_model_id"):
        peft_steer.register()
    monkeypatch.delattr(PeftAdapterMixin, "load_adapter")
    with pytest.raises(RuntimeError, match="load_adapter is missing"):
        peft_steer.register()


def test_registering_again_wraps_load_adapter_once():
    from transformers.integrations.peft import PeftAdapterMixin

    wrapped = PeftAdapterMixin.load_adapter
    peft_steer.register()
    assert PeftAdapterMixin.load_adapter is wrapped
    assert _peft_compat.routes_load_adapter()


@pytest.mark.slow  # a subprocess that imports transformers and PEFT
def test_without_import_peft_steer_transformers_fails_with_pefts_keyerror_and_the_folder_says_why(tmp_path, tokenizer):
    """Nothing of peft-steer runs before PEFT looks the type up: the KeyError is PEFT's (documented in adapter.md)."""
    _, adapter_dir = save_base_and_adapter(tmp_path, tokenizer)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["peft_type"] == "STEERING"
    assert "import peft_steer" in (adapter_dir / "README.md").read_text()
    script = (
        "import sys, transformers\n"
        "try:\n    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "except KeyError as e:\n    print('KeyError', e.args[0])\n"
        "import peft_steer\n"
        "print(type(transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]).peft_config['default']).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(adapter_dir)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["KeyError", "STEERING", "SteeringConfig"]
