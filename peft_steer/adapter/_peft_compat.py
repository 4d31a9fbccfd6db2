"""Every place peft-steer touches PEFT or transformers internals, each with why, so that a release that changes one
breaks here, in one module, with a clear error (tests/peft_steer/adapter/test_registry.py and test_generation.py
watch them).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import re
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import peft
import peft.mapping
import torch
import transformers
from peft import PeftConfig, PeftModel
from torch import nn
from transformers import Cache

__all__ = [
    "VECTORS",
    "add_card_to_push_to_hub",
    "add_peft_type",
    "block_of_saved_key",
    "data_parallel_replica",
    "drop_peft_config",
    "empty_loading_info",
    "first_column",
    "own_peft_config",
    "quiet_optional_kernel_notices",
    "route_load_adapter",
    "routes_load_adapter",
    "saved_vector_key",
    "takes_logits_mask",
    "unmark_gguf_quantization",
]

# The attribute of SteeringModel that holds the vectors (it carries the tuner prefix "steering_", as PEFT expects of
# every adapter attribute).
VECTORS = "steering_vectors"

# PEFT's type tables. `register_peft_method` only accepts members of PEFT's fixed `PeftType` enum, so a third-party
# type is added as a plain string key; `PeftType` is a `str` enum, so PEFT's lookups work with it.
_TABLES = ("PEFT_TYPE_TO_CONFIG_MAPPING", "PEFT_TYPE_TO_TUNER_MAPPING", "PEFT_TYPE_TO_PREFIX_MAPPING")


def add_peft_type(name: str, config_cls: type, tuner_cls: type, prefix: str) -> None:
    """Add ``name`` to PEFT's type tables (idempotent). Raises if PEFT's internals have changed underneath."""
    entries = dict(zip(_TABLES, (config_cls, tuner_cls, prefix)))
    for table_name, entry in entries.items():
        table = getattr(peft.mapping, table_name, None)
        if not isinstance(table, dict):
            raise RuntimeError(
                f"peft-steer cannot register its adapter type: peft.mapping.{table_name} is missing in peft "
                f"{peft.__version__}. peft-steer is tested with peft 0.21; install a version it supports."
            )
        current = table.get(name)
        if current is not None and not _same(current, entry):
            raise RuntimeError(f"Another package already registered a PEFT type named {name!r}: {current!r}.")
        table[name] = entry


def _same(registered: object, ours: object) -> bool:
    # equal, or the same class imported again (e.g. after importlib.reload)
    return registered == ours or (
        getattr(registered, "__qualname__", None) == getattr(ours, "__qualname__", "")
        and getattr(registered, "__module__", None) == getattr(ours, "__module__", "")
    )


def add_card_to_push_to_hub(card_writer: Callable[[PeftModel, str, str | None], bool]) -> None:
    """Make ``PeftModel.push_to_hub`` call ``card_writer(model, folder, repo_id)`` on the folder it uploads
    (idempotent).

    transformers' ``push_to_hub`` (which PeftModel inherits) replaces the README.md that ``save_pretrained`` wrote with
    the repository's card or a generic one; its private ``_upload_modified_files`` is the one step that sees the
    folder about to be uploaded. ``card_writer`` returns False for models it leaves alone.
    """
    push_to_hub = PeftModel.push_to_hub
    if getattr(push_to_hub, "_adds_steering_card", False):
        return

    @functools.wraps(push_to_hub)
    def wrapper(self, *args, **kwargs):
        upload = self._upload_modified_files

        def upload_with_card(working_dir, repo_id, *upload_args, **upload_kwargs):
            card_writer(self, working_dir, repo_id)
            return upload(working_dir, repo_id, *upload_args, **upload_kwargs)

        self._upload_modified_files = upload_with_card  # for this call only
        try:
            return push_to_hub(self, *args, **kwargs)
        finally:
            del self._upload_modified_files

    wrapper._adds_steering_card = True
    PeftModel.push_to_hub = wrapper


# transformers' own adapter loading: `PreTrainedModel.load_adapter`, which `AutoModelForCausalLM.from_pretrained(
# adapter_folder)` and `pipeline(..., model=adapter_folder)` call too. It injects the adapter with PEFT's
# `inject_adapter_in_model` and then loads the weights with transformers' own loader, by parameter name. That cannot
# load a steering adapter, for two reasons:
# 1. it reads `peft_config.peft_type.value`, and STEERING is a plain string (see _TABLES above): AttributeError;
# 2. with a `.value` (e.g. a member forced into PeftType's enum internals), the load runs but steers nothing: the
#    vectors live on the SteeringModel tuner, which `inject_adapter_in_model` drops, not in the transformers model's
#    module tree, so the saved keys `base_model.steering_vectors.<block>` match no parameter of the model;
#    transformers reports them as UNEXPECTED and the model runs with zero vectors.
# So `load_adapter` hands steering adapters to PEFT's own `PeftModel.from_pretrained`, which steers that same model
# object in place (every check and the saved multiplier included), and every other adapter type to transformers'
# loader, untouched. No enum internals are needed: transformers never sees a steering config.
_LOAD_ADAPTER_ARGS = (
    "peft_model_id",
    "adapter_name",
    "peft_config",
    "adapter_state_dict",
    "low_cpu_mem_usage",
    "is_trainable",
    "hotswap",
    "local_files_only",
    "adapter_kwargs",
    "load_config",
)
# The hub arguments that transformers' `DownloadKwargs` and PEFT's `from_pretrained` (hf_hub_download) share.
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
_UPGRADE = "peft-steer is tested with transformers 5.24; install a version it supports."


def route_load_adapter(claims: Callable[[object], bool], loader: Callable[..., dict]) -> None:
    """Make transformers' ``load_adapter`` call ``loader`` for configs that ``claims`` (idempotent).

    ``loader(model, model_id, adapter_name, config, is_trainable=..., low_cpu_mem_usage=..., hub_kwargs=...)``
    loads the adapter into ``model`` in place and returns the configs of the adapters it holds now. Raises if
    transformers' ``load_adapter`` has changed underneath.
    """
    mixin = _adapter_mixin()
    load_adapter = getattr(mixin, "load_adapter", None)
    if getattr(load_adapter, "_routes_steering", False):
        return
    if load_adapter is None:
        raise RuntimeError(
            "peft-steer cannot route transformers' adapter loading: PeftAdapterMixin.load_adapter is missing in "
            f"transformers {transformers.__version__}. {_UPGRADE}"
        )
    signature = inspect.signature(load_adapter)
    missing = [name for name in _LOAD_ADAPTER_ARGS if name not in signature.parameters]
    if missing:
        raise RuntimeError(
            f"peft-steer cannot route transformers' adapter loading: transformers {transformers.__version__} "
            f"PeftAdapterMixin.load_adapter has no argument {', '.join(missing)}. {_UPGRADE}"
        )
    extra = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    empty_loading_info()  # fails here, at import, if transformers' loading report has changed

    @functools.wraps(load_adapter)
    def wrapper(self, *args, **kwargs):
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        given = call.arguments
        settings = {**(vars(given["load_config"]) if given["load_config"] is not None else {}), **given.get(extra, {})}
        model_id = given["peft_model_id"] or settings.get("pretrained_model_name_or_path")
        hub_kwargs = _hub_kwargs(settings, given["local_files_only"], given["adapter_kwargs"])
        config = given["peft_config"]
        if config is None and model_id is not None:
            try:
                config = PeftConfig.from_pretrained(str(model_id), **hub_kwargs)
            except Exception:  # transformers' loader raises its own error for it, as without peft-steer
                config = None
        if not claims(config):
            return load_adapter(self, *args, **kwargs)
        if given["adapter_state_dict"] is not None or model_id is None:
            raise ValueError(
                "A steering adapter is loaded from its folder or hub repository: load_adapter(path_or_repo_id); "
                "adapter_state_dict is not supported for it."
            )
        if given["hotswap"] is True:
            raise ValueError("Hotswapping is only supported for LoRA adapters, please set `hotswap=False`.")
        configs = loader(
            self,
            str(model_id),
            given["adapter_name"] or "default",
            config,
            is_trainable=given["is_trainable"],
            low_cpu_mem_usage=given["low_cpu_mem_usage"],
            hub_kwargs=hub_kwargs,
        )
        # What transformers' own load_adapter leaves behind: the flag its adapter methods (set_adapter,
        # disable_adapters, save_pretrained...) check, and ``peft_config`` listing every adapter it loaded. That is a
        # dict of its own, not the steering tuner's (which BaseTuner shares with the model): an adapter that
        # transformers injects later (a LoRA) adds its config to the model's dict, where the tuner must not see it.
        self.peft_config = {**(self.__dict__.get("peft_config") or {}), **configs}
        self._hf_peft_config_loaded = True
        return empty_loading_info()

    wrapper._routes_steering = True
    mixin.load_adapter = wrapper


def routes_load_adapter() -> bool:
    """Whether transformers' ``load_adapter`` hands steering adapters to peft-steer (see `route_load_adapter`)."""
    return getattr(getattr(_adapter_mixin(), "load_adapter", None), "_routes_steering", False)


