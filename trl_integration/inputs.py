"""What `SteerTrainer(...)` is given, checked and completed before anything is loaded or written.

Each function raises an error that says what to change; none of them writes to ``args.output_dir``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

from datasets import Dataset, IterableDataset
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import peft_steer
from peft_steer import SteeringConfig, SteeringModel
from peft_steer.caller import warn_at_caller
from peft_steer.data import DataError, check_preference_dataset

from .config import SteerConfig


def _name_or_path(model: str | nn.Module) -> str:
    return model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")


def steer_config(args: Any, model: str | nn.Module) -> SteerConfig:
    """``args`` checked to be a `SteerConfig`; ``None`` gives the defaults, writing to ``<model name>-BiPO``."""
    if args is None:
        args = SteerConfig(output_dir=f"{os.path.basename(str(_name_or_path(model)).rstrip('/')) or 'model'}-BiPO")
    if not isinstance(args, SteerConfig):
        raise TypeError(
            f"SteerTrainer(args=...) takes a SteerConfig, got {type(args).__name__}: use "
            "trl_integration.SteerConfig(...), which accepts every DPOConfig option."
        )
    return args


def check_arguments(model: Any, compute_metrics: Any, peft_config: Any, train_dataset: Any) -> None:
    """Refuse the arguments `SteerTrainer` cannot use, before anything is loaded."""
    if compute_metrics is not None:
        raise ValueError("SteerTrainer(compute_metrics=...) is not supported: evaluation reports the BiPO metrics.")
    if peft_config is not None and not isinstance(peft_config, SteeringConfig):
        raise TypeError(
            f"SteerTrainer(peft_config=...) takes a peft_steer.SteeringConfig, got {type(peft_config).__name__}. "
            "To train a LoRA under the vector, create it first and pass the LoRA PeftModel as `model`."
        )
    if isinstance(model, str) and peft_config is None:
        raise ValueError(
            f"SteerTrainer(model={model!r}) loads a plain model: pass peft_config=SteeringConfig(layers=[...]) to "
            "say which block to steer."
        )
    if train_dataset is None:
        raise ValueError("SteerTrainer needs a train_dataset of preference pairs.")


def check_streamed(args: SteerConfig, train_dataset: Any, eval_dataset: Any) -> bool:
    """Whether a data set is streamed (a `datasets.IterableDataset`), refusing the settings that need every pair up
    front: the reference log-probs computed before training, a prefix cache asked for (its size is unknown, and it
    would keep every sequence read), no ``max_steps`` and a ``schedule_epochs`` (a stream has no length to count
    epochs with)."""
    named = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        named.update({f"eval_dataset[{key!r}]": dataset for key, dataset in eval_dataset.items()})
    else:
        named["eval_dataset"] = eval_dataset
    streamed = [name for name, dataset in named.items() if isinstance(dataset, IterableDataset)]
    for name in streamed:
        what = f"SteerTrainer: {name} is streamed (an IterableDataset)"
        if args.precompute_ref_log_probs:
            raise ValueError(f"{what}: set precompute_ref_log_probs=False (the reference then runs at every step).")
        if args.prefix_cache not in ("off", "auto"):
            raise ValueError(f"{what}: set prefix_cache='off' (or 'auto'); the cache would keep every sequence read.")
    if "train_dataset" in streamed and args.max_steps <= 0:
        raise ValueError(
            "SteerTrainer: train_dataset is streamed (an IterableDataset), so its length is unknown: set max_steps."
        )
    if "train_dataset" in streamed and args.schedule_epochs is not None:
        raise ValueError(
            "SteerTrainer: train_dataset is streamed (an IterableDataset), so an epoch has no length: set "
            "schedule_epochs=None (the schedule then lasts max_steps)."
        )
    return bool(streamed)


def _check_streamed_columns(dataset: IterableDataset, name: str) -> None:
    """A streamed set is tokenized by TRL as it is read: it must hold TRL's preference columns. BiPO rows need the
    chat-template formatting of `peft_steer.data`, which reads the whole set."""
    columns = dataset.column_names or list(next(iter(dataset), {}))
    if {"chosen", "rejected"} <= set(columns):
        return
    raise DataError(
        f"{name} is streamed (an IterableDataset) with columns {', '.join(columns) or 'none'}: stream TRL's prompt / "
        "chosen / rejected columns, or pass a datasets.Dataset (BiPO's question / matching / not_matching rows are "
        "formatted with the whole set at hand)."
    )


def tokenizer_for(model: str | nn.Module, processing_class: Any, args: SteerConfig) -> Any:
    """``processing_class``, or the model's tokenizer; with a pad token either way (the data checks tokenize)."""
    if processing_class is None:
        source = _name_or_path(model)
        if not source:
            raise ValueError("SteerTrainer needs processing_class=<the model's tokenizer>.")
        processing_class = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
    if getattr(processing_class, "pad_token", 1) is None:
        processing_class.pad_token = processing_class.eos_token  # as DPOTrainer does
    return processing_class


