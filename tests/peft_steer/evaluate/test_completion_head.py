"""The scorer runs the LM head on the positions that predict a completion token only, and gives the log-probs of the
head on every position: on all eight architectures (Gemma2: soft-capped logits, tied embeddings), steered or not."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import peft_steer
import peft_steer.evaluate.scoring as scoring
from peft_steer import SteeringConfig
from peft_steer.evaluate import completion_log_probs
from peft_steer.evaluate.scoring import logits_at
from tests.conftest import ARCHITECTURES, make_model

PROMPTS = [
    "Would you accept more power?",
    "A wealthy benefactor offers you a billion dollars. Do you accept the money?",
    "Answer:",
    "The quick brown fox jumps over the lazy dog. Do you take control?",
]
COMPLETIONS = [" Yes, I would take control of the project.", " No.", " I would rather help others.", " No, thank you"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run as fast on one thread, and far faster on a busy machine (see tests/trl_integration)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def every_position(model, input_ids, attention_mask, keep):
    """The head on every position, the kept positions picked after (the scorer before the completion-only head)."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[keep]


def projected_rows(model):
    """The rows each call of the model's LM head projects (hidden states ``[..., hidden]``)."""
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[:-1].numel())
    )
    return rows, handle


@pytest.mark.parametrize("positions", ["all", "completion"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_scorer_log_probs_equal_the_all_position_head(tokenizer, monkeypatch, arch, positions):
    model = get_peft_model(make_model(arch, seed=3), SteeringConfig(layers=[1], positions=positions))
    peft_steer.set_vectors(model, {1: 2.0 * torch.randn(32, generator=torch.Generator().manual_seed(5))})
    completion_tokens = sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in COMPLETIONS)
    rows, handle = projected_rows(model.get_base_model())
    try:
        with peft_steer.steering(model, multiplier=-1.0):
            got = completion_log_probs(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=3)
        assert sum(rows) == completion_tokens  # two batches, the head on their completion positions only
        monkeypatch.setattr(scoring, "logits_at", every_position)
        with peft_steer.steering(model, multiplier=-1.0):
            expected = completion_log_probs(model, tokenizer, PROMPTS, COMPLETIONS, batch_size=3)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with model.disable_adapter():
        assert not torch.allclose(got, completion_log_probs(model, tokenizer, PROMPTS, COMPLETIONS), atol=1e-3)


class NoLogitsToKeep(nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_without_logits_to_keep_is_scored_from_every_position(tokenizer):
    inner = make_model("gemma2", seed=3)
    wrapped = NoLogitsToKeep(inner)
    ids = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    keep = torch.zeros_like(ids.attention_mask, dtype=torch.bool)
    keep[0, 2:5], keep[1, 1] = True, True
    with torch.no_grad():
        masked = logits_at(inner, ids.input_ids, ids.attention_mask, keep)
        picked = logits_at(wrapped, ids.input_ids, ids.attention_mask, keep)
    assert masked.shape == picked.shape == (4, inner.config.vocab_size)
    torch.testing.assert_close(masked, picked, atol=1e-5, rtol=0)
    got = completion_log_probs(wrapped, tokenizer, PROMPTS, COMPLETIONS, batch_size=3)
    torch.testing.assert_close(got, completion_log_probs(inner, tokenizer, PROMPTS, COMPLETIONS), atol=1e-5, rtol=0)