def _adapter_mixin() -> type:
    # The class that gives every transformers model its load_adapter; PreTrainedModel inherits it.
    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError as error:
        raise RuntimeError(
            f"peft-steer cannot find transformers.integrations.peft.PeftAdapterMixin in transformers "
            f"{transformers.__version__}. {_UPGRADE}"
        ) from error
    return PeftAdapterMixin


def _hub_kwargs(settings: dict, local_files_only: bool, adapter_kwargs: dict | None) -> dict:
    # As transformers' load_adapter computes them: the load config's download arguments, then local_files_only, then
    # adapter_kwargs, which win. Only the hub arguments go on to PEFT (its from_pretrained passes them to the hub).
    download = dict(settings.get("download_kwargs") or {})
    if local_files_only:
        download["local_files_only"] = True
    download.update(adapter_kwargs or {})
    return {key: value for key, value in download.items() if key in _HUB_KWARGS and value not in (None, "")}


def empty_loading_info() -> object:
    """transformers' ``LoadStateDictInfo`` with nothing missing, unexpected or mismatched: what ``load_adapter``
    returns (``from_pretrained(..., output_loading_info=True)`` reports it) once PEFT has loaded every vector."""
    try:
        from transformers.utils.loading_report import LoadStateDictInfo

        values = {}
        for field in dataclasses.fields(LoadStateDictInfo):
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                values[field.name] = _empty(field.type)
        return LoadStateDictInfo(**values)
    except (ImportError, KeyError, TypeError) as error:
        raise RuntimeError(
            "peft-steer cannot build the result of transformers' load_adapter: transformers.utils.loading_report."
            f"LoadStateDictInfo has changed in transformers {transformers.__version__}. {_UPGRADE}"
        ) from error


