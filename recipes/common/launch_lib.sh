# Shared by the recipe launchers (sourced, not run). Parses
#   <launcher> METHOD [--dry-run] [-- EXTRA...]
# loads recipes/<domain>/hparams.sh (generated from hparams.yaml) and sets the multi-node
# variables the frameworks' own launchers read: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
# NPROC_PER_NODE. EXTRA is appended last, so it overrides recipe values
# (ms-swift: `-- --model X`; LLaMA-Factory: `-- model_name_or_path=X`).

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

launch_usage() {
  echo "usage: $0 METHOD [--dry-run] [-- EXTRA_ARGS...]" >&2
  echo "  METHOD: ${METHODS[*]}" >&2
  echo "  env: NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8" >&2
}

# parse_launch_args DOMAIN "$@" -> METHOD, DRY_RUN, EXTRA_ARGS, LOSS_ARGS, hparams.sh variables
parse_launch_args() {
  local domain=$1
  shift
  # shellcheck source=/dev/null
  source "$REPO_ROOT/recipes/$domain/hparams.sh"
  METHOD=""
  DRY_RUN=0
  EXTRA_ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h|--help) launch_usage; exit 0 ;;
      --) shift; EXTRA_ARGS=("$@"); break ;;
      -*) echo "unknown option $1 (framework arguments go after --)" >&2; launch_usage; exit 2 ;;
      *)
        if [ -n "$METHOD" ]; then echo "only one METHOD, got '$METHOD' and '$1'" >&2; exit 2; fi
        METHOD=$1 ;;
    esac
    shift
  done
  if [ -z "$METHOD" ]; then launch_usage; exit 2; fi
  local known=0 m
  for m in "${METHODS[@]}"; do [ "$m" = "$METHOD" ] && known=1; done
  if [ "$known" != 1 ]; then
    echo "METHOD must be one of: ${METHODS[*]} (got '$METHOD')" >&2
    exit 2
  fi
  local loss_var="LOSS_ARGS_${METHOD}[@]"
  LOSS_ARGS=("${!loss_var}")

  NNODES=${NNODES:-1}
  NODE_RANK=${NODE_RANK:-0}
  # Several nodes need node 0's address: a loopback or a wildcard address (0.0.0.0 / :: mean "any
  # interface" to a listener, not a host another node can connect to) would leave every other node
  # waiting for a rendezvous that never comes.
  if [ "$NNODES" -gt 1 ]; then
    case "${MASTER_ADDR:-}" in
      ""|127.*|localhost|::1|0.*|::|"[::]"|"[::1]")
        echo "NNODES=$NNODES needs MASTER_ADDR=<address of node 0 that the other nodes can reach> (got '${MASTER_ADDR:-}')" >&2
        exit 2 ;;
    esac
  fi
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-29500}
  NPROC_PER_NODE=${NPROC_PER_NODE:-8}
  WORLD_SIZE=$((NNODES * NPROC_PER_NODE))
  # what the frameworks' own launchers read (torchrun under llamafactory-cli, swift, megatron)
  NODE_ENV=(NNODES="$NNODES" NODE_RANK="$NODE_RANK" MASTER_ADDR="$MASTER_ADDR" MASTER_PORT="$MASTER_PORT"
            NPROC_PER_NODE="$NPROC_PER_NODE")
}

# data_parallel_grad_accum DP -> gradient accumulation that keeps GLOBAL_BATCH_SIZE
data_parallel_grad_accum() {
  local dp=$1 per_step
  per_step=$((PER_DEVICE_BATCH_SIZE * dp))
  if [ $((GLOBAL_BATCH_SIZE % per_step)) -ne 0 ]; then
    echo "GLOBAL_BATCH_SIZE=$GLOBAL_BATCH_SIZE is not a multiple of per-device batch $PER_DEVICE_BATCH_SIZE x $dp data-parallel ranks" >&2
    exit 2
  fi
  echo $((GLOBAL_BATCH_SIZE / per_step))
}

# run_launch ENV_ASSIGNMENTS... -- COMMAND...: print the exact command line; run it unless --dry-run.
run_launch() {
  local envs=()
  while [ "$1" != "--" ]; do envs+=("$1"); shift; done
  shift
  echo "+ cd $(printf '%q' "$REPO_ROOT")"
  echo "+ $(printf '%q ' "${envs[@]}" "$@" | sed 's/ $//')"
  if [ "$DRY_RUN" = 1 ]; then
    return 0
  fi
  cd "$REPO_ROOT"
  exec env "${envs[@]}" "$@"
}

# extra_value FLAG: the value EXTRA_ARGS gives FLAG (`--flag value` or `key=value`; the last wins).
extra_value() {
  local flag=$1 i value=""
  for ((i = 0; i < ${#EXTRA_ARGS[@]}; i++)); do
    case "${EXTRA_ARGS[$i]}" in
      "$flag") value=${EXTRA_ARGS[$((i + 1))]:-} ;;
      "$flag"=*) value=${EXTRA_ARGS[$i]#"$flag"=} ;;
    esac
  done
  echo "$value"
}

# output_dir FRAMEWORK MODEL: where a run writes, named after the model so that runs of two models
# never share a folder (saves/<framework>/<domain>/<model>/<method>).
output_dir() {
  echo "saves/$1/$DOMAIN/$(model_field "$2" tag)/$METHOD"
}

# model_field MODEL FIELD: recipes/common/models.py (template per framework, thinking, layers);
# exits 2 with its message for a model of unknown family.
model_field() {
  local out
  out=$(python3 "$REPO_ROOT/recipes/common/models.py" "$1" "$2") || exit 2
  echo "$out"
}

# swift_data_args: the model, template and data arguments both ms-swift launchers (`swift sft`, `megatron sft`)
# start with, in SWIFT_DATA_ARGS; MODEL_USED is the model the run trains. The template and the output folder
# follow the model (-- --model X included); an explicit -- --template T / --output_dir D wins.
swift_data_args() {
  MODEL_USED=$(extra_value --model)
  MODEL_USED=${MODEL_USED:-$MODEL}
  local template
  template=$(extra_value --template)
  if [ -z "$template" ]; then template=$(model_field "$MODEL_USED" swift); fi
  SWIFT_DATA_ARGS=(--model "$MODEL" --use_hf true --tuner_type full --torch_dtype bfloat16 --template "$template"
                   --dataset "$SWIFT_DATASET" --split_dataset_ratio 0 --max_length "$MAX_LENGTH"
                   --truncation_strategy right)
}
