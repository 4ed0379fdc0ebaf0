#!/usr/bin/env bash
# One row of the paper's tables, from the data to the row in the collected table, on one 8-GPU node.
#   bash recipes/row.sh DOMAIN METHOD [--dry-run]
#     DOMAIN: math | medical | agent
#     METHOD: base (evaluation only) or one of the domain's methods (recipes/DOMAIN/hparams.sh METHODS):
#             math: sft sft_kl flow dft talr eaft eaft_hard; medical, agent: sft dft eaft eaft_hard
# Stages, each printed as `+ command` before it runs (--dry-run prints them and runs nothing):
#   data       the training set (math: Qwen3-235B-A22B-Instruct-2507 answers, verified); skipped when present
#   train      recipes/DOMAIN/$FRAMEWORK.sh METHOD
#   eval-data  recipes/eval/prepare_custom.py (MedQA, CLUEWSC); skipped when present
#   eval       recipes/eval/run_eval.sh DOMAIN METHOD <the run's output folder> (base: the base model)
#   collect    recipes/eval/collect.py: results/DOMAIN/table.{md,csv}, with the paper's rows
# Hardware and time of each stage: recipes/README.md ("One command per row").
# Env: FRAMEWORK  llamafactory (default) | swift_deepspeed | swift_megatron
#      TEACHER_URL  math: an OpenAI-compatible endpoint already serving the teacher (unset: served here, TP=8)
#      PYTHON (python); the launchers' (NNODES, ...) and run_eval.sh's (TP, LIMIT, ...) variables pass through.
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USAGE="usage: $0 DOMAIN {base|METHOD} [--dry-run]"
DOMAIN=${1:?$USAGE}
METHOD=${2:?$USAGE}
DRY_RUN=0
[ "${3:-}" = "--dry-run" ] && DRY_RUN=1
case "$DOMAIN" in math|medical|agent) ;; *) echo "$USAGE" >&2; exit 2 ;; esac
FRAMEWORK=${FRAMEWORK:-llamafactory}
case "$FRAMEWORK" in
  llamafactory) SAVES=llamafactory ;;
  swift_deepspeed) SAVES=swift ;;
  swift_megatron) SAVES=megatron ;;
  *) echo "FRAMEWORK must be llamafactory, swift_deepspeed or swift_megatron (got '$FRAMEWORK')" >&2; exit 2 ;;
esac
PYTHON=${PYTHON:-python}
source "$REPO_ROOT/recipes/common/launch_lib.sh"
source "$REPO_ROOT/recipes/common/serve_lib.sh"
source "$REPO_ROOT/recipes/$DOMAIN/hparams.sh"  # MODEL, METHODS
case " base ${METHODS[*]} " in
  *" $METHOD "*) ;;
  *) echo "METHOD must be one of: base ${METHODS[*]} (got '$METHOD')" >&2; exit 2 ;;
esac
TEACHER=Qwen/Qwen3-235B-A22B-Instruct-2507
TEACHER_PORT=8000
GENERATED="recipes/$DOMAIN/data/generated"
DATA_FILE=$GENERATED/$(basename "$SWIFT_DATASET")
CUSTOM_DIR=recipes/eval/data/custom

# stage NAME SKIP_IF_FILE COMMAND...: print, then run unless --dry-run or SKIP_IF_FILE exists.
stage() {
  local name=$1 skip_if=$2
  shift 2
  echo "# $name${skip_if:+ (skipped when $skip_if exists)}"
  echo "+ $(printf '%q ' "$@" | sed 's/ $//')"
  if [ "$DRY_RUN" = 1 ] || { [ -n "$skip_if" ] && [ -e "$REPO_ROOT/$skip_if" ]; }; then return 0; fi
  (cd "$REPO_ROOT" && "$@")
}

math_data() {
  local url=${TEACHER_URL:-http://127.0.0.1:$TEACHER_PORT/v1}
  local serve=(vllm serve "$TEACHER" --tensor-parallel-size 8 --max-model-len 20480 --port "$TEACHER_PORT")
  local build=("$PYTHON" recipes/math/build_data.py all --base-url "$url" --model "$TEACHER"
               --per-source 10000 --keep 19000 --workers 256)
  echo "# data (skipped when $DATA_FILE exists)"
  if [ -z "${TEACHER_URL:-}" ]; then echo "+ $(printf '%q ' "${serve[@]}")&"; fi
  echo "+ $(printf '%q ' "${build[@]}" | sed 's/ $//')"
  if [ "$DRY_RUN" = 1 ] || [ -e "$REPO_ROOT/$DATA_FILE" ]; then return 0; fi
  cd "$REPO_ROOT"
  if [ -z "${TEACHER_URL:-}" ]; then serve_until_ready "$TEACHER_PORT" "${serve[@]}"; fi
  "${build[@]}"
  if [ -z "${TEACHER_URL:-}" ]; then stop_server; fi  # the GPUs are the training's next
}

if [ "$METHOD" = base ]; then
  RUN_MODEL=$MODEL
else
  case "$DOMAIN" in
    math) math_data ;;
    medical) stage data "$DATA_FILE" "$PYTHON" recipes/medical/prepare_data.py ;;
    agent) stage data "$DATA_FILE" "$PYTHON" recipes/agent/prepare_data.py ;;
  esac
  stage train "" bash "recipes/$DOMAIN/$FRAMEWORK.sh" "$METHOD"
  RUN_MODEL=$(output_dir "$SAVES" "$MODEL")
fi
stage eval-data "$CUSTOM_DIR/cluewsc_val.jsonl" "$PYTHON" recipes/eval/prepare_custom.py --out-dir "$CUSTOM_DIR"
stage eval "" bash recipes/eval/run_eval.sh "$DOMAIN" "$METHOD" "$RUN_MODEL"
stage collect "" "$PYTHON" recipes/eval/collect.py --domain "$DOMAIN" "results/$DOMAIN" --paper
