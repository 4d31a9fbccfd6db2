"""Steered generation: KV cache or not, left or right padding, the same tokens as one unpadded prompt at a time."""

import pytest
import torch
from peft import get_peft_model

import peft_steer
import peft_steer.adapter.layer as layer_module
from peft_steer import SteeringConfig
from peft_steer.adapter._peft_compat import first_column
from tests.conftest import make_model

PROMPTS = ["Would you accept more power", "Yes"]
NEW_TOKENS = 8


def generate(model, encoded, **kwargs):
    out = model.generate(
        **encoded,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
        **kwargs,
    )
    return out.sequences[:, -NEW_TOKENS:], torch.stack(out.logits, dim=1)


@pytest.fixture(params=["all", "completion"])
def model(request):
    model = get_peft_model(make_model("llama"), SteeringConfig(layers=[1], positions=request.param))
    torch.manual_seed(3)
    peft_steer.set_vectors(model, {1: 0.05 * torch.randn(32) / 32**0.5})
    return model


def test_kv_cache_equals_no_cache(model, tokenizer):
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    cached, cached_logits = generate(model, encoded, use_cache=True)
    uncached, uncached_logits = generate(model, encoded, use_cache=False)
    with model.disable_adapter():
        base, _ = generate(model, encoded)
    assert not torch.equal(cached, base), "the vector should change what is generated"
    assert torch.equal(cached, uncached)
    assert torch.allclose(cached_logits, uncached_logits, atol=1e-5)


def test_left_padding_does_not_change_steered_generation(model, tokenizer):
    singles = [generate(model, tokenizer([prompt], return_tensors="pt")) for prompt in PROMPTS]
    tokenizer.padding_side = "left"
    batch, batch_logits = generate(model, tokenizer(PROMPTS, return_tensors="pt", padding=True))
    for row, (tokens, logits) in enumerate(singles):
        assert torch.equal(batch[row], tokens[0])
        assert torch.allclose(batch_logits[row], logits[0], atol=1e-5)


def test_right_padding_steers_each_row_from_its_own_prompt_end(tokenizer, monkeypatch):
    """transformers predicts the first new token of a right-padded row from its last (pad) column, steered or not,
    so only the steering rule can be compared: each row is steered from its own last prompt token, as unpadded."""
    model = get_peft_model(make_model("llama"), SteeringConfig(layers=[1], positions="completion"))
    masks = []
    original = layer_module.completion_mask
    monkeypatch.setattr(
        layer_module, "completion_mask", lambda tuner, hidden: masks.append(original(tuner, hidden)) or masks[-1]
    )
    tokenizer.padding_side = "right"
    encoded = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    generate(model, encoded)
    lengths = encoded.attention_mask.sum(dim=1)
    prefill = masks[0]
    assert prefill.shape == encoded.input_ids.shape
    for row, length in enumerate(lengths.tolist()):
        assert prefill[row, : length - 1].sum() == 0 and prefill[row, length - 1 :].all()
    assert all(mask.shape[1] == 1 and mask.all() for mask in masks[1:])  # every generated token is steered
    # the longest row has no padding: its tokens match its unpadded generation
    longest = int(lengths.argmax())
    alone, _ = generate(model, tokenizer([PROMPTS[longest]], return_tensors="pt"))
    batch, _ = generate(model, encoded)
    assert torch.equal(batch[longest], alone[0])


def test_completion_positions_leave_the_prompt_unsteered(tokenizer):
    """With positions='completion' the prompt before its last token is not steered: the first generated token's
    logits equal those of 'all' steering applied to the last prompt token alone."""
    encoded = tokenizer([PROMPTS[0]], return_tensors="pt")
    vector = 0.05 * torch.randn(32, generator=torch.Generator().manual_seed(3)) / 32**0.5
    first_logits = {}
    for positions in ("all", "completion"):
        model = get_peft_model(make_model("llama"), SteeringConfig(layers=[1], positions=positions))
        peft_steer.set_vectors(model, {1: vector})
        first_logits[positions] = generate(model, encoded)[1][0, 0]
    assert not torch.allclose(first_logits["all"], first_logits["completion"])
    # the same steering by hand: forward with prompt_lengths = the prompt's length
    model = get_peft_model(make_model("llama"), SteeringConfig(layers=[1], positions="completion"))
    peft_steer.set_vectors(model, {1: vector})
    with torch.no_grad(), peft_steer.prompt_lengths(model, torch.tensor([encoded.input_ids.shape[1]])):
        by_hand = model(**encoded).logits[0, -1]
    assert torch.allclose(first_logits["completion"], by_hand, atol=1e-5)


