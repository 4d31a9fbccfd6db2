"""The model card (README.md) of a steering adapter, wherever its folder comes from (save_pretrained, push_to_hub,
import-official / import-gguf): one front matter block that says ``library_name: peft``, the base model and the
steering tags, the steered blocks, and a quick start that runs as written.

Nothing reaches a hub: repositories are read from a local cache in offline mode, and uploads are captured.
"""

from __future__ import annotations

import builtins
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl, constants
from huggingface_hub.utils import filter_repo_objects, validate_repo_id
from peft import get_peft_model
from transformers import AutoModelForCausalLM

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.adapter.card import (
    ADAPTER_PLACEHOLDER,
    BEGIN,
    END,
    STRENGTH_BEGIN,
    write_model_card,
    write_recommended_strength,
)
from peft_steer.interop import export_gguf, import_gguf, import_official
from tests.conftest import make_model, make_tokenizer

BASE = "tiny-org/tiny-llama"
STEERING_TAGS = {"steering-vector", "bipo", "peft-steer"}
COMMIT = "0" * 40
WEIGHTS = "adapter_model.safetensors"


class FakeHub:
    """Hub repositories served from a local cache (offline), and every upload captured as {repo: {path: bytes}}."""

    def __init__(self, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.cache = cache
        self.uploads: dict[str, dict[str, bytes]] = {}
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        # Bound methods of this object: HfApi().create_repo(...) calls them without the HfApi instance.
        monkeypatch.setattr(HfApi, "create_repo", self.create_repo)
        monkeypatch.setattr(HfApi, "create_commit", self.create_commit)
        monkeypatch.setattr(HfApi, "upload_folder", self.upload_folder)

    def create_repo(self, repo_id: str, **kwargs) -> RepoUrl:
        return RepoUrl(f"{constants.ENDPOINT}/{repo_id}")

    def create_commit(self, repo_id: str, operations, **kwargs) -> None:
        files = self.uploads.setdefault(repo_id, {})
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()

    def upload_folder(
        self, *, repo_id: str, folder_path, path_in_repo=None, allow_patterns=None, ignore_patterns=None, **kwargs
    ) -> None:
        folder = Path(folder_path)
        names = [p.relative_to(folder).as_posix() for p in sorted(folder.glob("**/*")) if p.is_file()]
        prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
        files = self.uploads.setdefault(repo_id, {})
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            files[prefix + name] = (folder / name).read_bytes()

    def publish(self, repo_id: str, files: dict[str, bytes]) -> None:
        """Put ``files`` in the cache as repository ``repo_id``: ``from_pretrained(repo_id)`` then loads them."""
        root = self.cache / ("models--" + repo_id.replace("/", "--"))
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(COMMIT)
        for name, content in files.items():
            path = root / "snapshots" / COMMIT / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)

    def base(self, tmp_path: Path) -> torch.nn.Module:
        """A tiny Llama and its tokenizer published as BASE; returns the model loaded by that id."""
        folder = tmp_path / "base-files"
        make_model().save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        self.publish(BASE, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()})
        shutil.rmtree(folder)
        return AutoModelForCausalLM.from_pretrained(BASE).eval()


@pytest.fixture
def hub(tmp_path, monkeypatch) -> FakeHub:
    return FakeHub(tmp_path / "hub-cache", monkeypatch)


def check_card(text: str, base: str | None = BASE) -> ModelCard:
    """``text`` has one front matter block, saying peft, ``base`` and the steering tags, and one steering section."""
    assert text.startswith("---\n")
    card = ModelCard(text)  # raises on front matter that is not a YAML mapping
    assert not card.text.lstrip().startswith("---"), "a second front matter block"
    assert not re.search(r"^library_name:", card.text, flags=re.MULTILINE)
    assert card.data.library_name == "peft"
    assert card.data.base_model == base
    if base is not None:
        validate_repo_id(base)  # the hub refuses a base_model that is not a repository id
    assert STEERING_TAGS <= set(card.data.tags)
    assert card.text.count(BEGIN) == 1 and card.text.count("## Steering vector (peft-steer)") == 1
    assert "pipeline(" not in card.text
    return card


