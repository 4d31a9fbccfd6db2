"""`SteerTrainer`: a `DPOTrainer` that trains a steering vector with the BiPO objective.

For a preference pair (x, y_w, y_l) and a direction d in {-1, +1}:

    r_d(y) = log pi_{L + d v}(y | x) - log pi(y | x)          (log-probs summed over the completion tokens)
    loss   = -log sigmoid(d * beta * (r_d(y_w) - r_d(y_l)))

pi is the model with the steering adapter disabled: the same weights as the policy, never a copy and never a "ref"
adapter, so a run holds one model. Its log-probs can be computed once before training (`precompute_ref_log_probs`).
"""

from __future__ import annotations

import logging
import os
import random
import textwrap
import warnings
from collections.abc import Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from datasets import Dataset, IterableDataset
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import DPOTrainer

import peft_steer
from peft_steer import SteeringConfig, SteeringModel
from peft_steer.blocks import find_block_list
from peft_steer.data import DataError, check_preference_dataset

from .config import SteerConfig
from .prefix_cache import PrefixCache, choose_storage, estimate_bytes, fallback_reason
from .prefix_offload import OffloadedBlocks, destination_for, offload_blocker
from .sharding import check_sharding, gathered, register_with_zero3

logger = logging.getLogger(__name__)

BIPO_CITATION = textwrap.dedent("""\
    @inproceedings{cao2024personalized,
        title        = {{Personalized Steering of Large Language Models: Versatile Steering Vectors Through
                         Bi-directional Preference Optimization}},
        author       = {Yuanpu Cao and Tianrong Zhang and Bochuan Cao and Ziyi Yin and Lu Lin and Fenglong Ma and
                         Jinghui Chen},
        year         = 2024,
        booktitle    = {Advances in Neural Information Processing Systems 38 (NeurIPS 2024)},
    }""")


def sample_direction(seed: int, step: int) -> float:
    """The direction (+1.0 or -1.0) of optimizer step ``step``: a pure function of ``(seed, step)``.

    Seeding a fresh generator from a string (hashed with SHA-512 by `random.Random`, the same in every process)
    makes every data-parallel rank, every micro-batch of the step and a resumed run draw the same direction, with no
    random state to carry around.
    """
    return 1.0 if random.Random(f"bipo-direction:{seed}:{step}").random() < 0.5 else -1.0