def test_per_row_multipliers_in_generate(tokenizer):
    model = get_peft_model(make_model("llama"), SteeringConfig(layers=[1]))
    peft_steer.set_vectors(model, {1: 0.05 * torch.randn(32, generator=torch.Generator().manual_seed(3)) / 32**0.5})
    tokenizer.padding_side = "left"
    encoded = tokenizer([PROMPTS[0], PROMPTS[0]], return_tensors="pt", padding=True)
    with peft_steer.steering(model, multiplier=torch.tensor([1.0, -1.0])):
        batch, _ = generate(model, encoded)
    for row, m in enumerate([1.0, -1.0]):
        with peft_steer.steering(model, multiplier=m):
            alone, _ = generate(model, tokenizer([PROMPTS[0]], return_tensors="pt"))
        assert torch.equal(batch[row], alone[0])
    assert not torch.equal(batch[0], batch[1])


# ---- the steering rule against what transformers' generate actually feeds the model ------------------------------


def record_forward_calls(model) -> list[tuple[int, int]]:
    """(token width, first_column) of every call that generate makes to the model, read when the call is made: the
    KV cache passed to it fills up afterwards."""
    calls = []

    def record(module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        calls.append((tokens.shape[1], first_column(args, kwargs)))

    model.register_forward_pre_hook(record, with_kwargs=True)
    return calls


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("inputs", ["single", "left-padded", "no-mask"])
def test_first_column_of_every_call_generate_makes(arch, tokenizer, use_cache, inputs):
    """The column rule reads generate's calls right in every case: prefill at 0, each cached step at the number of
    tokens before it, each uncached step at 0 (the whole sequence again)."""
    model = make_model(arch)
    calls = record_forward_calls(model)
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS if inputs == "left-padded" else PROMPTS[:1], return_tensors="pt", padding=True)
    if inputs == "no-mask":
        del encoded["attention_mask"]
    model.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=0, use_cache=use_cache)
    width = encoded["input_ids"].shape[1]
    assert len(calls) == 4
    for step, (tokens, column) in enumerate(calls):
        if use_cache:
            expected = (width, 0) if step == 0 else (1, width + step - 1)
        else:
            expected = (width + step, 0)
        assert (tokens, column) == expected, f"call {step}"


@pytest.mark.parametrize("inputs", ["single", "left-padded"])
def test_completion_steering_in_generate_equals_a_full_forward_loop(arch, tokenizer, inputs):
    """Steered greedy generation (KV cache, whatever generate passes) equals a loop of plain full forwards that
    steer from each row's last prompt token, written here without generate."""
    model = get_peft_model(make_model(arch), SteeringConfig(layers=[1], positions="completion"))
    peft_steer.set_vectors(model, {1: 2 * torch.randn(32, generator=torch.Generator().manual_seed(3))})
    tokenizer.padding_side = "left"
    encoded = tokenizer(PROMPTS if inputs == "left-padded" else PROMPTS[:1], return_tensors="pt", padding=True)
    generated, logits = generate(model, encoded)

    tokens, mask = encoded["input_ids"], encoded["attention_mask"]
    lengths = torch.full((tokens.shape[0],), tokens.shape[1])
    expected_tokens, expected_logits = [], []
    with torch.no_grad(), peft_steer.prompt_lengths(model, lengths):
        for _ in range(NEW_TOKENS):
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            last = model(input_ids=tokens, attention_mask=mask, position_ids=positions).logits[:, -1]
            expected_logits.append(last)
            expected_tokens.append(last.argmax(dim=-1))
            tokens = torch.cat([tokens, expected_tokens[-1][:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    with model.disable_adapter():
        unsteered, _ = generate(model, encoded)
    assert not torch.equal(generated, unsteered), "the vector should change what is generated"
    assert torch.equal(generated, torch.stack(expected_tokens, dim=1))
    assert torch.allclose(logits, torch.stack(expected_logits, dim=1), atol=1e-4)