def quick_start(card_text: str) -> str:
    """The python block of the card's steering section."""
    section = card_text[card_text.index(BEGIN) : card_text.index(END)]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert "import peft_steer" in code and "PeftModel.from_pretrained(" in code and "peft_steer.steering(" in code
    return code


def run_quick_start(card_text: str, adapter: str) -> dict:
    """Run the card's quick start as written; only a placeholder for the adapter (where the card could not know the
    repository) is replaced by ``adapter``. Returns its names."""
    code = quick_start(card_text).replace(repr(ADAPTER_PLACEHOLDER), repr(adapter))
    namespace: dict = {}
    exec(compile(code, "quick start", "exec"), namespace)
    assert isinstance(namespace["output"], torch.Tensor)
    return namespace


def assert_same_vectors(loaded: torch.nn.Module, expected: dict[int, torch.Tensor]) -> None:
    vectors = peft_steer.get_vectors(loaded)
    assert sorted(vectors) == sorted(expected)
    for block, vector in expected.items():
        assert torch.equal(vectors[block], vector.detach().float())


def steered(base: torch.nn.Module, layers=(1, 3)) -> torch.nn.Module:
    model = get_peft_model(base, SteeringConfig(layers=list(layers)))
    generator = torch.Generator().manual_seed(3)
    peft_steer.set_vectors(model, {block: 0.05 * torch.randn(32, generator=generator) for block in layers})
    return model


