"""SteerConfig defaults and checks; every bad input stops the trainer with a clear error before it writes anything."""

from __future__ import annotations

import os
import re

import pytest
import torch
from datasets import Dataset, IterableDataset
from peft import LoraConfig, PeftModel, get_peft_model
from trl import DPOConfig

import peft_steer
from peft_steer import SteeringConfig
from peft_steer.data import DataError, load_preference_data, plain_prompt
from tests.conftest import make_model
from trl_integration import SteerConfig, SteerTrainer, sharding

from .conftest import QUESTIONS, bipo_rows, fast_args


def test_defaults_are_the_papers(tmp_path, monkeypatch):
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    args = SteerConfig(output_dir=str(tmp_path / "out"))
    assert (args.beta, args.learning_rate, args.weight_decay) == (0.1, 5e-4, 0.05)
    assert args.lr_scheduler_type == "cosine" and args.warmup_steps == 100
    assert args.per_device_train_batch_size == 4
    assert args.direction_sampling == "random"
    assert args.loss_type == ["sigmoid"]
    assert args.bf16 is False and args.activation_checkpointing is False  # the official code trains in fp32
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
    ("launch", "given", "expected"), [("bf16", None, True), ("no", None, False), ("bf16", False, False)]
)
def test_an_unset_bf16_follows_the_launch_config(tmp_path, monkeypatch, launch, given, expected):
    # `accelerate launch` with mixed_precision: bf16 (examples/accelerate/zero3.yaml) sets this variable; DeepSpeed
    # refuses a run whose bf16 setting disagrees with it, so an unset bf16 follows it. An explicit bf16=False stays,
    # but transformers still computes in the launch's bf16 (`mixed_precision`).
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launch)
    args = SteerConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=given)
    assert args.bf16 is expected and args.mixed_precision == ("bf16" if expected else launch)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("loss_type", "ipo"),
        ("loss_type", ["sigmoid", "sft"]),
        ("ld_alpha", 0.5),
        ("use_weighting", True),
        ("label_smoothing", 0.1),
        ("f_divergence_type", "js_divergence"),
        ("direction_sampling", "both"),
        ("beta", 0.0),
    ],
)
def test_options_that_change_the_objective_are_refused(tmp_path, option, value):
    with pytest.raises(ValueError, match=re.escape(option)):
        SteerConfig(output_dir=str(tmp_path / "out"), **{option: value})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("learning_rate", float("inf")),
        ("learning_rate", float("nan")),
        ("beta", float("nan")),
        ("beta", float("inf")),
        ("num_train_epochs", float("nan")),
        ("warmup_steps", float("nan")),
        ("weight_decay", float("inf")),
        ("per_device_train_batch_size", 0),
    ],
)
def test_numbers_that_cannot_train_are_refused(tmp_path, option, value):
    with pytest.raises(ValueError, match=rf"SteerConfig\({option}={value}\)"):
        SteerConfig(output_dir=str(tmp_path / "out"), **{option: value})
    assert not os.path.exists(tmp_path / "out")


def test_weight_decay_applies_to_the_vector(tmp_path, tokenizer, pairs):
    trainer = SteerTrainer(
        model=make_model("llama"),
        args=fast_args(tmp_path, weight_decay=0.05),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[1]),
    )
    optimizer = trainer.create_optimizer()
    vector = trainer.model.base_model.steering_vectors["default"]["1"]
    groups = [group for group in optimizer.param_groups if any(param is vector for param in group["params"])]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 1  # the vector and nothing else


def _frozen_adapter(tmp_path):
    model = get_peft_model(make_model("llama"), SteeringConfig(layers=[1]))
    model.save_pretrained(tmp_path / "saved")
    return PeftModel.from_pretrained(make_model("llama"), tmp_path / "saved")  # is_trainable=False


def _trl_rows() -> list[dict[str, str]]:
    """The BiPO rows in TRL's prompt / chosen / rejected format, with the plain prompt."""
    rows = bipo_rows(QUESTIONS[:8])
    return [
        {"prompt": plain_prompt(r["question"]), "chosen": " " + r["matching"], "rejected": " " + r["not_matching"]}
        for r in rows
    ]


def _streamed(rows: list[dict[str, str]]) -> IterableDataset:
    return Dataset.from_list(rows).to_iterable_dataset()