class SteerTrainer(DPOTrainer):
    """Trains the steering vector of a PEFT steering adapter with BiPO (bi-directional preference optimization).

    Args:
        model: A `PeftModel` holding one active, trainable steering adapter; or a transformers causal LM (or its
            name / path) together with ``peft_config``; or a LoRA `PeftModel` with ``peft_config``, which stacks the
            steering adapter on the LoRA (the LoRA stays frozen and stays on in the reference).
        args: A `SteerConfig` (the paper's settings by default).
        data_collator: As in `DPOTrainer` (the default pads [chosen; rejected] on the right).
        train_dataset: Preference pairs: BiPO rows (question / matching / not_matching, formatted with the
            tokenizer's chat template, see `peft_steer.data`) or any TRL preference format. Pairs whose chosen
            equals rejected are dropped with a warning; bad rows raise `peft_steer.data.DataError`.
        eval_dataset: Same formats; evaluated in both directions.
        processing_class: The tokenizer.
        compute_metrics: Not supported (the trainer has no logits to give it); leave ``None``.
        callbacks: Extra `TrainerCallback` s.
        optimizers: ``(optimizer, scheduler)`` to use instead of AdamW + the configured schedule.
        quantization_config: With a model name: load it quantized (e.g. `BitsAndBytesConfig(load_in_4bit=True)`).
        peft_config: A `SteeringConfig` to create the steering adapter with; ``None`` if ``model`` already has one.

    The reference model is ``model`` with the steering adapter disabled (``model.disable_adapter()``); there is no
    ``ref_model`` argument. Everything is checked before anything is written to ``args.output_dir``.
    """

    _tag_names = ["trl", "bipo", "peft-steer", "steering-vector"]
    _name = "BiPO"
    _paper = {
        "title": "Personalized Steering of Large Language Models: Versatile Steering Vectors Through Bi-directional "
        "Preference Optimization",
        "id": "2406.00045",
        "citation": BIPO_CITATION,
    }

    def __init__(
        self,
        model: str | nn.Module,
        args: SteerConfig | None = None,
        data_collator: Any = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        compute_metrics: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
        quantization_config: Any = None,
        peft_config: SteeringConfig | None = None,
    ) -> None:
        # ---- 1. checks that need nothing loaded: nothing may reach output_dir before they pass ----------------
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = SteerConfig(output_dir=f"{os.path.basename(str(name).rstrip('/')) or 'model'}-BiPO")
        if not isinstance(args, SteerConfig):
            raise TypeError(
                f"SteerTrainer(args=...) takes a SteerConfig, got {type(args).__name__}: use "
                "trl_integration.SteerConfig(...), which accepts every DPOConfig option."
            )
        engine = check_sharding(args)
        if engine is not None and args.precompute_ref_log_probs:
            # Before `train()` the model is neither on the devices nor sharded (FSDP keeps it on the CPU; ZeRO-3
            # would need a second, inference engine): the reference pass runs inside each step instead.
            logger.warning("%s: precompute_ref_log_probs turned off; the reference runs at every step.", engine)
            args.precompute_ref_log_probs = False
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

        if processing_class is None:
            source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            if not source:
                raise ValueError("SteerTrainer needs processing_class=<the model's tokenizer>.")
            processing_class = AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)
        if getattr(processing_class, "pad_token", 1) is None:
            # As DPOTrainer does; set it here because the data checks below tokenize.
            processing_class.pad_token = processing_class.eos_token

        train_dataset = _checked(train_dataset, processing_class, "train_dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: _checked(value, processing_class, f"eval_dataset[{key!r}]") for key, value in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = _checked(eval_dataset, processing_class, "eval_dataset")

        # ---- 2. the steering adapter -------------------------------------------------------------------------
        # TRL seeds before creating the adapter, so that a random initialisation is the same on every rank.
        set_seed(args.seed)
        if isinstance(model, str):
            init_kwargs = dict(args.model_init_kwargs or {})
            if quantization_config is not None:
                init_kwargs["quantization_config"] = quantization_config
            init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(model, **init_kwargs)
        elif quantization_config is not None:
            raise ValueError("quantization_config only applies when `model` is a name or path; this model is loaded.")
        model = _steering_peft_model(model, peft_config)
        tuner = peft_steer.steering_model(model)
        self.adapter_name = _trained_adapter(tuner)
        # TRL casts the trainable parameters of a quantized model to bf16; the exact fp32 values are put back below.
        initial_vectors = peft_steer.get_vectors(model, self.adapter_name)

        # The prefix cache is created once the train set is tokenized (`_prepare_dataset`, with a size estimate per
        # data set: TRL prepares the train set first, then each evaluation set, also again in `evaluate(...)`).
        self._prefix_cache: PrefixCache | None = None
        self._prefix_train_size: int | None = None
        self._prefix_eval_sizes: dict[str, int] = {}
        self._prefix_block = min(tuner.peft_config[self.adapter_name].layers)
        self._prefix_hidden = tuner.peft_config[self.adapter_name].hidden_size
        self._prefix_model = model.get_base_model()
        if args.prefix_cache == "off":
            self._prefix_off_reason: str | None = "prefix_cache='off'"
        elif engine is not None:
            self._prefix_off_reason = f"replaying blocks 0..L under {engine} is not verified"
        else:
            self._prefix_off_reason = fallback_reason(model.get_base_model(), self._prefix_block)

        # ---- 3. DPOTrainer ------------------------------------------------------------------------------------
        # The reference is this model with steering disabled: `compute_loss` and `compute_ref_log_probs` below
        # disable the adapter on `self.model`. TRL would build a "ref" adapter instead (see `_no_ref_adapter`).
        with _no_ref_adapter(model, self.adapter_name):
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                callbacks=callbacks,
                optimizers=optimizers,
            )

        # The vectors stay fp32 whatever the model's dtype (bf16 loses small updates: 10 + 1e-2 == 10). Where DeepSpeed
        # in bf16 casts the whole model, the vectors too, its optimizer keeps the float32 master copy instead.
        tuner._cast_adapter_dtype(self.adapter_name)
        peft_steer.set_vectors(model, initial_vectors, self.adapter_name)
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage == 3:
            config = tuner.peft_config[self.adapter_name]
            _, blocks = find_block_list(model.get_base_model(), config.blocks_path)
            register_with_zero3(blocks, tuner.vectors_of(self.adapter_name))

        self.add_callback(_SteerCallback(self))
        _drop_input_grads(self)

    # ---- data --------------------------------------------------------------------------------------------------

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):  # noqa: D401 (TRL's signature)
        """TRL's tokenization, plus warnings that count the pairs `max_length` truncates or drops."""
        count = len(dataset) if isinstance(dataset, Dataset) else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if self._prefix_train_size is None:  # TRL prepares the train set first (an eval set may be named "train")
            self._plan_prefix_cache(prepared, args)
        elif self._prefix_cache is not None:  # evaluation fills the cache with its sequences too
            self._resize_prefix_cache(prepared, args, dataset_name)
        if count is None or args.max_length is None or "prompt_ids" not in prepared.column_names:
            return prepared
        dropped = count - len(prepared)
        if not len(prepared):
            raise DataError(
                f"Every prompt of the {dataset_name} dataset is at least max_length={args.max_length} tokens long, so "
                "no completion token would be left: raise max_length."
            )
        columns = zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"])
        long = sum(
            len(prompt) + max(len(chosen), len(rejected)) > args.max_length for prompt, chosen, rejected in columns
        )
        if dropped:
            warnings.warn(
                f"{dataset_name} dataset: dropped {dropped} of {count} pairs whose prompt alone is at least "
                f"max_length={args.max_length} tokens (no completion token would be left).",
                UserWarning,
                stacklevel=4,  # the caller of SteerTrainer(...)
            )
        if long:
            warnings.warn(
                f"{dataset_name} dataset: {long} of {count} pairs are longer than max_length={args.max_length} tokens "
                f"and are truncated to it ({args.truncation_mode}: the end of the completion is cut).",
                UserWarning,
                stacklevel=4,  # the caller of SteerTrainer(...)
            )
        return prepared

    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        """TRL's evaluation. A data set given here is checked and, for BiPO rows, formatted as those given to
        `SteerTrainer(...)` are; one already tokenized (TRL passes them on per name) or a name is used as it is."""
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                key: _checked_unless_tokenized(value, self.processing_class, f"eval_dataset[{key!r}]")
                for key, value in eval_dataset.items()
            }
        elif eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = _checked_unless_tokenized(eval_dataset, self.processing_class, "eval_dataset")
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    def _plan_prefix_cache(self, prepared: Any, args: SteerConfig) -> None:
        """Create the prefix cache for this train set (or log why the plain path is used)."""
        if self._prefix_off_reason is not None:
            self._prefix_train_size = 0
            logger.warning("Prefix cache off: %s. Every step runs the whole model.", self._prefix_off_reason)
            return
        self._prefix_train_size = size = self._prefix_bytes(prepared)
        storage = choose_storage(args.prefix_cache, size, args.device)
        logger.warning(
            "Prefix cache: the output of blocks 0..%d for every training sequence, about %.1f MiB (%s), kept on %s.",
            self._prefix_block, size / 2**20, self._prefix_dtype(), storage,
        )  # fmt: skip
        self._prefix_cache = PrefixCache(self._prefix_model, self._prefix_block, storage, args.prefix_cache_dir)

    def _resize_prefix_cache(self, prepared: Any, args: SteerConfig, dataset_name: str) -> None:
        """Count an evaluation set's sequences in the cache's size (once per name: `evaluate` prepares its set again),
        and choose the storage again for the total while the cache is still empty."""
        self._prefix_eval_sizes[dataset_name] = size = self._prefix_bytes(prepared)
        total = self._prefix_train_size + sum(self._prefix_eval_sizes.values())
        cache = self._prefix_cache
        storage = choose_storage(args.prefix_cache, total, args.device) if not cache.entries else cache.storage
        logger.warning(
            "Prefix cache: the %s dataset adds about %.1f MiB, %.1f MiB in all, kept on %s.",
            dataset_name, size / 2**20, total / 2**20, storage,
        )  # fmt: skip
        if storage != cache.storage:
            cache.close()
            self._prefix_cache = PrefixCache(self._prefix_model, self._prefix_block, storage, args.prefix_cache_dir)

    def _prefix_dtype(self) -> torch.dtype:
        # `self._prefix_model`, as `self.model` does not exist yet: TRL prepares the data first
        dtype = next(self._prefix_model.parameters()).dtype
        return dtype if dtype.is_floating_point else torch.float32

    def _prefix_bytes(self, prepared: Any) -> int:
        """The cache's bytes for every sequence of a prepared data set: each pair's prompt + chosen and prompt +
        rejected (0 for a streamed set, whose size is unknown)."""
        if not (isinstance(prepared, Dataset) and "prompt_ids" in prepared.column_names):
            return 0
        prompts = sum(len(ids) for ids in prepared["prompt_ids"])
        answers = sum(len(ids) for ids in prepared["chosen_ids"]) + sum(len(ids) for ids in prepared["rejected_ids"])
        return estimate_bytes(2 * prompts + answers, self._prefix_hidden, self._prefix_dtype())

    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """Reference log-probs of every pair, once, as two new columns of the data set.

        TRL writes them to a cache file beside the data set; an in-memory data set has one temporary folder per
        process, so under DDP the other ranks could not read it. Here they stay in memory, gathered on every rank.
        """
        if isinstance(dataset, IterableDataset):
            raise ValueError(
                f"precompute_ref_log_probs needs a map-style {name} dataset, not an IterableDataset: "
                "pass a datasets.Dataset or set precompute_ref_log_probs=False."
            )
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        chosen, rejected = [], []
        for batch in tqdm(
            self.accelerator.prepare(loader),
            desc=f"Reference log-probs of the {name} dataset",
            disable=not self.is_local_process_zero() or self.args.disable_tqdm,
        ):
            batch_chosen, batch_rejected = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(None, batch))
            chosen.append(batch_chosen.cpu())
            rejected.append(batch_rejected.cpu())
        dataset = dataset.add_column("ref_chosen_logps", torch.cat(chosen).tolist())
        return dataset.add_column("ref_rejected_logps", torch.cat(rejected).tolist())

    # ---- training ----------------------------------------------------------------------------------------------

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; blocks 0..L leave the device meanwhile when the prefix cache holds every sequence."""
        with self._offloaded_prefix_blocks():
            return super().train(*args, **kwargs)

    @contextmanager
    def _offloaded_prefix_blocks(self):
        """Offload blocks 0..L for the time of the block (`SteerConfig.offload_prefix_blocks`), or log why not."""
        requested = self.args.offload_prefix_blocks
        device = next(self._prefix_model.parameters()).device
        destination = destination_for(requested, device)
        offloaded, reason = None, None
        if self._prefix_cache is None:
            reason = "the prefix cache is off"
        elif not self.args.precompute_ref_log_probs:
            reason = "precompute_ref_log_probs=False, so the prefix cache fills during training and needs them"
        elif destination is None and requested != "off":
            reason = "the model is in host memory already"
        else:
            reason = offload_blocker(self._prefix_model, self._prefix_block)
        if reason is None and destination is not None:
            offloaded = OffloadedBlocks(
                self._prefix_model,
                self._prefix_block,
                destination,
                lambda: self._prefix_cache.replaying,
                self.args.prefix_cache_dir,
            )
            reason = self._offload_room(offloaded)
        if reason is None and offloaded is not None:
            self._complete_prefix_cache()
            try:
                offloaded.offload()
            except OSError as error:
                if requested != "auto":
                    raise
                offloaded, reason = None, str(error)
        if offloaded is None:
            if reason is not None and requested != "off":
                log = logger.warning if requested != "auto" or "Could not write" in reason else logger.info
                log("Blocks 0..%d stay on %s: %s.", self._prefix_block, device, reason)
            yield
            return
        where = "host memory" if destination == "cpu" else f"a file in {self.args.prefix_cache_dir or 'a temp folder'}"
        logger.warning(
            "Blocks 0..%d (%.1f MiB of weights) moved to %s for training: every training sequence is in the prefix "
            "cache, so no step runs them.", self._prefix_block, offloaded.nbytes / 2**20, where,
        )  # fmt: skip
        try:
            yield
        finally:
            offloaded.restore()

    @staticmethod
    def _offload_room(offloaded: OffloadedBlocks) -> str | None:
        """Why host memory cannot take the blocks of every process on this machine, or None."""
        if offloaded.destination != "cpu":
            return None
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None  # unknown: try
        needed = processes * offloaded.nbytes
        if needed > 0.5 * available:
            return (
                f"{processes} process(es) x {offloaded.nbytes / 2**30:.1f} GiB would take more than half of the "
                f"{available / 2**30:.1f} GiB of free host memory (offload_prefix_blocks='disk' writes them to a file)"
            )
        return None

    def _complete_prefix_cache(self) -> None:
        """Cache every train and eval sequence this process has not seen yet, running blocks 0..L only.

        The reference pass saw every sequence in one process; under data parallelism it saw this rank's share only,
        and the sampler deals it the other ranks' sequences too. Same settings as the reference pass (eval mode,
        autocast), so that a sequence's cached prefix does not depend on which rank computed it.
        """
        peft_model = self.accelerator.unwrap_model(self.model)
        evaluated = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        with _eval_mode(peft_model), self.accelerator.autocast():
            for dataset in [self.train_dataset, *evaluated]:
                if dataset is None:
                    continue
                batch_size = self.args.per_device_train_batch_size
                for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator):
                    ids, mask = batch["input_ids"].to(self.accelerator.device), batch["attention_mask"]
                    self._prefix_cache.fill(ids, mask.to(ids.device), peft_model.disable_adapter())

    # ---- the objective -----------------------------------------------------------------------------------------

    @property
    def steering_model(self) -> SteeringModel:
        return peft_steer.steering_model(self.accelerator.unwrap_model(self.model))

    def directions(self, training: bool = True) -> tuple[float, ...]:
        """The directions of the current step: one for "random" / "positive", both for "antithetic" and evaluation."""
        if not training or self.args.direction_sampling == "antithetic":
            return (1.0, -1.0)
        if self.args.direction_sampling == "positive":
            return (1.0,)
        return (sample_direction(self.args.seed, self.state.global_step),)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        loss, metrics = self.bipo_loss(model, inputs, self.directions(training=mode == "train"))
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The BiPO loss only: there are no logits to return (the fused LM head never builds them).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def bipo_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], directions: Sequence[float]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The BiPO loss of a collated batch, averaged over its pairs and over ``directions``, and its metrics.

        ``inputs`` is a batch of the preference collator: ``input_ids``, ``attention_mask`` and ``completion_mask``
        with the chosen rows first, then the rejected rows, and optionally precomputed ``ref_chosen_logps`` /
        ``ref_rejected_logps``. Several directions run as one forward over a repeated batch with one multiplier per
        row. Metrics report rewards in the sign convention of d = +1: ``rewards/chosen`` is ``d * beta * r_d(y_w)``,
        so a positive margin means the pair is ordered the way direction d wants, whichever d it is.
        """
        if "ref_chosen_logps" in inputs:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self.compute_ref_log_probs(model, inputs)
        pairs, copies = inputs["input_ids"].shape[0] // 2, len(directions)
        device = inputs["input_ids"].device
        sign = torch.tensor(directions, dtype=torch.float32, device=device)
        if copies == 1:
            multiplier: float | torch.Tensor = float(directions[0])
            batch = inputs
        else:
            multiplier = sign.repeat_interleave(2 * pairs)
            batch = {key: inputs[key].repeat(copies, 1) for key in ("input_ids", "attention_mask", "completion_mask")}
        logps = self._completion_logps(model, batch, multiplier).float().view(copies, 2, pairs)
        chosen_rewards = logps[:, 0] - ref_chosen.to(device, torch.float32)
        rejected_rewards = logps[:, 1] - ref_rejected.to(device, torch.float32)
        signed = sign[:, None] * self.beta
        logits = signed * (chosen_rewards - rejected_rewards)  # [directions, pairs]
        loss = -F.logsigmoid(logits).mean()

        gather = self.accelerator.gather
        chosen, rejected = (signed * chosen_rewards).detach(), (signed * rejected_rewards).detach()
        metrics = {
            "direction": float(sign.mean()),
            "rewards/chosen": gather(chosen.flatten()).mean().item(),
            "rewards/rejected": gather(rejected.flatten()).mean().item(),
            "rewards/margins": gather((chosen - rejected).flatten()).mean().item(),
            "rewards/accuracies": gather((chosen > rejected).float().flatten()).mean().item(),
            "logps/chosen": gather(logps[:, 0].detach().flatten()).mean().item(),
            "logps/rejected": gather(logps[:, 1].detach().flatten()).mean().item(),
        }
        for index, direction in enumerate(directions):
            label = "+1" if direction > 0 else "-1"
            metrics[f"rewards/margins_d{label}"] = gather((chosen[index] - rejected[index]).flatten()).mean().item()
        return loss, metrics

    def compute_ref_log_probs(self, model: nn.Module, inputs: dict[str, torch.Tensor]):
        """Summed completion log-probs of the chosen and rejected rows under the reference (steering disabled).

        ``model`` is the model being trained, possibly wrapped (DDP, FSDP, a DeepSpeed engine); ``None`` means
        ``self.model``. The reference is always that model with the steering adapter disabled.
        """
        model = self.model if model is None else model
        peft_model = self.accelerator.unwrap_model(model)
        # Eval mode: no dropout (the reference never changes) and no activation checkpointing, which only costs time
        # without gradients (and warns when reentrant). TRL toggles checkpointing instead, which re-registers the
        # input-embedding hooks on every call.
        cache = self._prefix_cache
        capture = cache.capturing(inputs["input_ids"], inputs["attention_mask"]) if cache else nullcontext()
        with torch.no_grad(), peft_model.disable_adapter(), _eval_mode(model), self.accelerator.autocast():
            with capture:  # the reference pass sees the unsteered prefix: keep it
                logps = self._forward_logps(model, inputs)
        return logps.float().chunk(2, dim=0)

    def _completion_logps(self, model: nn.Module, batch: dict[str, torch.Tensor], multiplier) -> torch.Tensor:
        """Summed completion log-probs of every row with the adapter applied at ``multiplier`` (per row or not)."""
        peft_model = self.accelerator.unwrap_model(model)
        with ExitStack() as stack:
            stack.enter_context(peft_steer.steering(peft_model, multiplier=multiplier, adapter_name=self.adapter_name))
            stack.enter_context(self._prompt_boundaries(peft_model, batch["completion_mask"]))
            cache = self._prefix_cache
            if cache is not None:  # under the autocast of the reference pass, which fills the rest
                with self.accelerator.autocast():
                    cache.fill(batch["input_ids"], batch["attention_mask"], peft_model.disable_adapter())
                stack.enter_context(cache.replay(batch["input_ids"], batch["attention_mask"]))
            return self._forward_logps(model, batch)

    @contextmanager
    def _prompt_boundaries(self, peft_model: nn.Module, completion_mask: torch.Tensor):
        # positions="completion" steers from the last prompt token on; the collator pads on the right, so each row's
        # prompt ends where its completion mask first turns on.
        if self.steering_model.peft_config[self.adapter_name].positions != "completion":
            yield
            return
        with peft_steer.prompt_lengths(peft_model, completion_mask.argmax(dim=1)):
            yield

    @staticmethod
    def _forward_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        completion_mask = batch["completion_mask"]
        labels = batch["input_ids"].masked_fill(completion_mask == 0, -100)
        # TRL's fused LM head returns per-token log-probs of the labels without materialising the logits.
        outputs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            use_cache=False,
            fused_lm_head=True,
        )
        return outputs.log_probs[:, -(completion_mask.shape[1] - 1) :].sum(dim=1)

    # ---- saving ------------------------------------------------------------------------------------------------

    def save_epoch_vectors(self, epoch: int) -> str:
        """Save the steering adapter to ``output_dir/vectors/epoch-<epoch>``; return the path.

        Called on every rank (the vector is gathered from its shards under FSDP / ZeRO-3); the main process writes.
        """
        path = os.path.join(self.args.output_dir, "vectors", f"epoch-{epoch}")
        peft_model = self.accelerator.unwrap_model(self.model)
        # Under FSDP / ZeRO-3 each rank holds a shard of the vector: every rank takes part in gathering it.
        own = {id(vector) for vector in self.steering_model.vectors_of(self.adapter_name).values()}
        names, vectors = zip(*[(name, p) for name, p in peft_model.named_parameters() if id(p) in own])
        with gathered(list(vectors)) as whole:
            state_dict = dict(zip(names, whole))
            if self.args.should_save:
                peft_model.save_pretrained(path, selected_adapters=[self.adapter_name], state_dict=state_dict)
        return path

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        # TRL rewrites output_dir/README.md at each checkpoint; keep the steering section of the card in it.
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            from peft_steer.card import write_model_card

            write_model_card(self.args.output_dir, self.steering_model.peft_config[self.adapter_name])


