#!/usr/bin/env bash
# The README's main command: set up the venv (idempotent), then fine-tune SmolLM2-135M-Instruct
# with EAFT through the real `llamafactory-cli train`, on CPU, offline, on embedded data.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup.sh | tail -n 1)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$VENV/bin/python" -m eaft_plugins.tools.demo "$@"
