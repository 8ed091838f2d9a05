#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with policyopt and its test tools.
# torch is installed first and pinned, because a bare `torch` requirement lets pip choose a
# multi-GB build; set TORCH_SPEC to pick another (e.g. TORCH_SPEC="torch==2.13.0+cu128").
set -euo pipefail
cd "$(dirname "$0")/.."
# The built-in code reward runs model-written programs under bubblewrap (bwrap) and refuses to run
# without it; install it where we can (root with apt-get: CI, containers), else say how.
if ! command -v bwrap >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing bubblewrap (the code reward's sandbox)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null \
      || echo "warning: could not install bubblewrap; the code reward will refuse to run" >&2
  else
    echo "note: bwrap not found: the code reward will refuse to run until Debian's bubblewrap package" \
         "is installed (sudo apt-get install bubblewrap)" >&2
  fi
fi
PYTHON="${PYTHON:-python3}"
"$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --upgrade pip -q
pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[test]"
python -c "import torch, transformers, policyopt; print('policyopt', policyopt.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