def _stream_args(tmp, **overrides) -> SteerConfig:
    return fast_args(tmp, **{"max_steps": 2, "precompute_ref_log_probs": False, **overrides})


BAD_STARTS = {
    "missing column": (
        lambda tmp: dict(train_dataset=Dataset.from_list([{"question": "q", "matching": "a"}])),
        DataError,
        r"train_dataset has no column 'not_matching'",
    ),
    "empty data set": (
        lambda tmp: dict(train_dataset=Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})),
        DataError,
        r"train_dataset holds no rows",
    ),
    "non-text cell": (
        lambda tmp: dict(
            train_dataset=Dataset.from_list(
                [{"prompt": "p", "chosen": "yes", "rejected": "no"}, {"prompt": "p", "chosen": "7", "rejected": None}]
            )
        ),
        DataError,
        r"train_dataset\[1\], column 'rejected': the cell is missing",
    ),
    "every pair the same": (
        lambda tmp: dict(train_dataset=Dataset.from_list([{"question": "q", "matching": "a", "not_matching": "a"}])),
        DataError,
        r"Every pair of train_dataset has matching == not_matching",
    ),
    "bad eval data set": (
        lambda tmp: dict(eval_dataset=Dataset.from_list([{"prompt": "p", "chosen": 1, "rejected": "no"}])),
        DataError,
        r"eval_dataset\[0\], column 'chosen': the cell is a int",
    ),
    "prompts longer than max_length": (
        lambda tmp: dict(args=fast_args(tmp, max_length=8)),
        DataError,
        r"max_length=8",
    ),
    "LoRA config": (lambda tmp: dict(peft_config=LoraConfig(r=2)), TypeError, r"peft_steer.SteeringConfig"),
    "no adapter": (lambda tmp: dict(peft_config=None), ValueError, r"has no steering adapter"),
    "frozen adapter": (
        lambda tmp: dict(model=_frozen_adapter(tmp), peft_config=None),
        ValueError,
        r"is_trainable=True",
    ),
    "FSDP1": (
        lambda tmp: dict(args=fast_args(tmp, fsdp="full_shard", fsdp_config={"version": 1})),
        NotImplementedError,
        r"SteerTrainer supports FSDP2, not FSDP1: set fsdp_config=\{'version': 2\}",
    ),
    "streamed BiPO rows": (
        lambda tmp: dict(train_dataset=_streamed(bipo_rows(QUESTIONS[:8])), args=_stream_args(tmp)),
        DataError,
        r"train_dataset is streamed \(an IterableDataset\) with columns question, matching, not_matching: "
        r"stream TRL's prompt / chosen / rejected",
    ),
    "streamed, reference log-probs up front": (
        lambda tmp: dict(train_dataset=_streamed(_trl_rows()), args=_stream_args(tmp, precompute_ref_log_probs=True)),
        ValueError,
        r"train_dataset is streamed \(an IterableDataset\): set precompute_ref_log_probs=False",
    ),
    "streamed eval set, reference log-probs up front": (
        lambda tmp: dict(eval_dataset=_streamed(_trl_rows()), args=fast_args(tmp, max_steps=2)),
        ValueError,
        r"eval_dataset is streamed \(an IterableDataset\): set precompute_ref_log_probs=False",
    ),
    "streamed eval set in a dict": (
        lambda tmp: dict(eval_dataset={"held": _streamed(_trl_rows())}, args=fast_args(tmp, max_steps=2)),
        ValueError,
        r"eval_dataset\['held'\] is streamed \(an IterableDataset\): set precompute_ref_log_probs=False",
    ),
    "streamed, prefix cache asked for": (
        lambda tmp: dict(train_dataset=_streamed(_trl_rows()), args=_stream_args(tmp, prefix_cache="cpu")),
        ValueError,
        r"train_dataset is streamed \(an IterableDataset\): set prefix_cache='off' \(or 'auto'\)",
    ),
    "streamed, no max_steps": (
        lambda tmp: dict(train_dataset=_streamed(_trl_rows()), args=_stream_args(tmp, max_steps=-1)),
        ValueError,
        r"train_dataset is streamed \(an IterableDataset\), so its length is unknown: set max_steps",
    ),
    "DPOConfig": (
        lambda tmp: dict(args=DPOConfig(output_dir=str(tmp / "out"), use_cpu=True, report_to="none")),
        TypeError,
        r"takes a SteerConfig",
    ),
}


