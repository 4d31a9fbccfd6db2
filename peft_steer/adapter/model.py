"""`SteeringModel`: the PEFT tuner that attaches steering vectors to the decoder blocks of any architecture."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ._peft_compat import VECTORS, drop_peft_config, first_column, own_peft_config
from .blocks import find_block_list
from .config import SteeringConfig
from .context import generate_with_prompt_ends, record_first_column, strength
from .layer import CHILD, SteeringLayer
from .merge import fold_into_biases
from .resolve import check_vector, resolve_config

__all__ = ["SteeringModel", "check_vector", "resolve_config"]  # the checks stay importable from here


class SteeringModel(BaseTuner):
    """Adds one learned vector per chosen decoder block to that block's output (BiPO / CAA steering).

    Created by ``get_peft_model(model, SteeringConfig(...))`` once ``peft_steer`` is imported. The model may be a
    transformers model or a LoRA ``PeftModel``: then the steering sits on top of the LoRA, and disabling or
    deleting steering leaves the LoRA alone.

    State: ``steering_vectors[adapter][str(block)]`` holds the fp32 vectors; ``multipliers[adapter]`` the stored
    strength (a float, or a tensor with one value per batch row). ``steering()`` and ``prompt_lengths()`` blocks live
    in the caller's context (`context`), never here: concurrent threads and asyncio tasks each see their own.
    """

    prefix: str = "steering_"
    tuner_layer_cls = SteeringLayer
    target_module_mapping: dict[str, list[str]] = {}  # blocks are found per model, not by module names

    def __init__(
        self,
        model: nn.Module,
        peft_config: SteeringConfig | dict[str, SteeringConfig],
        adapter_name: str,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        if isinstance(model, PeftModel):
            # Steer the transformers model inside a LoRA PeftModel: its LoRA layers stay in place and active.
            model = model.get_base_model()
        if any(isinstance(module, SteeringLayer) for module in model.modules()):
            raise ValueError(
                "This model already has steering adapters; add another with "
                "model.add_adapter(name, SteeringConfig(...))."
            )
        with own_peft_config(model):
            super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage, state_dict)

    # ---- injection ---------------------------------------------------------------------------------------------

    def _pre_injection_hook(self, model: nn.Module, config: SteeringConfig, adapter_name: str) -> None:
        if VECTORS not in self._modules:
            self.steering_vectors = nn.ModuleDict()
            self.multipliers: dict[str, float | torch.Tensor] = {}

    def _post_injection_hook(self, model: nn.Module, config: SteeringConfig, adapter_name: str) -> None:
        # Registered only once injection succeeded: a bad config must leave the user's model untouched.
        self._columns_hook = model.register_forward_pre_hook(self._record_columns, with_kwargs=True)

    def _prepare_adapter_config(self, config: SteeringConfig, model_config: dict) -> SteeringConfig:
        return resolve_config(self.model, config)

    def _check_target_module_exists(self, config: SteeringConfig, key: str) -> bool:
        return key in config.target_modules

    def _create_and_replace(
        self,
        config: SteeringConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        index = int(target_name)
        device = next(target.parameters()).device
        if config.init_vectors and index in config.init_vectors:
            vector = config.init_vectors[index].detach().to(device, torch.float32).clone()
        elif config.init == "random":
            vector = torch.randn(config.hidden_size, device=device) / math.sqrt(config.hidden_size)
        else:
            vector = torch.zeros(config.hidden_size, device=device)
        if adapter_name not in self.steering_vectors:
            self.steering_vectors[adapter_name] = nn.ParameterDict()
        self.steering_vectors[adapter_name][str(index)] = nn.Parameter(vector)
        self.multipliers.setdefault(adapter_name, config.multiplier)
        if not isinstance(getattr(target, CHILD, None), SteeringLayer):
            layer = SteeringLayer(target, index, self)
            layer.set_adapter(self.active_adapters)
            target.add_module(CHILD, layer)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for parameter in model.parameters():
            parameter.requires_grad = False
        self._set_vector_grads(self.active_adapters, trainable=True)

    def _set_vector_grads(self, adapter_names: Sequence[str], trainable: bool) -> None:
        for name, vectors in self.steering_vectors.items():
            wanted = trainable and name in adapter_names and not self.peft_config[name].inference_mode
            for vector in vectors.values():
                vector.requires_grad_(wanted)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT casts adapter weights here; steering vectors stay float32 instead.
        self.vectors_to_float32(adapter_name)

    def vectors_to_float32(self, adapter_name: str) -> None:
        """Make the vectors of ``adapter_name`` float32 again, whatever cast them (a trainer on a bf16 / quantized
        model): bf16 loses small updates (10 + 1e-2 == 10)."""
        vectors = self.steering_vectors[adapter_name] if adapter_name in self.steering_vectors else {}
        for key, vector in list(vectors.items()):
            if vector.dtype != torch.float32:
                vectors[key] = nn.Parameter(vector.detach().float(), requires_grad=vector.requires_grad)

    # ---- the layers of this tuner only (a LoRA underneath has its own) -----------------------------------------

    def steering_layers(self) -> list[SteeringLayer]:
        return [module for module in self.model.modules() if isinstance(module, SteeringLayer)]

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        for layer in self.steering_layers():
            layer.enable_adapters(enabled)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Activate one adapter, or several at once (a list): their vectors are summed."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        self.check_adapter_names(names)
        for layer in self.steering_layers():
            layer.set_adapter(names)
        self.active_adapter = adapter_name
        for name in names:
            self.peft_config[name].inference_mode = inference_mode
        self._set_vector_grads(names, trainable=True)

    def delete_adapter(self, adapter_name: str) -> None:
        self.check_adapter_names([adapter_name])
        if len(self.peft_config) == 1:
            # A PeftModel (of any adapter type) looks up its active adapter's config in every forward and save.
            raise ValueError(
                f"delete_adapter({adapter_name!r}) would remove the last steering adapter, and a PeftModel cannot run "
                "without one. Use model.unload() for the model without steering, model.disable_adapter() to run it "
                "unsteered for a while, or add another adapter first: model.add_adapter(name, SteeringConfig(...))."
            )
        del self.peft_config[adapter_name]
        del self.steering_vectors[adapter_name]
        self.multipliers.pop(adapter_name, None)
        remaining = [name for name in self.active_adapters if name != adapter_name]
        if not remaining and self.peft_config:
            remaining = [sorted(self.peft_config)[0]]
        for layer in self.steering_layers():
            layer.set_adapter(remaining)
        self.active_adapter = remaining

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self._merge_into_biases(adapter_names)
        for block in list(self.model.modules()):
            layer = getattr(block, CHILD, None)
            if isinstance(layer, SteeringLayer):
                layer.remove()
                delattr(block, CHILD)
        self._columns_hook.remove()
        drop_peft_config(self.model, self.peft_config)
        return self.model

    def _merge_into_biases(self, adapter_names: list[str] | None) -> None:
        """Fold ``multiplier * v`` of the given (default: active) adapters into their blocks' output biases."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        deltas: dict[int, torch.Tensor] = {}
        for name in names:
            config, multiplier = self.peft_config[name], self.multiplier_of(name)
            if config.positions != "all":
                raise ValueError(
                    f"merge_and_unload(): adapter {name!r} steers positions={config.positions!r}; a bias "
                    "steers every position, so only positions='all' can be merged."
                )
            if not isinstance(multiplier, float):
                raise ValueError(f"merge_and_unload(): adapter {name!r} has a per-row multiplier; set a float first.")
            for block, vector in self.vectors_of(name).items():
                delta = multiplier * vector.detach()
                deltas[int(block)] = deltas[int(block)] + delta if int(block) in deltas else delta
        blocks_path, _ = find_block_list(self.model, self.peft_config[names[0]].blocks_path) if names else ("", None)
        fold_into_biases(self.model, blocks_path, deltas)

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        raise NotImplementedError("A steering vector is not merged in place; keep the adapter attached.")

    # ---- save / load -------------------------------------------------------------------------------------------

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: SteeringConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        # Only this tuner's own vectors: never the weights of a LoRA in the same tree.
        prefix = f"{_tuner_path(model)}{VECTORS}.{adapter_name}."
        return {key: value for key, value in state_dict.items() if key.startswith(prefix)}

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SteeringConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefix = f"{_tuner_path(model)}{VECTORS}.{adapter_name}."
        loaded = {int(key[len(prefix) :]): value for key, value in remapped.items() if key.startswith(prefix)}
        others = sorted(key for key in remapped if not key.startswith(prefix))
        if others:
            raise ValueError(f"The steering checkpoint holds entries that are not steering vectors: {others[:5]}.")
        if sorted(loaded) != sorted(config.layers):
            raise ValueError(
                f"The steering checkpoint has vectors for blocks {sorted(loaded)}, but its adapter_config.json "
                f"lists layers {sorted(config.layers)}."
            )
        for block, vector in loaded.items():
            check_vector(vector, block, config.hidden_size, "Loading the steering checkpoint")
        return remapped

    # ---- the vectors -------------------------------------------------------------------------------------------

    def check_adapter_names(self, names: Sequence[str]) -> None:
        """Raise a ValueError naming the adapters that do not exist among ``names``."""
        missing = [name for name in names if name not in self.peft_config or name not in self.steering_vectors]
        if missing:
            listed = repr(missing[0]) if len(missing) == 1 else str(missing)
            raise ValueError(f"No steering adapter named {listed}; the adapters are {sorted(self.peft_config)}.")

    def multiplier_of(self, adapter_name: str) -> float | torch.Tensor:
        """The strength of ``adapter_name`` for the caller: its innermost ``steering()`` block, else the stored one."""
        value = strength(self, adapter_name)
        return self.multipliers[adapter_name] if value is None else value

    def vectors_of(self, adapter_name: str) -> nn.ParameterDict:
        """The ``{str(block): vector}`` parameters of ``adapter_name``."""
        self.check_adapter_names([adapter_name])
        return self.steering_vectors[adapter_name]

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Vector arithmetic: a new adapter whose vector at each block is ``sum_i weights[i] * v_i``.

        The weights multiply the adapters' raw vectors (their multipliers are not applied); a block that one adapter
        does not steer counts as a zero vector there. The new adapter is added inactive, like LoRA's.
        """
        if len(adapters) != len(weights) or not adapters:
            raise ValueError(f"add_weighted_adapter needs one weight per adapter, got {adapters} and {weights}.")
        if adapter_name in self.peft_config:
            raise ValueError(f"An adapter named {adapter_name!r} already exists; choose another adapter_name.")
        sources = [self.vectors_of(name) for name in adapters]
        positions = {self.peft_config[name].positions for name in adapters}
        if len(positions) > 1:
            raise ValueError(f"add_weighted_adapter cannot combine adapters with different positions: {positions}.")
        blocks = sorted({int(block) for vectors in sources for block in vectors})
        combined = {}
        for block in blocks:
            total = torch.zeros_like(next(iter(sources[0].values())).detach())
            for weight, vectors in zip(weights, sources):
                if str(block) in vectors:
                    total = total + weight * vectors[str(block)].detach().to(total.device)
            check_vector(total, block, self.peft_config[adapters[0]].hidden_size, "add_weighted_adapter")
            combined[block] = total
        config = copy.deepcopy(self.peft_config[adapters[0]])
        config.layers, config.multiplier, config.init, config.init_vectors = blocks, 1.0, "zeros", combined
        config.target_modules = None
        self.peft_config[adapter_name] = config
        self.inject_adapter(self.model, adapter_name)

    # ---- positions: where each prompt ends (kept by the caller's context, `context`) --------------------------------

    def _record_columns(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # Only positions='completion' needs to know where in the padded sequence this call's tokens stand.
        if any(config.positions == "completion" for config in self.peft_config.values()):
            record_first_column(self, first_column(args, kwargs))

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate`` (which PeftModel.generate calls) told where each row's prompt ends."""
        return generate_with_prompt_ends(self, self.model.generate, *args, **kwargs)


def _tuner_path(model: nn.Module) -> str:
    """State-dict prefix of the SteeringModel inside ``model`` ('base_model.' in a PeftModel)."""
    for name, module in model.named_modules():
        if isinstance(module, SteeringModel):
            return f"{name}." if name else ""
    raise ValueError("No steering adapter found in this model.")
