"""`PrefixPlan`: the prefix cache of one trainer, from the decision to use it to blocks 0..L leaving the device.

- Whether it applies: off when asked, under a sharding engine, or where blocks 0..L are not deterministic
  (`fallback_reason`); the reason is logged.
- Its size and storage: estimated once the train set is tokenized, and again for each evaluation set (evaluation
  fills the cache too), while the cache is still empty.
- Blocks 0..L leaving the device for the time of `train()` (`SteerConfig.offload_prefix_blocks`), once the cache holds
  every sequence: the trainer then never runs them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel
from torch import nn
from torch.utils.data import DataLoader

from peft_steer import SteeringConfig
from peft_steer.evaluate.scoring import eval_mode

from ._runtime import free_host_memory
from .config import SteerConfig
from .prefix_cache import PrefixCache, choose_storage, estimate_bytes, fallback_reason
from .prefix_offload import OffloadedBlocks, OffloadWriteError, destination_for, offload_blocker

logger = logging.getLogger(__name__)


class PrefixPlan:
    """The prefix cache of a trainer (`cache`, ``None`` while off or not created yet) and its lifecycle.

    Args:
        inner_model: The transformers model under the steering adapter.
        block: L, the first steered block: the cache holds the output of blocks 0..L.
        hidden_size: The model's hidden size (for the size estimate).
        off_reason: Why the cache is off, or ``None`` to use it.
    """

    def __init__(self, inner_model: nn.Module, block: int, hidden_size: int, off_reason: str | None) -> None:
        self.inner_model = inner_model
        self.block = block
        self.hidden_size = hidden_size
        self.off_reason = off_reason
        self.cache: PrefixCache | None = None
        self.train_size: int | None = None  # bytes of the train set's sequences; None until it is prepared
        self.eval_sizes: dict[str, int] = {}  # per evaluation set name

    @classmethod
    def for_adapter(
        cls, peft_model: PeftModel, config: SteeringConfig, requested: str, engine: str | None, streamed: bool = False
    ) -> PrefixPlan:
        """The plan for the steering adapter ``config`` of ``peft_model``, given `SteerConfig.prefix_cache`, the
        sharding engine of the run and whether a data set is streamed."""
        inner_model, block = peft_model.get_base_model(), min(config.layers)
        if requested == "off":
            reason: str | None = "prefix_cache='off'"
        elif engine is not None:
            reason = f"replaying blocks 0..L under {engine} is not verified"
        elif streamed:
            reason = "a data set is streamed: its size is unknown, and the cache would keep every sequence read"
        else:
            reason = fallback_reason(inner_model, block)
        return cls(inner_model, block, config.hidden_size, reason)

    # ---- size and storage ----------------------------------------------------------------------------------------

    def add_dataset(self, prepared: Any, args: SteerConfig, dataset_name: str) -> None:
        """Count a tokenized data set: the first one is the train set (TRL prepares it first; an eval set may be
        named "train"), which creates the cache; an evaluation set adds to its size."""
        if self.train_size is None:
            self._create(prepared, args)
        elif self.cache is not None:
            self._resize(prepared, args, dataset_name)

    def _create(self, prepared: Any, args: SteerConfig) -> None:
        if self.off_reason is not None:
            self.train_size = 0
            # A note where the cache was left to 'auto' (or turned off); a warning where a storage was asked for.
            log = logger.info if args.prefix_cache in ("auto", "off") else logger.warning
            log("Prefix cache off: %s. Every step runs the whole model.", self.off_reason)
            return
        self.train_size = size = self._bytes(prepared)
        storage = choose_storage(args.prefix_cache, size, args.device)
        logger.info(
            "Prefix cache: the output of blocks 0..%d for every training sequence, about %.1f MiB (%s), kept on %s.",
            self.block, size / 2**20, self._dtype(), storage,
        )  # fmt: skip
        self.cache = PrefixCache(self.inner_model, self.block, storage, args.prefix_cache_dir)

    def _resize(self, prepared: Any, args: SteerConfig, dataset_name: str) -> None:
        """Count an evaluation set once per name (`evaluate` prepares its set again), and choose the storage again
        for the total while the cache is still empty."""
        self.eval_sizes[dataset_name] = size = self._bytes(prepared)
        total = self.train_size + sum(self.eval_sizes.values())
        cache = self.cache
        storage = choose_storage(args.prefix_cache, total, args.device) if not cache.entries else cache.storage
        logger.info(
            "Prefix cache: the %s dataset adds about %.1f MiB, %.1f MiB in all, kept on %s.",
            dataset_name, size / 2**20, total / 2**20, storage,
        )  # fmt: skip
        if storage != cache.storage:
            cache.close()
            self.cache = PrefixCache(self.inner_model, self.block, storage, args.prefix_cache_dir)

    def _dtype(self) -> torch.dtype:
        dtype = next(self.inner_model.parameters()).dtype
        return dtype if dtype.is_floating_point else torch.float32

    def _bytes(self, prepared: Any) -> int:
        """The cache's bytes for every sequence of a prepared data set: each pair's prompt + chosen and prompt +
        rejected (0 for a streamed set, whose size is unknown)."""
        if not (isinstance(prepared, Dataset) and "prompt_ids" in prepared.column_names):
            return 0
        prompts = sum(len(ids) for ids in prepared["prompt_ids"])
        answers = sum(len(ids) for ids in prepared["chosen_ids"]) + sum(len(ids) for ids in prepared["rejected_ids"])
        return estimate_bytes(2 * prompts + answers, self.hidden_size, self._dtype())

    # ---- filling -------------------------------------------------------------------------------------------------

    def fill(
        self,
        peft_model: PeftModel,
        datasets: Iterable[Any],
        batch_size: int,
        collate_fn: Callable,
        device: torch.device,
        autocast: Callable[[], AbstractContextManager],
    ) -> None:
        """Cache every sequence of ``datasets`` not cached yet, running blocks 0..L only.

        The reference pass saw every sequence in one process; under data parallelism it saw this rank's share only,
        and the sampler deals it the other ranks' sequences too. Same settings as the reference pass (eval mode,
        autocast), so that a sequence's cached prefix does not depend on which rank computed it.
        """
        with eval_mode(peft_model), autocast():
            for dataset in datasets:
                if dataset is None:
                    continue
                for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn):
                    ids, mask = batch["input_ids"].to(device), batch["attention_mask"]
                    self.cache.fill(ids, mask.to(ids.device), peft_model.disable_adapter())

    # ---- blocks 0..L off the device ------------------------------------------------------------------------------

    @contextmanager
    def offloaded_blocks(self, args: SteerConfig, fill_every_sequence: Callable[[], None]) -> Iterator[None]:
        """Offload blocks 0..L for the time of the block (`SteerConfig.offload_prefix_blocks`), or log why not.
        ``fill_every_sequence`` completes the cache first (`fill` with the trainer's data sets)."""
        requested = args.offload_prefix_blocks
        device = next(self.inner_model.parameters()).device
        destination = destination_for(requested, device)
        offloaded, reason = self._offloader(args, destination)
        write_failed = False  # a file that could not be written is worth a warning even under 'auto'
        if offloaded is not None:
            fill_every_sequence()
            try:
                offloaded.offload()
            except OSError as error:
                if requested != "auto":
                    raise
                offloaded, reason, write_failed = None, str(error), isinstance(error, OffloadWriteError)
        if offloaded is None:
            if reason is not None and requested != "off":
                log = logger.warning if requested != "auto" or write_failed else logger.info
                log("Blocks 0..%d stay on %s: %s.", self.block, device, reason)
            yield
            return
        where = "host memory" if destination == "cpu" else f"a file in {args.prefix_cache_dir or 'a temp folder'}"
        logger.info(
            "Blocks 0..%d (%.1f MiB of weights) moved to %s for training: every training sequence is in the prefix "
            "cache, so no step runs them.", self.block, offloaded.nbytes / 2**20, where,
        )  # fmt: skip
        try:
            yield
        finally:
            offloaded.restore()

    def _offloader(self, args: SteerConfig, destination: str | None) -> tuple[OffloadedBlocks | None, str | None]:
        """The blocks to offload to ``destination``, or ``None`` and why they stay (``None`` when not asked)."""
        if self.cache is None:
            return None, "the prefix cache is off"
        if not args.precompute_ref_log_probs:
            return None, "precompute_ref_log_probs=False, so the prefix cache fills during training and needs them"
        if destination is None:
            return None, None if args.offload_prefix_blocks == "off" else "the model is in host memory already"
        reason = offload_blocker(self.inner_model, self.block)
        if reason is not None:
            return None, reason
        offloaded = OffloadedBlocks(
            self.inner_model, self.block, destination, lambda: self.cache.replaying, args.prefix_cache_dir
        )
        room = offload_room(offloaded)
        return (offloaded, None) if room is None else (None, room)


def offload_room(offloaded: OffloadedBlocks) -> str | None:
    """Why host memory cannot take the blocks of every process on this machine, or None."""
    if offloaded.destination != "cpu":
        return None
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    available = free_host_memory()
    if available is None:
        return None  # unknown: try
    needed = processes * offloaded.nbytes
    if needed > 0.5 * available:
        return (
            f"{processes} process(es) x {offloaded.nbytes / 2**30:.1f} GiB would take more than half of the "
            f"{available / 2**30:.1f} GiB of free host memory (offload_prefix_blocks='disk' writes them to a file)"
        )
    return None
