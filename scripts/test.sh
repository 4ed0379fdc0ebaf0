#!/usr/bin/env bash
# The README's test command: set up the venvs (idempotent), then run the whole test suite.
# .venv (llamafactory 0.9.5) runs pytest; .venv-swift, .venv-lf094 and .venv-trl run the real
# `swift` CLI, llamafactory 0.9.4 and the newest TRL (see scripts/setup.sh for why each is apart).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh | tail -n 1)
for env in swift lf094 trl; do bash scripts/setup.sh "$env" >/dev/null; done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
