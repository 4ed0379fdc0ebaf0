#!/usr/bin/env bash
# The README's test command: set up the venvs (idempotent), then run the test suite (what CI runs).
#   bash scripts/test.sh [--fast] [pytest args]
#     --fast   only the tests without the e2e / dist marks: no framework CLI, trainer or process group (docs/testing.md)
# .venv (llamafactory 0.9.5) runs pytest; .venv-swift, .venv-lf094 and .venv-trl run the real `swift` CLI,
# llamafactory 0.9.4 and the newest TRL (see scripts/setup.sh for why each is apart).
set -euo pipefail
cd "$(dirname "$0")/.."
LANE=()
if [ "${1:-}" = "--fast" ]; then
  shift
  LANE=(-m "not e2e and not dist")
fi
VENV=$(bash scripts/setup.sh | tail -n 1)
for env in swift lf094 trl; do bash scripts/setup.sh "$env" >/dev/null; done
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "${LANE[@]}" "$@"