def test_push_to_hub_sends_a_peft_card_whose_quick_start_loads_the_pushed_files(hub, tmp_path):
    model = steered(hub.base(tmp_path))
    model.push_to_hub("me/llama-power-bipo")
    files = hub.uploads["me/llama-power-bipo"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(files)
    card = check_card(files["README.md"].decode("utf-8"))
    assert "1, 3 of 4" in card.text and "Sign convention" in card.text
    hub.publish("me/llama-power-bipo", files)
    namespace = run_quick_start(card.text, "me/llama-power-bipo")
    assert_same_vectors(namespace["model"], peft_steer.get_vectors(model))


def test_pushed_quick_start_names_the_repository(hub, tmp_path):
    steered(hub.base(tmp_path)).push_to_hub("me/llama-power-bipo")
    card = ModelCard(hub.uploads["me/llama-power-bipo"]["README.md"].decode("utf-8"))
    assert repr("me/llama-power-bipo") in quick_start(card.text)


def test_save_pretrained_merges_pefts_front_matter_into_one_block(hub, tmp_path):
    model = steered(hub.base(tmp_path), layers=(2,))
    model.save_pretrained(tmp_path / "adapter")
    model.save_pretrained(tmp_path / "adapter")  # saving again keeps one block and one section
    text = (tmp_path / "adapter" / "README.md").read_text(encoding="utf-8")
    card = check_card(text)
    assert {"transformers", f"base_model:adapter:{BASE}"} <= set(card.data.tags)  # PEFT's tags are kept
    assert card.data.pipeline_tag == "text-generation"
    assert "2 of 4" in card.text
    namespace = run_quick_start(card.text, str(tmp_path / "adapter"))
    assert_same_vectors(namespace["model"], peft_steer.get_vectors(model))


def test_a_base_from_a_local_folder_is_in_the_text_not_in_base_model(tmp_path):
    # The hub refuses a card whose base_model is not a repository id: a local base is named in the text only.
    folder = tmp_path / "my base"
    make_model().save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    model = steered(AutoModelForCausalLM.from_pretrained(folder), layers=(1,))
    model.save_pretrained(tmp_path / "adapter")
    card = check_card((tmp_path / "adapter" / "README.md").read_text(encoding="utf-8"), base=None)
    assert not any(tag.startswith("base_model:") for tag in card.data.tags)
    assert str(folder) in card.text
    namespace = run_quick_start(card.text, str(tmp_path / "adapter"))
    assert_same_vectors(namespace["model"], peft_steer.get_vectors(model))


def test_an_existing_card_keeps_its_metadata_and_loses_a_pipeline_quick_start(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlibrary_name: transformers\nlicense: mit\nbase_model: /data/llama\ntags:\n- trl\n"
        "- generated_from_trainer\n---\n\n# Model Card for power\n\n## Quick start\n\n```python\n"
        'from transformers import pipeline\ngenerator = pipeline("text-generation", model="me/power")\n```\n\n'
        "## Training procedure\n\nTrained with BiPO.\n",
        encoding="utf-8",
    )
    config = SteeringConfig(layers=[1, 2], hidden_size=32, num_blocks=4, base_model_name_or_path=BASE)
    write_model_card(str(tmp_path), config, repo_id="me/power")
    write_model_card(str(tmp_path), config, repo_id="me/power")
    card = check_card((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert card.data.license == "mit"
    assert {"trl", "generated_from_trainer"} <= set(card.data.tags)
    assert "# Model Card for power" in card.text and "## Training procedure\n\nTrained with BiPO." in card.text
    assert card.text.count("## Quick start") == 0
    assert repr("me/power") in quick_start(card.text) and repr(BASE) in quick_start(card.text)


def test_imported_folders_get_the_same_card(hub, tmp_path):
    hub.base(tmp_path)
    official = tmp_path / "vec_ep20_layer2.pt"
    torch.save(torch.randn(32, generator=torch.Generator().manual_seed(0)), official)
    import_official(official, BASE, tmp_path / "official")
    export_gguf(str(tmp_path / "official"), str(tmp_path / "power.gguf"))
    import_gguf(tmp_path / "power.gguf", BASE, tmp_path / "from-gguf")
    for folder in ("official", "from-gguf"):
        assert sorted(os.listdir(tmp_path / folder)) == ["README.md", "adapter_config.json", WEIGHTS]
        card = check_card((tmp_path / folder / "README.md").read_text(encoding="utf-8"))
        assert "2 of 4" in card.text
        namespace = run_quick_start(card.text, str(tmp_path / folder))
        assert_same_vectors(namespace["model"], {2: torch.load(official, weights_only=True)})


def test_the_recommended_strength_part_keeps_the_users_card(tmp_path, monkeypatch):
    """Put after the steering section, replaced (never repeated) by a second sweep, kept by a later save; the user's
    own text stays; a failed write leaves the card as it was."""
    config = SteeringConfig(layers=[1], hidden_size=32, num_blocks=4, base_model_name_or_path=BASE)
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# My vector\n\nMy own notes.\n", encoding="utf-8")
    write_model_card(str(tmp_path), config)
    write_recommended_strength(str(tmp_path), "## Recommended strength\n\n+2 / -3\n", config)
    write_recommended_strength(str(tmp_path), "## Recommended strength\n\n+1 / -1\n", config)
    text = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert text.count(STRENGTH_BEGIN) == 1 and "+1 / -1" in text and "+2 / -3" not in text
    assert text.index(END) < text.index(STRENGTH_BEGIN) and "My own notes." in text and "license: mit" in text
    write_model_card(str(tmp_path), config)  # save_pretrained rewrites its own section only
    again = (tmp_path / "README.md").read_text(encoding="utf-8")
    assert again.count("## Recommended strength") == 1 and "+1 / -1" in again and "My own notes." in again

    def full_disk(path, mode="r", **kwargs):
        if "w" not in mode:
            return builtins.open(path, mode, **kwargs)
        with builtins.open(path, mode, **kwargs) as file:
            file.write("half a ca")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("peft_steer.adapter.card.open", full_disk, raising=False)
    with pytest.raises(OSError, match="nothing was written"):
        write_recommended_strength(str(tmp_path), "## Recommended strength\n\n+4\n", config)
    monkeypatch.undo()
    assert (tmp_path / "README.md").read_text(encoding="utf-8") == again
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no staging file left


def test_a_folder_without_a_card_gets_the_whole_card_with_the_strength(tmp_path):
    config = SteeringConfig(layers=[1], hidden_size=32, num_blocks=4, base_model_name_or_path=BASE)
    write_recommended_strength(str(tmp_path), "## Recommended strength\n\n+2\n", config)
    card = check_card((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert card.text.index(END) < card.text.index("## Recommended strength")
