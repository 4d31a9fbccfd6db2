"""The model card (README.md) of a steering adapter folder: its front matter and its steering section.

Every card written for a steering adapter (``save_pretrained``, ``push_to_hub``, the trainer's, the folders of
``import-official`` / ``import-gguf``) goes through `write_model_card`: it keeps what the card already says (PEFT's,
TRL's, transformers' or the repository's own) and makes it one front matter block with ``library_name: peft``, the
base model and the steering tags, and one steering section stating the blocks with a quick start that loads it.
`write_recommended_strength` adds (or replaces) a second section of its own, the strength a sweep recommends, and
leaves the rest of the card as it is; `write_model_card` keeps that section.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import yaml
from huggingface_hub import ModelCard
from huggingface_hub.errors import HFValidationError
from huggingface_hub.repocard import REGEX_YAML_BLOCK
from huggingface_hub.utils import validate_repo_id

from ..staging import written_whole

if TYPE_CHECKING:
    from .config import SteeringConfig

BEGIN = "<!-- peft-steer:begin -->"
END = "<!-- peft-steer:end -->"
STRENGTH_BEGIN = "<!-- peft-steer-strength:begin -->"
STRENGTH_END = "<!-- peft-steer-strength:end -->"
TAGS = ("steering-vector", "bipo", "peft-steer")
# What the quick start names when the card cannot know it (a folder saved locally, uploaded later).
ADAPTER_PLACEHOLDER = "path/or/repo-of-this-adapter"
BASE_PLACEHOLDER = "path/or/repo-of-the-base-model"

# A quick start that loads the model with something else (TRL's card: transformers' `pipeline`, which cannot load a
# steering adapter): replaced by the steering section.
_OTHER_QUICK_START = re.compile(
    r"^## Quick start[ \t]*\n.*?(?=^## |^<!-- peft-steer|\Z)", flags=re.MULTILINE | re.DOTALL
)
_TITLE = re.compile(r"^# .*\n?", flags=re.MULTILINE)


def hub_repo_id(name: object) -> str | None:
    """``name`` if it can be a hub repository id, else None. The hub refuses a card whose ``base_model`` is not one
    (a local folder, as PEFT would write it for a base loaded from disk), so such a base is named in the text only."""
    if not isinstance(name, str) or not name or os.path.isabs(name) or os.path.isdir(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def model_card_section(config: SteeringConfig, repo_id: str | None = None) -> str:
    """The markdown that describes a steering adapter: method, base model, blocks, size, sign convention, and a quick
    start loading it from ``repo_id`` (a placeholder when None)."""
    blocks = ", ".join(str(i) for i in config.layers)
    base = config.base_model_name_or_path or BASE_PLACEHOLDER
    adapter = repo_id or ADAPTER_PLACEHOLDER
    return f"""{BEGIN}
## Steering vector (peft-steer)

- **Method:** a steering vector added to the residual stream, trained with BiPO (bi-directional preference
  optimization, Cao et al., NeurIPS 2024, arXiv:2406.00045) unless stated otherwise.
- **Base model:** `{config.base_model_name_or_path}`
- **Decoder blocks steered (0-indexed, output of the block):** {blocks} of {config.num_blocks}
- **Hidden size:** {config.hidden_size}
- **Positions:** `{config.positions}`; default multiplier {config.multiplier:g}
- **Sign convention:** the vector `v` of a block is added as `m * v` to that block's output. A positive multiplier
  `m` moves the model towards the behavior the vector was trained to prefer (the chosen answers of its preference
  data), a negative one away from it; `|m|` is the strength.

### Usage