class _SteerCallback(TrainerCallback):
    """Training-time duties of the trainer that need the Trainer's hooks."""

    def __init__(self, trainer: SteerTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        _drop_input_grads(self.trainer)  # `train()` has just enabled activation checkpointing again

    def on_epoch_end(self, args, state, control, **kwargs):
        # One vector per completed epoch, as the paper's runs keep them (not for an epoch cut short by max_steps).
        epoch = round(state.epoch)
        if args.save_vectors_per_epoch and epoch >= 1 and abs(state.epoch - epoch) < 1e-6:
            self.trainer.save_epoch_vectors(epoch)


# ---- helpers ---------------------------------------------------------------------------------------------------


@contextmanager
def _no_ref_adapter(model: PeftModel, adapter_name: str):
    """Stop `DPOTrainer.__init__` from building a "ref" adapter, for the time of that call only.

    Given a PeftModel and no `ref_model`, TRL reads ``model.peft_config["default"]``, adds an adapter "ref" with that
    config and copies every parameter named ".default." into its ".ref." twin. For BiPO that copy would be a steered
    reference, it fails on the parameters of a LoRA underneath (they have no ".ref." twin), and a second model given
    as `ref_model` instead would be prepared (and, under FSDP or DeepSpeed, sharded) a second time. Here "default"
    names the trained adapter, adding "ref" does nothing and each ".ref." parameter is its ".default." original, so
    TRL's copy writes every parameter onto itself. The instance attributes are removed afterwards.
    """
    configs = model.peft_config
    alias = "default" not in configs
    if alias:
        configs["default"] = configs[adapter_name]
    add_adapter, get_parameter = model.add_adapter, model.get_parameter

    def add_adapter_except_ref(name: str, *args: Any, **kwargs: Any) -> Any:
        return None if name == "ref" else add_adapter(name, *args, **kwargs)

    def original_of_ref(target: str) -> nn.Parameter:
        return get_parameter(target.replace(".ref.", ".default."))

    model.add_adapter, model.get_parameter = add_adapter_except_ref, original_of_ref
    try:
        yield
    finally:
        del model.add_adapter, model.get_parameter  # the class's methods again
        if alias:
            del configs["default"]


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _drop_input_grads(trainer: SteerTrainer) -> None:
    """Undo "input embeddings require grad", which TRL (in `__init__`) and `train()` set for activation checkpointing.

    Reentrant checkpointing needs it; the non-reentrant kind (transformers' default) does not, and with it every
    backward would run down through the blocks below the steered one, whose outputs do not depend on the vector. Called
    after each of the two, because each registers new hooks and forgets the earlier ones.
    """
    args = trainer.args
    if args.gradient_checkpointing and not (args.gradient_checkpointing_kwargs or {}).get("use_reentrant"):
        trainer.accelerator.unwrap_model(trainer.model).disable_input_require_grads()


def _checked(dataset: Any, tokenizer: Any, name: str) -> Any:
    """Check a data set given to the trainer (BiPO rows are formatted with the tokenizer's chat template)."""
    if isinstance(dataset, IterableDataset):
        return dataset  # streamed: it cannot be scanned up front; TRL checks rows as they come
    if not isinstance(dataset, Dataset):
        raise TypeError(f"SteerTrainer({name}=...) must be a datasets.Dataset, got {type(dataset).__name__}.")
    return check_preference_dataset(dataset, tokenizer, name=name)


def _checked_unless_tokenized(dataset: Any, tokenizer: Any, name: str) -> Any:
    if isinstance(dataset, Dataset) and "prompt_ids" in dataset.column_names:
        return dataset
    return _checked(dataset, tokenizer, name)


def _steering_peft_model(model: nn.Module, peft_config: SteeringConfig | None) -> PeftModel:
    """The PeftModel whose steering adapter is trained: ``model`` itself, or ``model`` with ``peft_config`` added."""
    has_steering = isinstance(model, PeftModel) and isinstance(model.base_model, SteeringModel)
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


def _trained_adapter(tuner: SteeringModel) -> str:
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
