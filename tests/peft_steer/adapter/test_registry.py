"""The STEERING type in PEFT's tables: idempotent, and a clear error if PEFT's internals move."""

import peft.mapping
import pytest
from peft import LoraConfig, PeftModel, get_peft_model

from peft_steer import SteeringConfig, SteeringModel
from peft_steer.adapter.registry import register
from tests.conftest import make_model


def test_registered_in_pefts_tables():
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["STEERING"] is SteeringConfig
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["STEERING"] is SteeringModel
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING["STEERING"] == "steering_"
    register()  # importing twice or calling again changes nothing
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["STEERING"] is SteeringModel
    push = PeftModel.push_to_hub
    register()
    assert PeftModel.push_to_hub is push, "push_to_hub must be wrapped once only"


def test_a_missing_peft_table_is_reported(monkeypatch):
    monkeypatch.delattr(peft.mapping, "PEFT_TYPE_TO_TUNER_MAPPING")
    with pytest.raises(RuntimeError, match="PEFT_TYPE_TO_TUNER_MAPPING is missing in peft"):
        register()


def test_another_package_owning_the_name_is_reported(monkeypatch):
    monkeypatch.setitem(peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING, "STEERING", LoraConfig)
    with pytest.raises(RuntimeError, match="already registered a PEFT type named 'STEERING'"):
        register()


class FakeApi:
    def create_repo(self, repo_id, **kwargs):
        return type("Repo", (), {"repo_id": repo_id})()


def test_push_to_hub_of_other_adapters_is_untouched(monkeypatch):
    import transformers.utils.hub as hub

    uploaded = {}

    def fake_upload(self, working_dir, *args, **kwargs):
        uploaded["card"] = open(f"{working_dir}/README.md").read()

    monkeypatch.setattr(hub, "hf_api", FakeApi)
    monkeypatch.setattr(hub.PushToHubMixin, "_upload_modified_files", fake_upload)
    get_peft_model(make_model(), LoraConfig(r=2, target_modules=["q_proj"])).push_to_hub("me/lora")
    assert "card" in uploaded and "peft-steer" not in uploaded["card"]