def _empty(annotation: object) -> object:
    # An empty value of a field typed ``set[...]``, ``list[...]`` or ``dict[...]`` (a string where the module uses
    # ``from __future__ import annotations``); a KeyError for any other type.
    if isinstance(annotation, str):
        name = annotation
    else:
        name = getattr(typing.get_origin(annotation) or annotation, "__name__", "")
    return {"set": set, "list": list, "dict": dict}[name.split("[")[0]]()


@contextmanager
def own_peft_config(model: nn.Module) -> Iterator[None]:
    """Hide a LoRA's ``peft_config`` on ``model`` while a steering tuner is created around it.

    `BaseTuner.__init__` looks up ``peft_config`` through the wrapped model; a LoRA underneath keeps its own configs
    there, which BaseTuner would otherwise extend and then overwrite with the steering ones.
    """
    lora_configs = model.__dict__.pop("peft_config", None)
    try:
        yield
    finally:
        if lora_configs is not None:
            model.peft_config = lora_configs


def drop_peft_config(model: nn.Module, configs: dict) -> None:
    """Remove the ``peft_config`` that `BaseTuner` set on the wrapped model, if it is ``configs`` (unload)."""
    if model.__dict__.get("peft_config") is configs:
        del model.peft_config


_SAVED_KEY = re.compile(rf"base_model\.{VECTORS}\.(0|[1-9][0-9]*)", re.ASCII)


def saved_vector_key(block: int) -> str:
    """The key of block ``block``'s vector in PEFT's saved ``adapter_model.safetensors`` (adapter name removed)."""
    return f"base_model.{VECTORS}.{block}"


def block_of_saved_key(key: str) -> int | None:
    """The block of a saved vector key (exactly as `saved_vector_key` writes it), or None for any other key.

    Strict, because PEFT loads only that exact key: ``.02`` (a second key for block 2) or ``.²`` (a digit to
    ``str.isdigit`` that ``int`` refuses) name no vector it would load.
    """
    match = _SAVED_KEY.fullmatch(key)
    return int(match.group(1)) if match else None


def first_column(args: tuple, kwargs: dict) -> int:
    """Column, in the whole (padded) sequence, of the first token that a forward call with these inputs processes.

    0 for a full forward; the number of cached tokens for a KV-cached generation step. Read from public inputs only,
    never from how ``generate`` names or fills them (transformers 5.24 renamed ``past_key_values`` to ``cache`` and
    stopped passing an all-ones attention mask): a 2-D attention mask covers the cached and the new tokens; without
    one, a ``Cache`` passed under any keyword holds the tokens before this call; with neither, the call sees the
    whole sequence.
    """
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    mask = kwargs.get("attention_mask")
    if tokens is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.shape[1] - tokens.shape[1]
    cache = next((value for value in kwargs.values() if isinstance(value, Cache)), None)
    return int(cache.get_seq_length()) if cache is not None else 0