@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_bad_start_raises_and_writes_nothing(tmp_path, tokenizer, pairs, case, monkeypatch):
    change, error, message = BAD_STARTS[case]
    # accelerate starts FSDP only on accelerators: as if these processes ran on some
    monkeypatch.setattr(sharding, "accelerate_starts_fsdp", lambda args: True)
    kwargs = dict(
        model=make_model("llama"),
        args=fast_args(tmp_path),
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=SteeringConfig(layers=[1]),
    )
    kwargs.update(change(tmp_path))
    with pytest.raises(error, match=message):
        SteerTrainer(**kwargs)
    assert not os.path.exists(tmp_path / "out")


def test_identical_pairs_are_dropped_with_a_count(tmp_path, tokenizer):
    rows = bipo_rows(QUESTIONS[:8])
    rows[2]["not_matching"] = rows[2]["matching"]
    rows[5]["not_matching"] = " " + rows[5]["matching"]  # the same answer up to surrounding spaces
    with pytest.warns(UserWarning, match=r"dropped 2 of 8 pairs whose chosen answer equals the rejected one"):
        trainer = SteerTrainer(
            model=make_model("llama"),
            args=fast_args(tmp_path),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[1]),
        )
    assert len(trainer.train_dataset) == 6


def test_long_pairs_are_truncated_and_counted(tmp_path, tokenizer):
    rows = bipo_rows(QUESTIONS)
    rows[0]["question"] = "Would you accept more power? " * 12  # a prompt longer than max_length: dropped
    data = Dataset.from_list(rows)
    max_length = 100
    # Independently: the token counts of prompt + answer + EOS, as the trainer will see them.
    formatted = load_preference_data(data, tokenizer)

    def tokens(text: str) -> int:
        return len(tokenizer(text)["input_ids"])

    eos = tokenizer.eos_token
    lengths = [
        (tokens(row["prompt"]), max(tokens(row["prompt"] + row[key] + eos) for key in ("chosen", "rejected")))
        for row in formatted
    ]
    dropped = sum(prompt >= max_length for prompt, _ in lengths)
    truncated = sum(total > max_length and prompt < max_length for prompt, total in lengths)
    assert dropped == 1 and 0 < truncated < len(rows) - 1  # the case is not trivial
    with pytest.warns(UserWarning) as caught:
        trainer = SteerTrainer(
            model=make_model("llama"),
            args=fast_args(tmp_path, max_length=max_length),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[1]),
        )
    messages = [str(warning.message) for warning in caught]
    assert any(f"dropped {dropped} of {len(rows)} pairs whose prompt alone" in m for m in messages), messages
    assert any(f"{truncated} of {len(rows)} pairs are longer than max_length={max_length}" in m for m in messages)
    assert len(trainer.train_dataset) == len(rows) - dropped
    # Training on the truncated pairs works (the collator cuts them at max_length).
    trainer.args.max_steps = 1
    trainer.train()
    assert peft_steer.get_vectors(trainer.model)[1].abs().sum() > 0
    assert trainer.data_collator([trainer.train_dataset[i] for i in range(4)])["input_ids"].shape[1] <= max_length
    assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))


def test_streamed_pairs_train_as_a_map_style_set_does(tmp_path, tokenizer):
    # One batch holds the whole set, so the order a stream gives the pairs in does not change a step.
    rows = _trl_rows()
    vectors = {}
    for name, data in {"map-style": Dataset.from_list(rows), "streamed": _streamed(rows)}.items():
        trainer = SteerTrainer(
            model=make_model("llama"),
            args=_stream_args(tmp_path / name, max_steps=3, per_device_train_batch_size=8),
            train_dataset=data,
            processing_class=tokenizer,
            peft_config=SteeringConfig(layers=[1]),
        )
        trainer.train()
        vectors[name] = peft_steer.get_vectors(trainer.model)[1]
    # prefix_cache='auto' is off for a stream: its size is unknown, and the cache would keep every sequence read.
    assert trainer.prefix_plan.cache is None
    assert trainer.state.global_step == 3 and vectors["streamed"].abs().max() > 1e-3
    torch.testing.assert_close(vectors["streamed"], vectors["map-style"], atol=1e-6, rtol=1e-5)
