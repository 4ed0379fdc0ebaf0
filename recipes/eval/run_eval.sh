#!/usr/bin/env bash
# Evaluate one checkpoint (base, SFT, EAFT, ...) on a domain's target benchmarks and the paper's
# general benchmarks (MMLU, IFEval, CLUEWSC) with EvalScope (the harness `swift eval` drives),
# against a vLLM OpenAI-compatible server started here.
#   bash recipes/eval/run_eval.sh DOMAIN RUN_NAME MODEL_PATH [--dry-run]
#   e.g. bash recipes/eval/run_eval.sh math base Qwen/Qwen3-4B-Instruct-2507
#        bash recipes/eval/run_eval.sh math eaft saves/llamafactory/math/Qwen3-4B-Instruct-2507/eaft   # the final model
#        bash recipes/eval/run_eval.sh math eaft saves/swift/math/Qwen3-4B-Instruct-2507/eaft/checkpoint-N
# A training output folder without weights of its own (ms-swift, Megatron) is evaluated at its last
# checkpoint-N.
# Results: results/DOMAIN/RUN_NAME/<timestamp>/reports/RUN_NAME/<dataset>.json (EvalScope's layout);
# then: python recipes/eval/collect.py --domain DOMAIN results/DOMAIN
# Needs: pip install -r recipes/eval/requirements.txt   (pinned EvalScope range, bfcl-eval, vllm)
#        python recipes/eval/prepare_custom.py   (MedQA and CLUEWSC files for EvalScope's general_mcq)
# Thinking models (recipes/common/models.py, from MODEL_PATH or else BASE_MODEL, default the domain's
# hparams.yaml model) are served with vLLM's reasoning parser, so every benchmark scores the answer
# without the reasoning (EvalScope's multiple-choice adapters read the answer text, never a filtered one);
# recipes/eval/evalscope_run.py --thinking checks the server does it.
# Env: TP (vLLM tensor parallel, default 1), PORT (8801), EVAL_BATCH (64), LIMIT (samples per subset, unset = all),
#      AIME_REPEATS (samples per AIME problem, averaged; default 8), BASE_MODEL, PYTHON (python)
set -euo pipefail
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
source "$REPO_ROOT/recipes/common/serve_lib.sh"
DOMAIN=${1:?usage: $0 DOMAIN RUN_NAME MODEL_PATH [--dry-run]}
RUN_NAME=${2:?usage: $0 DOMAIN RUN_NAME MODEL_PATH [--dry-run]}
MODEL_PATH=${3:?usage: $0 DOMAIN RUN_NAME MODEL_PATH [--dry-run]}
DRY_RUN=0
[ "${4:-}" = "--dry-run" ] && DRY_RUN=1
TP=${TP:-1}
PORT=${PORT:-8801}
EVAL_BATCH=${EVAL_BATCH:-64}
# AIME has 30 problems: one sample at temperature 0.7 moves the score by about +-9 points.
AIME_REPEATS=${AIME_REPEATS:-8}
PYTHON=${PYTHON:-python}
WORK_DIR="results/$DOMAIN/$RUN_NAME"
CUSTOM_DIR="recipes/eval/data/custom"

# Sampling follows the model cards' recommended settings (the paper does not list its own).
SERVE_EXTRA=()
case "$DOMAIN" in
  math)
    TARGET=(aime24 aime25 gsm8k)
    GEN="max_tokens=30000,temperature=0.7,top_p=0.8"
    MAX_LEN=40960 ;;
  medical)
    TARGET=(med_mcqa pubmedqa)
    GEN="max_tokens=30000,temperature=0.6,top_p=0.95"
    MAX_LEN=40960 ;;
  agent)
    TARGET=(bfcl_v3)
    GEN="max_tokens=16384,temperature=0.7,top_p=0.8"
    MAX_LEN=32768
    # BFCL is scored on native function calls: let vLLM parse Qwen's <tool_call> blocks.
    SERVE_EXTRA=(--enable-auto-tool-choice --tool-call-parser hermes) ;;
  *) echo "DOMAIN must be one of: math medical agent (got '$DOMAIN')" >&2; exit 2 ;;
esac
GENERAL=(mmlu ifeval)
if ! [[ "$AIME_REPEATS" =~ ^[1-9][0-9]*$ ]]; then echo "AIME_REPEATS must be a positive integer (got '$AIME_REPEATS')" >&2; exit 2; fi

