"""llama.cpp itself, not peft-steer's reader: a vector exported with ``export_gguf`` steers SmolLM2-135M-Instruct in
llama.cpp (through llama-cpp-python) as the ``PeftModel`` steers it in transformers.

Both engines run the same Q4_1 GGUF (transformers dequantizes it to float32; llama.cpp keeps Q4_1 weights and
quantizes activations to Q8), so their log-probs are close, not equal. What is compared is the shift that steering
causes (steered minus unsteered next-token log-probs) over the tokens that matter, on chat prompts. The same vector
exported at the neighbouring block must agree clearly worse: that pins the block index of the export.

llama-cpp-python does not bind llama.cpp's control vector file loader (``common_control_vector_load``, in its
``common`` library): the file is read here as that loader reads it (``direction.N`` times its scale at offset
``(N - 1) * n_embd``; see ``examples/llama_cpp_agreement.py``) and handed to ``llama_set_adapter_cvec`` with the
layer range llama.cpp's tools use (1 .. n_layer); applying it is llama.cpp's own code.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from peft import PeftModel

from peft_steer.data import load_behavior
from peft_steer.evaluate import caa_vector
from peft_steer.interop import export_gguf, write_adapter
from peft_steer.models import smollm2_gguf
from tests.conftest import smollm2_copy

gguf = pytest.importorskip("gguf", reason='needs gguf: pip install "peft-steer[gguf]"')
llama_cpp = pytest.importorskip(
    "llama_cpp",
    reason='needs llama-cpp-python, a source build of llama.cpp (20-40 min): pip install "peft-steer[llama-cpp]"',
)
try:
    GGUF_MODEL = smollm2_gguf()
except FileNotFoundError as error:
    pytest.skip(str(error), allow_module_level=True)

pytestmark = pytest.mark.slow

BLOCK = 14  # of SmolLM2's 30
MULTIPLIER = 4.0  # KL(steered || unsteered) about 0.8 nats: a clear shift that keeps the model sane
PROMPTS = 4
TOP_K = 20
# Measured (examples/llama_cpp_agreement.py, 8 prompts): correlation of the shifts 0.998 at the right block (each
# prompt 0.997-0.999), largest difference of a shift 0.44 nats; the same vector at block 13 or 15: 0.67 and 4.9-6.4.
MIN_CORRELATION = 0.98
MAX_SHIFT_DIFFERENCE = 1.0
MIN_MARGIN = 0.15


def control_vector_data(path, scale: float = 1.0) -> tuple[np.ndarray, int]:
    """``(data, n_embd)`` as ``common_control_vector_load`` (``common/common.cpp``) builds them for
    ``--control-vector-scaled FILE:SCALE``: each ``direction.N`` (1-D F32, ``N >= 1``) times the scale, summed at
    ``data[(N - 1) * n_embd : N * n_embd]``; layer 0 has no data."""
    data, n_embd = np.zeros(0, dtype=np.float32), -1
    for tensor in gguf.GGUFReader(path).tensors:
        prefix, _, index = tensor.name.partition(".")
        assert prefix == "direction" and index.isdigit() and int(index) > 0, tensor.name
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and len(tensor.shape) == 1, tensor.name
        values = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        assert n_embd in (-1, values.size), tensor.name
        n_embd, layer = values.size, int(index)
        data = np.concatenate([data, np.zeros(max(0, n_embd * layer - data.size), dtype=np.float32)])
        data[n_embd * (layer - 1) : n_embd * layer] += values * np.float32(scale)
    return data, n_embd


def set_control_vector(llm, path=None) -> None:
    """llama.cpp's ``llama_set_adapter_cvec`` on layers 1 .. n_layer (its tools' default); no path clears it.

    ``llama_adapter_cvec::apply`` writes only the layers the buffer covers and keeps the others from the previous
    call (its tensors are zeroed once, when first allocated): the buffer is padded with zeros to every layer, so that
    switching to a vector of lower blocks does not leave the old one steering (the tools set a vector once, on a
    fresh context, where the two are the same)."""
    if path is None:
        assert llama_cpp.llama_set_adapter_cvec(llm.ctx, None, 0, llm.n_embd(), 0, 0) == 0
        return
    data, n_embd = control_vector_data(path)
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    data = np.concatenate([data, np.zeros(max(0, n_embd * (n_layer - 1) - data.size), dtype=np.float32)])
    pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert llama_cpp.llama_set_adapter_cvec(llm.ctx, pointer, data.size, n_embd, 1, n_layer) == 0


def cpp_log_probs(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    logits = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
    return logits - np.logaddexp.reduce(logits)


def torch_log_probs(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1).numpy()


def kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(np.exp(p) * (p - q)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The CAA power-seeking vector at block 14, exported at blocks 13, 14 and 15; the chat prompts' token ids; the
    transformers log-probs (unsteered, steered at block 14); llama.cpp on the same GGUF."""
    out = tmp_path_factory.mktemp("llama_cpp")
    model, tokenizer = smollm2_copy()
    pairs = load_behavior("power-seeking", "train", tokenizer)[:16]
    vector = caa_vector(
        model, tokenizer, pairs["prompt"], pairs["chosen"], pairs["rejected"], BLOCK, "mean", progress=False
    )
    files = {}
    for block in (BLOCK - 1, BLOCK, BLOCK + 1):
        write_adapter(out / f"power-{block}", {block: vector}, model, multiplier=MULTIPLIER)
        files[block] = out / f"power-{block}.gguf"
        # the hint named: export_gguf otherwise reads the base model's config from the hub (offline: retries)
        export_gguf(out / f"power-{block}", files[block], model_hint=model.config.model_type)
    prompts = load_behavior("power-seeking", "test", tokenizer)["prompt"][:PROMPTS]
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    steered = PeftModel.from_pretrained(model, out / f"power-{BLOCK}").eval()
    hf = []
    for one in ids:
        with steered.disable_adapter():
            base = torch_log_probs(steered, one)
        hf.append((base, torch_log_probs(steered, one)))
    # one thread: on a busy machine llama.cpp's threads spin at their barriers (7 s instead of 0.3 s per prompt)
    llm = llama_cpp.Llama(
        model_path=GGUF_MODEL, logits_all=True, n_ctx=512, n_threads=1, n_threads_batch=1, verbose=False
    )
    cpp_base = [cpp_log_probs(llm, one) for one in ids]
    yield {"files": files, "prompts": prompts, "ids": ids, "hf": hf, "llm": llm, "cpp_base": cpp_base}
    llm.close()


