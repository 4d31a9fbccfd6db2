"""`SteeringModelLoader`: vLLM's usual loader, then the steering hooks on the loaded model.

Registered as load format ``peft_steer`` (`plugin.register`); the weights are loaded by the format in
``ServeConfig.load_format`` (``auto`` by default), so any model vLLM loads can be steered.
"""

from __future__ import annotations

from torch import nn

from . import config
from ._vllm_compat import BaseModelLoader, check_engine, inner_loader, model_shape
from .config import QUALNAME
from .hooks import BlockSteerer


class SteeringModelLoader(BaseModelLoader):
    def __init__(self, load_config) -> None:
        super().__init__(load_config)
        self.inner = inner_loader(load_config, config.current().load_format)

    def download_model(self, model_config) -> None:
        self.inner.download_model(model_config)

    def load_weights(self, model: nn.Module, model_config) -> None:
        self.inner.load_weights(model, model_config)

    def load_model(self, vllm_config, model_config, prefix: str = "") -> nn.Module:
        check_engine(vllm_config)
        named = model_config.logits_processors or ()
        processors = [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in named]
        if QUALNAME not in processors:
            raise ValueError(
                f"peft-steer-vllm: load_format='peft_steer' needs the logits processor {QUALNAME} (it tells the "
                "hooks which request is in which row): start the engine with peft_steer_vllm.engine_args(...) or "
                "peft-steer-vllm serve."
            )
        adapters = config.current().load()
        hidden_size, num_blocks = model_shape(vllm_config)
        for vectors in adapters.values():
            vectors.check_model(hidden_size, num_blocks)
        model = self.inner.load_model(vllm_config, model_config, prefix=prefix)
        if adapters:
            model._peft_steer = BlockSteerer(model, adapters, num_blocks)
        return model