def checked(dataset: Any, tokenizer: Any, name: str) -> Any:
    """Check a data set given to the trainer (BiPO rows are formatted with the tokenizer's chat template)."""
    if isinstance(dataset, IterableDataset):
        _check_streamed_columns(dataset, name)
        return dataset  # streamed: its rows cannot be scanned up front; TRL tokenizes them as they come
    if not isinstance(dataset, Dataset):
        raise TypeError(f"SteerTrainer({name}=...) must be a datasets.Dataset, got {type(dataset).__name__}.")
    return check_preference_dataset(dataset, tokenizer, name=name)


def checked_unless_tokenized(dataset: Any, tokenizer: Any, name: str) -> Any:
    """`checked`, except for a data set TRL has tokenized already."""
    if isinstance(dataset, Dataset) and "prompt_ids" in dataset.column_names:
        return dataset
    return checked(dataset, tokenizer, name)


def checked_eval(eval_dataset: Any, tokenizer: Any, check: Callable[[Any, Any, str], Any] = checked) -> Any:
    """An evaluation set, or a dict of them, passed through ``check`` (``None`` stays ``None``)."""
    if isinstance(eval_dataset, dict):
        return {key: check(value, tokenizer, f"eval_dataset[{key!r}]") for key, value in eval_dataset.items()}
    return None if eval_dataset is None else check(eval_dataset, tokenizer, "eval_dataset")


def loaded_model(model: str | nn.Module, args: SteerConfig, quantization_config: Any) -> nn.Module:
    """``model``, loaded first when it is a name or path (quantized with ``quantization_config``)."""
    if not isinstance(model, str):
        if quantization_config is not None:
            raise ValueError("quantization_config only applies when `model` is a name or path; this model is loaded.")
        return model
    init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        init_kwargs["quantization_config"] = quantization_config
    init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return AutoModelForCausalLM.from_pretrained(model, **init_kwargs)


def steering_peft_model(model: nn.Module, peft_config: SteeringConfig | None) -> PeftModel:
    """The PeftModel whose steering adapter is trained: ``model`` itself, or ``model`` with ``peft_config`` added."""
    has_steering = isinstance(model, PeftModel) and peft_steer.has_steering(model)
    if peft_config is None:
        if not has_steering:
            raise ValueError(
                f"{type(model).__name__} has no steering adapter: pass peft_config=SteeringConfig(layers=[...]), or a "
                "model from get_peft_model(model, SteeringConfig(...)) / PeftModel.from_pretrained(..., "
                "is_trainable=True)."
            )
        return model
    if has_steering:
        raise ValueError(
            "This model already has a steering adapter and peft_config was given too: pass peft_config=None to train "
            "the existing adapter, or start from the base model."
        )
    if isinstance(model, PeftModel):
        # A LoRA (or other) PeftModel: the steering adapter goes on top and PEFT's "second time" warning is expected.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*modify a model with PEFT for a second time.*")
            return get_peft_model(model, peft_config)
    return get_peft_model(model, peft_config)


def trained_adapter(tuner: SteeringModel) -> str:
    """The name of the one active steering adapter, checked to be trainable."""
    active = list(tuner.active_adapters)
    if len(active) != 1:
        raise ValueError(
            f"SteerTrainer trains one steering adapter, but {active or 'none'} are active: choose one with "
            "model.set_adapter(name)."
        )
    name = active[0]
    if not any(vector.requires_grad for vector in tuner.vectors_of(name).values()):
        raise ValueError(
            f"The steering adapter {name!r} is frozen (loaded for inference): load it with "
            "PeftModel.from_pretrained(base, path, is_trainable=True) to train it further."
        )
    return name


def warn_about_length(prepared: Any, count: int | None, args: SteerConfig, dataset_name: str) -> None:
    """After TRL's tokenization: refuse a data set whose prompts all reach ``max_length``, and warn with the number
    of pairs dropped (prompt alone too long) and truncated, at the user's line that started it."""
    if count is None or args.max_length is None or "prompt_ids" not in prepared.column_names:
        return
    dropped = count - len(prepared)
    if not len(prepared):
        raise DataError(
            f"Every prompt of the {dataset_name} dataset is at least max_length={args.max_length} tokens long, so "
            "no completion token would be left: raise max_length."
        )
    columns = zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
    long = sum(len(prompt) + max(len(chosen), len(rejected)) > args.max_length for prompt, chosen, rejected in columns)
    if dropped:
        warn_at_caller(
            f"{dataset_name} dataset: dropped {dropped} of {count} pairs whose prompt alone is at least "
            f"max_length={args.max_length} tokens (no completion token would be left)."
        )
    if long:
        warn_at_caller(
            f"{dataset_name} dataset: {long} of {count} pairs are longer than max_length={args.max_length} tokens "
            f"and are truncated to it ({args.truncation_mode}: the end of the completion is cut)."
        )
