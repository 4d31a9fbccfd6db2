"""``peft_steer.interop.cvec``: the buffer it builds is llama.cpp's loader's, it refuses what that loader refuses (and
what it ignores without a word), and in llama-cpp-python a vector exported with ``export_gguf`` steers
SmolLM2-135M-Instruct in llama.cpp as the ``PeftModel`` steers it in transformers.

Both engines run the same Q4_1 GGUF (transformers dequantizes it to float32; llama.cpp keeps Q4_1 weights and
quantizes activations to Q8), so their log-probs are close, not equal. What is compared is the shift that steering
causes (steered minus unsteered next-token log-probs) over the tokens that matter, on chat prompts. The same vector
exported at the neighbouring block must agree clearly worse: that pins the block index of the export. That the helper
builds the buffer llama.cpp's own loader builds is checked against llama-server in ``test_llama_tools.py``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from peft_steer.interop.cvec import control_vector, control_vector_data, set_control_vector
from tests.peft_steer.interop.conftest import BLOCK, MULTIPLIER, cpp_log_probs, kl, new_llama
from tests.peft_steer.interop.test_gguf import write_gguf

pytest.importorskip("gguf", reason='needs gguf: pip install "peft-steer[gguf]"')

TOP_K = 20
# Measured (examples/llama_cpp_agreement.py, 8 prompts): correlation of the shifts 0.998 at the right block (each
# prompt 0.997-0.999), largest difference of a shift 0.44 nats; the same vector at block 13 or 15: 0.67 and 4.9-6.4.
MIN_CORRELATION = 0.98
MAX_SHIFT_DIFFERENCE = 1.0
MIN_MARGIN = 0.15


def test_the_buffer_holds_each_direction_times_its_scale_at_its_block_and_zeros_elsewhere(tmp_path):
    a = write_gguf(
        tmp_path / "a.gguf", [("direction.1", np.full(4, 1.0, np.float32)), ("direction.3", np.ones(4, np.float32))]
    )
    b = write_gguf(tmp_path / "b.gguf", [("direction.3", np.arange(4, dtype=np.float32))])
    data = control_vector_data([(a, 2.0), (b, -0.5)], n_layer=6, n_embd=4)
    # blocks 1 .. 5 (n_layer - 1), 4 values each; block 0 has no slot
    expected = np.zeros((5, 4), np.float32)
    expected[0] = 2.0
    expected[2] = 2.0 - 0.5 * np.arange(4)
    np.testing.assert_array_equal(data.reshape(5, 4), expected)
    np.testing.assert_array_equal(control_vector_data(a, n_layer=6, n_embd=4)[:4], np.ones(4))  # a path: scale 1


@pytest.mark.parametrize(
    "tensors, files, message",
    [
        (
            [("direction.3", np.ones(576, np.float16))],
            None,
            "tensor 'direction.3' is F16; a control vector direction is",
        ),
        ([("direction.30", np.ones(576, np.float32))], None, "direction.30 is past the model's last block (29)"),
        ([("direction.3", np.ones(64, np.float32))], None, "direction.3 has 64 values; the model's hidden size is 576"),
        ([("direction.3", np.full(576, 3e38, np.float32))], 2, "direction.3 times scale 1.0, added to the files"),
    ],
    ids=["f16", "past the last block", "hidden size", "overflowing sum"],
)
def test_what_llama_cpp_refuses_or_ignores_is_refused_naming_the_file(tmp_path, tensors, files, message):
    path = write_gguf(tmp_path / "bad.gguf", tensors)
    with pytest.raises(ValueError, match=f"^{path}: {re.escape(message)}"):
        control_vector_data(path if files is None else [(path, 1.0)] * files, n_layer=30, n_embd=576)


def test_a_list_of_paths_is_refused_with_the_form_to_use(tmp_path):
    path = write_gguf(tmp_path / "a.gguf", [("direction.3", np.ones(576, np.float32))])
    with pytest.raises(ValueError, match="give one path, or \\(path, scale\\) pairs"):
        control_vector_data([path, path], n_layer=30, n_embd=576)


@pytest.fixture(scope="module")
def llm(gguf_model):
    llm = new_llama(gguf_model)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def cpp_base(llm, power) -> list[np.ndarray]:
    return [cpp_log_probs(llm, ids) for ids in power["ids"]]


def cpp_shifts(llm, power, cpp_base, file) -> list[tuple[np.ndarray, np.ndarray]]:
    """llama.cpp's (unsteered, steered) log-probs of each prompt, steered by ``file``."""
    with control_vector(llm, file):
        return [(base, cpp_log_probs(llm, ids)) for base, ids in zip(cpp_base, power["ids"])]


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


