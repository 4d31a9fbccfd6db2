"""Preference data: the shipped behavior sets, local files and TRL formats, checked and formatted for BiPO.

``files`` reads rows with where they came from, ``shipped`` holds the paper's data sets, ``formats`` renders questions
and answers (plain or chat template), ``preference`` turns any source into checked prompt / chosen / rejected rows.
Nothing here imports TRL: data flows from ``peft_steer`` to ``trl_integration``, never back.
"""

from .batches import pad_id_of, right_padded
from .files import FILE_TYPES, DataError, read_file
from .formats import SYSTEM_PROMPT, PairFormatter, plain_prompt
from .preference import BIPO_COLUMNS, check_preference_dataset, load_behavior, load_preference_data
from .shipped import (
    BEHAVIORS,
    DATA_DIR,
    SPLITS,
    behavior_path,
    neutral_questions,
    prompting_pair,
    read_behavior_rows,
)

__all__ = [
    "BEHAVIORS",
    "BIPO_COLUMNS",
    "DATA_DIR",
    "FILE_TYPES",
    "SPLITS",
    "SYSTEM_PROMPT",
    "DataError",
    "PairFormatter",
    "behavior_path",
    "check_preference_dataset",
    "load_behavior",
    "load_preference_data",
    "neutral_questions",
    "pad_id_of",
    "plain_prompt",
    "prompting_pair",
    "read_behavior_rows",
    "read_file",
    "right_padded",
]