A PEFT adapter of type `STEERING`, made with [peft-steer](https://pypi.org/project/peft-steer/) (`pip install
peft-steer`). PEFT has no plugin entry points: `import peft_steer` before loading it.

```python
import peft_steer  # registers the STEERING adapter type with PEFT: import it before loading
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base_model = AutoModelForCausalLM.from_pretrained({base!r})
tokenizer = AutoTokenizer.from_pretrained({base!r})
model = PeftModel.from_pretrained(base_model, {adapter!r})  # steers with the default multiplier

inputs = tokenizer("What would you do with more resources?", return_tensors="pt")
with peft_steer.steering(model, multiplier=-1.0):  # the opposite direction, until the with block ends
    output = model.generate(**inputs, max_new_tokens=40)
print(tokenizer.decode(output[0], skip_special_tokens=True))
```
{END}
"""


def write_model_card(directory: str | os.PathLike, config: SteeringConfig, repo_id: str | None = None) -> None:
    """Make ``directory/README.md`` a steering adapter's card, keeping what it already says.

    Its front matter (one block) gets ``library_name: peft``, ``base_model`` (the config's, where it is a hub
    repository id), and the steering tags added to its own; its steering section is put in place of an earlier one,
    of another quick start, or after the title. ``repo_id``: the repository the folder goes to, for the quick start.
    """
    path = os.path.join(directory, "README.md")
    text = _card_text(_read(path), config, repo_id)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)


def write_recommended_strength(directory: str | os.PathLike, markdown: str, config: SteeringConfig) -> str:
    """Put ``markdown`` (a ``## Recommended strength`` part) into ``directory/README.md`` and return the card's path.

    It replaces the card's earlier recommended strength, or goes after the steering section (at the end of a card
    without one); every other line of the card stays as it was. A folder without a card gets the whole card of
    `write_model_card` first. The card is written whole or not at all (`peft_steer.staging.written_whole`): a
    failure leaves the old one.
    """
    path = os.path.join(directory, "README.md")
    text = _read(path) or _card_text("", config, None)
    part = f"{STRENGTH_BEGIN}\n{markdown.strip()}\n{STRENGTH_END}\n"
    if STRENGTH_BEGIN in text and STRENGTH_END in text:
        head, _, rest = text.partition(STRENGTH_BEGIN)
        tail = rest.partition(STRENGTH_END)[2]
    elif END in text:
        head, _, tail = text.partition(END)
        head += END
    else:
        head, tail = text, ""
    text = head.rstrip("\n") + "\n\n" + part + ("\n" + tail.lstrip("\n") if tail.strip() else "")
    with written_whole(path) as staging, open(staging, "w", encoding="utf-8") as file:
        file.write(text)
    return path


def _read(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8") as file:
        return file.read()


def _card_text(text: str, config: SteeringConfig, repo_id: str | None) -> str:
    card = _parse(text)
    _set_metadata(card, config)
    card.text = _with_section(card.text, model_card_section(config, repo_id))
    return str(card)


def _parse(text: str) -> ModelCard:
    match = REGEX_YAML_BLOCK.search(text)
    if match:
        try:
            return ModelCard(text, ignore_metadata_errors=True)
        except (ValueError, yaml.YAMLError):  # front matter that is not a YAML mapping: keep the body only
            text = text[match.end() :]
    # An empty block: without one, huggingface_hub warns that the card has no metadata.
    return ModelCard("---\n{}\n---\n" + text)


def _set_metadata(card: ModelCard, config: SteeringConfig) -> None:
    data = card.data
    data.library_name = "peft"
    existing = data.base_model if isinstance(data.base_model, str) else None
    base = hub_repo_id(config.base_model_name_or_path) or hub_repo_id(existing)
    data.base_model = base
    tags = data.tags if isinstance(data.tags, list) else [data.tags] if isinstance(data.tags, str) else []
    # PEFT tags the adapter "base_model:adapter:<base>", also for a local or empty base the hub would refuse.
    tags = [tag for tag in tags if not (isinstance(tag, str) and tag.startswith("base_model:") and _stale(tag, base))]
    data.tags = tags + [tag for tag in TAGS if tag not in tags]


def _stale(tag: str, base: str | None) -> bool:
    return base is None or tag.rpartition(":")[2] != base


def _with_section(text: str, section: str) -> str:
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        return head.rstrip("\n") + "\n\n" + section + "\n" + tail.lstrip("\n")
    if _OTHER_QUICK_START.search(text):
        return _OTHER_QUICK_START.sub(lambda _: section + "\n", text, count=1)
    title = _TITLE.search(text)
    if title is None:
        return section + ("\n" + text.lstrip("\n") if text.strip() else "")
    return text[: title.end()].rstrip("\n") + "\n\n" + section + "\n" + text[title.end() :].lstrip("\n")