def data_parallel_replica(module: nn.Module, **carried: object) -> nn.Module:
    """The copy of ``module`` that nn.DataParallel runs on one device, with ``carried`` set on it as attributes.

    nn.DataParallel (which the transformers Trainer uses on several GPUs without a launcher) copies every module with
    torch's private ``Module._replicate_for_data_parallel``, in the caller's thread, then runs each copy in a new
    thread, whose context is empty: a module that overrides that method with this one hands the copy what the
    caller's context holds.
    """
    replica = nn.Module._replicate_for_data_parallel(module)
    for name, value in carried.items():
        setattr(replica, name, value)
    return replica


def unmark_gguf_quantization(model: nn.Module) -> nn.Module:
    """``model``, if transformers loaded it from a GGUF file, marked as the plain float model it is.

    transformers dequantizes GGUF weights to float on load but keeps the model marked quantized (``is_quantized``,
    ``hf_quantizer``, ``config.quantization_config``), and its ``dequantize()`` is not implemented for GGUF. The marks
    make ``save_pretrained`` and Trainer treat the float weights as quantized ones; nothing else depends on them.
    """
    if getattr(model, "quantization_method", None) != transformers.utils.quantization_config.QuantizationMethod.GGUF:
        return model
    model.is_quantized = False
    model.hf_quantizer = None
    model.quantization_method = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def takes_logits_mask(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes a boolean ``logits_to_keep`` mask and runs the LM head on its positions only.

    transformers' causal LMs built on ``slice_logits_to_keep`` (all eight architectures peft-steer is tested on, and
    most others of transformers 5) do, the soft-capping and logit scale applied after as usual; the check reads which
    function the model's own module uses, which transformers does not publish.
    """
    import transformers.modeling_utils as modeling_utils

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    slicer = getattr(inspect.getmodule(type(base)), "slice_logits_to_keep", None)
    masks = slicer is not None and slicer is getattr(modeling_utils, "slice_logits_to_keep", None)
    return masks and "logits_to_keep" in inspect.signature(type(base).forward).parameters


# bitsandbytes, which PEFT's LoRA layers and transformers' 4-bit / 8-bit loading import, tries at its import on CPUs
# with AVX512-BF16 (bitsandbytes 0.50, `backends/cpu/ops.py`) to fetch an optional faster kernel from the hub
# repository below through the `kernels` package, and logs why it could not: online, "could not verify publisher
# trust status" (kernels refuses an unlisted publisher); offline, kernels' own "Skipping publisher trust check" and then
# "not available in the local cache". bitsandbytes then uses its own kernel: nothing is wrong, and the user asked for
# none of it. Only these messages about this repository are dropped; any other failure, and every other message, passes.
_OPTIONAL_KERNEL = "kernels-community/quantization-bitsandbytes"
_DROPPED = {
    "bitsandbytes.backends.cpu.ops": (
        "Failed to load CPU gemm_4bit_forward from kernels-community: ",
        (f"'{_OPTIONAL_KERNEL}' could not verify publisher trust status", "is not available in the local cache"),
    ),
    "kernels._internals.hf_hub": (f"Skipping publisher trust check for '{_OPTIONAL_KERNEL}'", ("",)),
}


class _OptionalKernelNotice(logging.Filter):
    """Drops a logger's notices about bitsandbytes' optional CPU kernel (`_DROPPED`)."""

    def __init__(self, start: str, causes: tuple[str, ...]) -> None:
        super().__init__()
        self.start, self.causes = start, causes

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        dropped = message.startswith(self.start) and _OPTIONAL_KERNEL in message
        return not (dropped and any(cause in message for cause in self.causes))


def quiet_optional_kernel_notices() -> None:
    """Keep bitsandbytes' notices about its optional hub kernel off the user's screen (idempotent). Takes effect for
    a bitsandbytes imported after ``import peft_steer``, as PEFT and transformers import it."""
    for name, (start, causes) in _DROPPED.items():
        logger = logging.getLogger(name)
        if not any(type(existing).__name__ == _OptionalKernelNotice.__name__ for existing in logger.filters):
            logger.addFilter(_OptionalKernelNotice(start, causes))
