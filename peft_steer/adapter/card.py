"""The steering section of an adapter's model card (README.md), written next to adapter_config.json."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import SteeringConfig

BEGIN = "<!-- peft-steer:begin -->"
END = "<!-- peft-steer:end -->"


def model_card_section(config: SteeringConfig) -> str:
    """The markdown that describes a steering adapter: method, base model, blocks, size and sign convention."""
    blocks = ", ".join(str(i) for i in config.layers)
    return f"""{BEGIN}
## Steering vector (peft-steer)

- **Method:** a steering vector added to the residual stream, trained with BiPO (bi-directional preference
  optimization, Cao et al., NeurIPS 2024, arXiv:2406.00045) unless stated otherwise.
- **Base model:** `{config.base_model_name_or_path}`
- **Decoder blocks steered (0-indexed, output of the block):** {blocks} of {config.num_blocks}
- **Hidden size:** {config.hidden_size}
- **Positions:** `{config.positions}`; default multiplier {config.multiplier:g}
- **Sign convention:** the vector `v` of a block is added as `m * v` to that block's output. A positive multiplier
  `m` moves the model towards the behavior the vector was trained to prefer (the chosen answers of its preference
  data), a negative one away from it; `|m|` is the strength.

```python
import peft_steer  # registers the STEERING adapter type with PEFT: import it before loading
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/or/repo-of-this-adapter")
with peft_steer.steering(model, multiplier=-1.0):  # the opposite direction
    model.generate(**inputs)
```
{END}
"""


def write_model_card(directory: str, config: SteeringConfig) -> None:
    """Put the steering section into ``directory/README.md``, replacing an earlier one, keeping the rest."""
    path = os.path.join(directory, "README.md")
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as file:
            text = file.read()
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        text = head.rstrip("\n") + "\n\n" + model_card_section(config) + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + model_card_section(config)
    with open(path, "w", encoding="utf-8") as file:
        file.write(text)
