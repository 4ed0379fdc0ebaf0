#!/usr/bin/env bash
# The README's test command: set up the venvs (idempotent), then run the whole test suite.
# .venv holds llamafactory 0.9.5 and runs pytest; .venv-swift holds ms-swift 4.6.0 for the
# real `swift sft` runs (the two frameworks need different `datasets` releases); .venv-lf094
# holds llamafactory 0.9.4, the release without use_eaft_loss.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh | tail -n 1)
bash scripts/setup_swift.sh >/dev/null
bash scripts/setup_lf094.sh >/dev/null
bash scripts/setup_trl.sh >/dev/null
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m pytest "$@"
