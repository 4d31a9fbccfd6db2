"""The LM head runs on the completion positions only, in training and in the reference pass, and gives the same
log-probs as on every position: on all eight architectures (Gemma2: soft-capped logits, tied embeddings), with the
prefix cache on and off."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

import peft_steer
import trl_integration.trainer
from peft_steer import SteeringConfig
from tests.conftest import ARCHITECTURES
from tests.trl_integration.conftest import QUESTIONS, bipo_rows, collated, fast_args, no_dropout
from trl_integration import SteerTrainer
from trl_integration._trl_compat import completion_token_logps

BLOCK = 1


def trainer_for(tmp_path, tokenizer, arch, cache):
    trainer = SteerTrainer(
        model=no_dropout(arch),
        args=fast_args(tmp_path / cache, prefix_cache=cache),
        train_dataset=Dataset.from_list(bipo_rows(QUESTIONS[:4])),
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[BLOCK]),
    )
    generator = torch.Generator().manual_seed(1)
    peft_steer.set_vectors(trainer.model, {BLOCK: 0.5 * torch.randn(32, generator=generator)})
    return trainer


def all_positions(model, peft_model, batch):
    """Summed completion log-probs from TRL's fused head on every position (the way before the completion-only
    head): labels of -100 outside the completion, scored by position."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=labels,
        use_cache=False,
        fused_lm_head=True,
    )
    return outputs.log_probs.sum(dim=1)


def head_rows(monkeypatch):
    """The number of positions each call of TRL's fused LM head projects."""
    import trl.trainer.utils as trl_utils

    rows, apply = [], trl_utils._ChunkedLogProbFunction.apply

    def counted(hidden, *args):
        rows.append(len(hidden))
        return apply(hidden, *args)

    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", counted)
    return rows


def log_probs_loss_and_gradient(trainer, batch):
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    policy = trainer._completion_logps(trainer.model, batch, torch.tensor([1.0] * 4 + [-1.0] * 4))
    loss, _ = trainer.bipo_loss(trainer.model, batch, (1.0, -1.0))
    vector = trainer.steering_model.vectors_of(trainer.adapter_name)[str(BLOCK)]
    vector.grad = None
    loss.backward()
    return torch.cat([chosen, rejected]), policy.detach(), loss.detach(), vector.grad.clone()


@pytest.mark.parametrize("cache", ["off", "cpu"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_training_log_probs_equal_the_all_position_head(tmp_path, tokenizer, monkeypatch, arch, cache):
    trainer = trainer_for(tmp_path, tokenizer, arch, cache)
    assert (trainer._prefix_cache is None) == (cache == "off")
    batch = collated(trainer, range(4))
    rows = head_rows(monkeypatch)
    completion_only = log_probs_loss_and_gradient(trainer, batch)
    # the reference pass, the policy at one multiplier per row, and the BiPO loss (its reference log-probs were
    # precomputed, its two directions run as one forward over the batch twice): the head projects the completions only
    assert "ref_chosen_logps" in batch
    completion_tokens = int(batch["completion_mask"][:, 1:].sum())
    assert rows == [completion_tokens, completion_tokens, 2 * completion_tokens]
    monkeypatch.setattr(trl_integration.trainer, "completion_logps", all_positions)
    every_position = log_probs_loss_and_gradient(trainer, batch)
    positions = batch["input_ids"].shape[0] * (batch["input_ids"].shape[1] - 1)
    assert rows[3:] == [positions, positions, 2 * positions]
    for got, expected in zip(completion_only, every_position):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert completion_only[3].abs().max() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_completion_token_log_probs_equal_the_models_own_logits(tmp_path, tokenizer, arch):
    """Token by token against the model's own forward (its LM head, soft-capping and all, on every position)."""
    trainer = trainer_for(tmp_path, tokenizer, arch, "off")
    batch = collated(trainer, range(4))
    model = trainer.model
    with torch.no_grad(), peft_steer.steering(model, multiplier=-1.0):
        got = completion_token_logps(model, model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    expected = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    expected = expected * batch["completion_mask"][:, 1:]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
