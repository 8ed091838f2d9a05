#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with policyopt and its test tools.
# torch is installed first and pinned, because a bare `torch` requirement lets pip choose a
# multi-GB build; set TORCH_SPEC to pick another (e.g. TORCH_SPEC="torch==2.13.0+cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --upgrade pip -q
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[test]"
python -c "import torch, transformers, policyopt; print('policyopt', policyopt.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