@pytest.mark.slow
def test_llama_cpp_tokenizes_the_chat_prompts_as_transformers(llm, power):
    for prompt, ids in zip(power["prompts"], power["ids"]):
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids


@pytest.mark.slow
def test_llama_cpp_shifts_the_next_token_distribution_as_the_peft_model(llm, power, cpp_base):
    hf, cpp = power["hf"], cpp_shifts(llm, power, cpp_base, power["files"][BLOCK])
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


@pytest.mark.slow
def test_the_same_vector_at_a_neighbouring_block_agrees_clearly_worse(llm, power, cpp_base):
    right = shift_correlation(power["hf"], cpp_shifts(llm, power, cpp_base, power["files"][BLOCK]))
    for block in (BLOCK - 1, BLOCK + 1):
        cpp = cpp_shifts(llm, power, cpp_base, power["files"][block])
        wrong = shift_correlation(power["hf"], cpp)
        assert wrong < right - MIN_MARGIN, (block, wrong, right)
        shift_hf, shift_cpp = shifts(power["hf"], cpp)
        assert np.abs(shift_hf - shift_cpp).max() > MAX_SHIFT_DIFFERENCE


@pytest.mark.slow
def test_scales_add_up_and_the_layer_range_limits_the_vector(llm, power, cpp_base):
    ids, steered = power["ids"][0], cpp_shifts(llm, power, cpp_base, power["files"][BLOCK])[0][1]
    with control_vector(llm, [(power["files"]["unit"], MULTIPLIER / 2), (power["files"]["unit"], MULTIPLIER / 2)]):
        assert np.abs(cpp_log_probs(llm, ids) - steered).max() < 1e-4
    with control_vector(llm, power["files"][BLOCK], layers=(BLOCK + 1, 29)):  # block 14 left out: no steering
        assert np.abs(cpp_log_probs(llm, ids) - cpp_base[0]).max() < 1e-4


@pytest.mark.slow
def test_the_context_manager_drops_the_cached_prompt_and_restores_the_unsteered_model(llm, power, cpp_base):
    """``Llama.create_completion`` reuses the keys and values of a prompt it has seen: set without ``reset``, a vector
    would not reach the cached prompt."""
    prompt = power["prompts"][0]

    def top_log_probs():
        reply = llm.create_completion(prompt, max_tokens=1, logprobs=5, temperature=0)
        return reply["choices"][0]["logprobs"]["top_logprobs"][0]

    before = top_log_probs()
    with control_vector(llm, power["files"][BLOCK]):
        during = top_log_probs()
    after = top_log_probs()
    assert max(abs(during.get(t, -100.0) - p) for t, p in before.items()) > 0.1
    assert after.keys() == before.keys()
    assert max(abs(after[t] - p) for t, p in before.items()) < 1e-4


@pytest.mark.slow
def test_switching_to_a_vector_of_lower_blocks_leaves_no_higher_block_steering(llm, power, gguf_model):
    """``llama_adapter_cvec::apply`` keeps the blocks a buffer does not cover: the zeros up to the last block clear
    block 15 when a vector of block 13 follows one of block 15 (without them, block 15 would go on steering)."""
    ids = power["ids"][0]
    with control_vector(llm, power["files"][BLOCK + 1]):
        higher = cpp_log_probs(llm, ids)
    with control_vector(llm, power["files"][BLOCK - 1]):
        after_higher = cpp_log_probs(llm, ids)
    fresh = new_llama(gguf_model)  # block 15 never set
    try:
        with control_vector(fresh, power["files"][BLOCK - 1]):
            alone = cpp_log_probs(fresh, ids)
    finally:
        fresh.close()
    assert np.abs(after_higher - higher).max() > 0.5
    assert np.abs(after_higher - alone).max() < 1e-4


@pytest.mark.slow
def test_a_layer_range_is_checked_before_anything_is_set(llm, power):
    with pytest.raises(ValueError, match="give \\(start, end\\) with 1 <= start <= end"):
        set_control_vector(llm, power["files"][BLOCK], layers=(0, 20))
    with pytest.raises(ValueError, match="without files"):
        set_control_vector(llm, None, layers=(1, 20))