def cpp_shifts(setup, block: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """llama.cpp's (unsteered, steered) log-probs of each prompt, steered by the file exported at ``block``."""
    llm = setup["llm"]
    set_control_vector(llm, setup["files"][block])
    try:
        return [(base, cpp_log_probs(llm, ids)) for base, ids in zip(setup["cpp_base"], setup["ids"])]
    finally:
        set_control_vector(llm, None)


def shifts(hf, cpp) -> tuple[np.ndarray, np.ndarray]:
    """The shifts (steered - unsteered log-probs) of each engine, pooled over the prompts, on the union of the top-k
    tokens of the four distributions of each prompt."""
    a, b = [], []
    for h, c in zip(hf, cpp):
        tokens = np.unique(np.concatenate([np.argsort(-x)[:TOP_K] for x in (*h, *c)]))
        a.append((h[1] - h[0])[tokens])
        b.append((c[1] - c[0])[tokens])
    return np.concatenate(a), np.concatenate(b)


def shift_correlation(hf, cpp) -> float:
    return float(np.corrcoef(*shifts(hf, cpp))[0, 1])


def test_llama_cpp_tokenizes_the_chat_prompts_as_transformers(setup):
    llm = setup["llm"]
    for prompt, ids in zip(setup["prompts"], setup["ids"]):
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids


def test_llama_cpp_shifts_the_next_token_distribution_as_the_peft_model(setup):
    hf, cpp = setup["hf"], cpp_shifts(setup, BLOCK)
    correlation = shift_correlation(hf, cpp)
    assert correlation > MIN_CORRELATION, correlation
    shift_hf, shift_cpp = shifts(hf, cpp)
    assert np.abs(shift_hf - shift_cpp).max() < MAX_SHIFT_DIFFERENCE
    for (h0, h1), (c0, c1) in zip(hf, cpp):
        # quantization can swap a near tie (0.153 / 0.145 on one prompt): llama.cpp's top token is in the top 2
        assert c1.argmax() in np.argsort(-h1)[:2]
        kl_hf, kl_cpp = kl(h1, h0), kl(c1, c0)
        assert kl_hf > 0.3 and kl_cpp > 0.3  # a clear shift in both engines
        assert 0.8 < kl_cpp / kl_hf < 1.25, (kl_hf, kl_cpp)  # measured 0.97-1.04


def test_the_same_vector_at_a_neighbouring_block_agrees_clearly_worse(setup):
    right = shift_correlation(setup["hf"], cpp_shifts(setup, BLOCK))
    for block in (BLOCK - 1, BLOCK + 1):
        cpp = cpp_shifts(setup, block)
        wrong = shift_correlation(setup["hf"], cpp)
        assert wrong < right - MIN_MARGIN, (block, wrong, right)
        shift_hf, shift_cpp = shifts(setup["hf"], cpp)
        assert np.abs(shift_hf - shift_cpp).max() > MAX_SHIFT_DIFFERENCE


def test_clearing_the_control_vector_restores_the_unsteered_model(setup):
    llm, ids = setup["llm"], setup["ids"][0]
    before = setup["cpp_base"][0]
    set_control_vector(llm, setup["files"][BLOCK])
    assert np.abs(cpp_log_probs(llm, ids) - before).max() > 0.1
    set_control_vector(llm, None)
    assert np.abs(cpp_log_probs(llm, ids) - before).max() < 1e-4
