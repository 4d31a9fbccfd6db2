"""Steering vectors to and from other tools, with no model loaded: adapter folders, official BiPO files, GGUF.

``adapter_files`` reads (`read_adapter`, the one checked reader of every command) and writes steering adapter folders;
``official`` imports the vectors of the official BiPO release; ``gguf`` converts to and from llama.cpp control
vectors, and ``cvec`` sets such files on a running llama-cpp-python model (imported by its path: it needs
llama-cpp-python); ``repeng_import`` imports repeng, whose control vectors are such files, under NumPy 2. Folding a
vector into a checkpoint's biases is ``merge_and_unload()`` of the adapter (``peft_steer/adapter/merge.py``).
"""

from .adapter_files import (
    CONFIG_NAME,
    LEGACY_WEIGHTS_NAME,
    WEIGHTS_NAME,
    adapter_digest,
    base_structure,
    read_adapter,
    read_adapter_for,
    write_adapter,
)
from .gguf import GGUF_ARCH, export_gguf, import_gguf, read_gguf
from .official import OFFICIAL_NAME, OfficialVector, import_official, load_official_vector

__all__ = [
    "CONFIG_NAME",
    "GGUF_ARCH",
    "LEGACY_WEIGHTS_NAME",
    "OFFICIAL_NAME",
    "WEIGHTS_NAME",
    "OfficialVector",
    "adapter_digest",
    "base_structure",
    "export_gguf",
    "import_gguf",
    "import_official",
    "load_official_vector",
    "read_adapter",
    "read_adapter_for",
    "read_gguf",
    "write_adapter",
]
