"""`SteerTrainer`: a `DPOTrainer` that trains a steering vector with the BiPO objective (`trl_integration.loss`).

The reference pi is the model with the steering adapter disabled: the same weights as the policy, never a copy and
never a "ref" adapter, so a run holds one model. Its log-probs can be computed once before training
(`precompute_ref_log_probs`). This module holds the trainer's overrides of TRL; the objective, the checks of its
arguments, the prefix cache and every reliance on TRL's internals live in their own modules.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import DPOTrainer

import peft_steer
from peft_steer import SteeringConfig, SteeringModel
from peft_steer.adapter.blocks import find_block_list
from peft_steer.adapter.card import write_model_card
from peft_steer.evaluate.scoring import eval_mode

from ._accelerate_compat import deepspeed_zero_stage
from ._trl_compat import (
    close_progress_bars,
    completion_logps,
    drop_input_grads,
    no_ref_adapter,
    prepare_inputs,
    record_metrics,
    update_steps_per_epoch,
)
from .callbacks import SteerCallback
from .config import SteerConfig
from .inputs import (
    check_arguments,
    check_streamed,
    checked,
    checked_eval,
    checked_unless_tokenized,
    loaded_model,
    steer_config,
    steering_peft_model,
    tokenizer_for,
    trained_adapter,
    warn_about_length,
)
from .loss import BIPO_PAPER, bipo_loss, bipo_metrics, sample_direction
from .outputs import resume_checkpoint, staged_folder
from .prefix_cache import PrefixCache
from .prefix_plan import PrefixPlan
from .sharding import check_sharding, gathered, register_with_zero3

logger = logging.getLogger(__name__)


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

    # TRL's model card reads these: the tags, the method's name and the paper to cite.
    _tag_names = ["trl", "bipo", "peft-steer", "steering-vector"]
    _name = "BiPO"
    _paper = BIPO_PAPER

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
        # Checks that need nothing loaded: nothing may reach output_dir before they pass.
        args = steer_config(args, model)
        engine = _sharding_engine(args)
        check_arguments(model, compute_metrics, peft_config, train_dataset)
        streamed = check_streamed(args, train_dataset, eval_dataset)
        processing_class = tokenizer_for(model, processing_class, args)
        train_dataset = checked(train_dataset, processing_class, "train_dataset")
        eval_dataset = checked_eval(eval_dataset, processing_class)

        model, tuner = self._steering_adapter(model, args, quantization_config, peft_config)
        # TRL casts the trainable parameters of a quantized model to bf16; the exact fp32 values are put back below.
        initial_vectors = peft_steer.get_vectors(model, self.adapter_name)
        config = tuner.peft_config[self.adapter_name]
        # The plan's cache is created once TRL has tokenized the train set (`_prepare_dataset`, from TRL's `__init__`).
        self.prefix_plan = PrefixPlan.for_adapter(model, config, args.prefix_cache, engine, streamed)

        # The reference is this model with steering disabled (`compute_ref_log_probs`), not a "ref" adapter.
        with no_ref_adapter(model, self.adapter_name):
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
        self._restore_vectors(model, tuner, initial_vectors)
        self.add_callback(SteerCallback(self))
        drop_input_grads(self)

    def _steering_adapter(
        self, model: str | nn.Module, args: SteerConfig, quantization_config: Any, peft_config: SteeringConfig | None
    ) -> tuple[PeftModel, SteeringModel]:
        """Load the model if needed and attach the steering adapter; sets ``self.adapter_name``."""
        set_seed(args.seed)  # as TRL: a random initialisation of the vector is then the same on every rank
        model = steering_peft_model(loaded_model(model, args, quantization_config), peft_config)
        tuner = peft_steer.steering_model(model)
        self.adapter_name = trained_adapter(tuner)
        return model, tuner

    def _restore_vectors(self, model: PeftModel, tuner: SteeringModel, vectors: dict[int, torch.Tensor]) -> None:
        """Put back the float32 vectors after `DPOTrainer.__init__`, and declare them to ZeRO-3.

        bf16 loses small updates (10 + 1e-2 == 10). Where DeepSpeed in bf16 casts the whole model, the vectors too,
        its optimizer keeps the float32 master copy instead.
        """
        tuner.vectors_to_float32(self.adapter_name)
        peft_steer.set_vectors(model, vectors, self.adapter_name)
        if deepspeed_zero_stage(self.accelerator) == 3:
            config = tuner.peft_config[self.adapter_name]
            _, blocks = find_block_list(model.get_base_model(), config.blocks_path)
            register_with_zero3(blocks, tuner.vectors_of(self.adapter_name))

    @property
    def steering_model(self) -> SteeringModel:
        """The steering tuner of the model being trained."""
        return peft_steer.steering_model(self.accelerator.unwrap_model(self.model))

    @property
    def _prefix_cache(self) -> PrefixCache | None:
        """The prefix cache, or ``None`` (off, or before the train set is tokenized)."""
        return self.prefix_plan.cache

    # ---- data --------------------------------------------------------------------------------------------------

    # TRL's tokenization, plus the prefix cache's size estimate and warnings that count truncated or dropped pairs.
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        count = len(dataset) if isinstance(dataset, Dataset) else None
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        self.prefix_plan.add_dataset(prepared, args, dataset_name)
        warn_about_length(prepared, count, args, dataset_name)
        return prepared

    # A data set given to `evaluate` is checked and formatted as those given to `SteerTrainer(...)` are.
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval") -> dict:
        """TRL's evaluation. A data set given here is checked and, for BiPO rows, formatted as those given to
        `SteerTrainer(...)` are; one already tokenized (TRL passes them on per name) or a name is used as it is."""
        if not isinstance(eval_dataset, str):
            eval_dataset = checked_eval(eval_dataset, self.processing_class, checked_unless_tokenized)
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # TRL writes the reference log-probs to a cache file per process, which the other ranks of a DDP run cannot read.
    def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
        """Reference log-probs of every pair, once, as two new columns of the data set, gathered on every rank."""
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

    # Blocks 0..L leave the device for the time of training when the prefix cache holds every sequence; resuming
    # skips a checkpoint cut off while being written, which Trainer would pick and fail on.
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`; ``resume_from_checkpoint=True`` takes the last complete checkpoint of ``output_dir``
        (logged). Blocks 0..L leave the device meanwhile when the prefix cache holds every sequence."""
        resume = resume_checkpoint(resume_from_checkpoint, self.args.output_dir)
        with self.prefix_plan.offloaded_blocks(self.args, self._fill_prefix_cache):
            try:
                return super().train(resume, *args, **kwargs)
            except BaseException:
                close_progress_bars(self)  # so that the error starts a line of its own
                raise

    def _fill_prefix_cache(self) -> None:
        evaluated = self.eval_dataset.values() if isinstance(self.eval_dataset, dict) else [self.eval_dataset]
        self.prefix_plan.fill(
            self.accelerator.unwrap_model(self.model),
            [self.train_dataset, *evaluated],
            self.args.per_device_train_batch_size,
            self.data_collator,
            self.accelerator.device,
            self.accelerator.autocast,
        )

    def directions(self, training: bool = True) -> tuple[float, ...]:
        """The directions of the current step: one for "random" / "positive", both for "antithetic" and evaluation."""
        if not training or self.args.direction_sampling == "antithetic":
            return (1.0, -1.0)
        if self.args.direction_sampling == "positive":
            return (1.0,)
        return (sample_direction(self.args.seed, self.state.global_step),)

    # The official BiPO runs stop a longer cosine schedule early: it lasts `schedule_epochs` when that is set.
    def create_scheduler(self, num_training_steps: int, optimizer: Any = None) -> Any:
        if self.args.schedule_epochs is not None:
            num_training_steps = self.args.schedule_steps(update_steps_per_epoch(self), num_training_steps)
        return super().create_scheduler(num_training_steps, optimizer)

    # DPOTrainer's loss is DPO's: the BiPO loss instead, with its metrics queued for TRL's log.
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        loss, metrics = self.bipo_loss(model, inputs, self.directions(training=mode == "train"))
        record_metrics(self, mode, metrics)
        return (loss, None) if return_outputs else loss

    # The BiPO loss only: there are no logits to return (the fused LM head never builds them).
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = prepare_inputs(self, inputs)
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
        reference = ref_chosen.to(device, torch.float32), ref_rejected.to(device, torch.float32)
        result = bipo_loss(logps[:, 0], logps[:, 1], *reference, sign, self.beta)
        return result.loss, bipo_metrics(result, logps[:, 0], logps[:, 1], directions, self.accelerator.gather)

    # The reference is the trained model with its steering adapter disabled, not TRL's "ref" adapter or copy.
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
        with torch.no_grad(), peft_model.disable_adapter(), eval_mode(model), self.accelerator.autocast():
            with capture:  # the reference pass sees the unsteered prefix: keep it
                logps = completion_logps(model, peft_model, inputs)
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
            return completion_logps(model, peft_model, batch)

    @contextmanager
    def _prompt_boundaries(self, peft_model: nn.Module, completion_mask: torch.Tensor) -> Iterator[None]:
        # positions="completion" steers from the last prompt token on; the collator pads on the right, so each row's
        # prompt ends where its completion mask first turns on.
        if self.steering_model.peft_config[self.adapter_name].positions != "completion":
            yield
            return
        with peft_steer.prompt_lengths(peft_model, completion_mask.argmax(dim=1)):
            yield

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
                with staged_folder(path) as staging:  # a save cut short leaves no epoch folder
                    peft_model.save_pretrained(staging, selected_adapters=[self.adapter_name], state_dict=state_dict)
        return path

    # Checkpoints (`_internal_call`) are Trainer's, written in place (resuming skips one cut short); the final adapter
    # appears whole or not at all.
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if _internal_call:
            return super().save_model(output_dir, _internal_call)
        with staged_folder(output_dir or self.args.output_dir, writer=self.args.should_save) as staging:
            super().save_model(staging, _internal_call)

    # TRL rewrites output_dir/README.md (at each checkpoint, and in push_to_hub) as a transformers model's card whose
    # quick start is `pipeline(...)`: make it the steering adapter's card (library_name peft, base_model, the quick
    # start loading this repository with PeftModel), keeping TRL's metadata and training section.
    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        super().create_model_card(*args, **kwargs)
        if self.is_world_process_zero():
            config = self.steering_model.peft_config[self.adapter_name]
            write_model_card(self.args.output_dir, config, repo_id=self.hub_model_id or self.args.hub_model_id)


def _sharding_engine(args: SteerConfig) -> str | None:
    """The engine that shards the run (FSDP1 refused); under one, the reference runs inside each step."""
    engine = check_sharding(args)
    if engine is not None and args.precompute_ref_log_probs:
        # Before `train()` the model is neither on the devices nor sharded (FSDP keeps it on the CPU; ZeRO-3 would
        # need a second, inference engine): the reference pass runs inside each step instead.
        logger.warning("%s: precompute_ref_log_probs turned off; the reference runs at every step.", engine)
        args.precompute_ref_log_probs = False
    return engine