# One rule for every thinking model: the model's family (a local checkpoint: the model it was trained from).
BASE_MODEL=${BASE_MODEL:-$(sed -n 's/^MODEL=//p' "$REPO_ROOT/recipes/$DOMAIN/hparams.sh")}
THINKING=$(python3 "$REPO_ROOT/recipes/common/models.py" "$MODEL_PATH" thinking "$BASE_MODEL")
RUNNER=("$PYTHON" recipes/eval/evalscope_run.py)
if [ "$THINKING" = true ]; then
  # deepseek_r1 splits at the first </think> with or without an opening <think> (the Thinking-2507
  # template opens it in the prompt) in every vLLM release; no </think> leaves no answer.
  SERVE_EXTRA+=(--reasoning-parser deepseek_r1)
  RUNNER+=(--thinking)
fi

# A training output folder without weights of its own (ms-swift, Megatron): its last checkpoint-N
# (paths are relative to the repository root, where the commands run).
last_checkpoint() {
  cd "$REPO_ROOT"
  if [ -d "$1" ] && [ ! -f "$1/config.json" ]; then
    find "$1" -maxdepth 1 -type d -name 'checkpoint-*' | sort -V | tail -n 1
  fi
}
LAST=$(last_checkpoint "$MODEL_PATH")
if [ -n "$LAST" ]; then MODEL_PATH=$LAST; fi

SERVE=(vllm serve "$MODEL_PATH" --served-model-name "$RUN_NAME" --port "$PORT"
  --tensor-parallel-size "$TP" --max-model-len "$MAX_LEN" "${SERVE_EXTRA[@]}")
EVAL=("${RUNNER[@]}" eval --model "$RUN_NAME" --api-url "http://127.0.0.1:$PORT/v1" --api-key EMPTY
  --eval-type openai_api --eval-batch-size "$EVAL_BATCH" --work-dir "$WORK_DIR"
  --generation-config "$GEN")
if [ -n "${LIMIT:-}" ]; then EVAL+=(--limit "$LIMIT"); fi

# MMLU 5-shot and GSM8K 4-shot are EvalScope's defaults, written out so an EvalScope release cannot
# change them; the paper does not state its shots and its scores cannot tell (docs/evaluation.md).
DATASET_ARGS='{"bfcl_v3": {"extra_params": {"is_fc_model": true, "underscore_to_dot": true}}, "mmlu": {"few_shot_num": 5}, "gsm8k": {"few_shot_num": 4}}'
MEDQA_ARGS=$(printf '{"general_mcq": {"local_path": "%s", "subset_list": ["medqa"], "prompt_template": "Answer the following multiple choice question. The last line of your response should be of the form \\"ANSWER: [LETTER]\\" (without quotes) where [LETTER] is one of {letters}.\\n\\n{question}\\n\\n{choices}"}}' "$CUSTOM_DIR")
CLUEWSC_ARGS=$(printf '{"general_mcq": {"local_path": "%s", "subset_list": ["cluewsc"]}}' "$CUSTOM_DIR")

RUNS=()
if [ "$DOMAIN" = math ]; then
  # AIME: the mean over AIME_REPEATS samples per problem (EvalScope --repeats, mean aggregation); alone,
  # so the other benchmarks are not repeated.
  RUNS+=("$(printf '%q ' "${EVAL[@]}" --datasets aime24 aime25 --repeats "$AIME_REPEATS")")
  TARGET=(gsm8k)
fi
RUNS+=("$(printf '%q ' "${EVAL[@]}" --datasets "${TARGET[@]}" "${GENERAL[@]}" --dataset-args "$DATASET_ARGS")")
if [ "$DOMAIN" = medical ]; then
  RUNS+=("$(printf '%q ' "${EVAL[@]}" --datasets general_mcq --dataset-args "$MEDQA_ARGS")")
fi
RUNS+=("$(printf '%q ' "${EVAL[@]}" --datasets general_mcq --dataset-args "$CLUEWSC_ARGS")")

echo "+ cd $(printf '%q' "$REPO_ROOT")"
echo "+ $(printf '%q ' "${SERVE[@]}")&"
for r in "${RUNS[@]}"; do echo "+ $r"; done
[ "$DRY_RUN" = 1 ] && exit 0

cd "$REPO_ROOT"
serve_until_ready "$PORT" "${SERVE[@]}"
for r in "${RUNS[@]}"; do eval "$r"; done
