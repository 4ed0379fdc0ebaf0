#!/usr/bin/env bash
# LLaMA-Factory multi-node launcher: llamafactory-cli (FORCE_TORCHRUN=1 -> torchrun) with the
# domain's generated YAML. gradient_accumulation_steps is rescaled so the global batch stays
# GLOBAL_BATCH_SIZE for any NNODES x NPROC_PER_NODE.
#   recipes/common/llamafactory.sh DOMAIN METHOD [--dry-run] [-- key=value ...]
# Run the same command on every node with its own NODE_RANK (MASTER_ADDR = node 0).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"
DOMAIN=${1:?usage: $0 DOMAIN METHOD [--dry-run] [-- key=value ...]}
shift
parse_launch_args "$DOMAIN" "$@"

GA=$(data_parallel_grad_accum "$WORLD_SIZE")
# The YAML's template and output folder belong to its model: another model (-- model_name_or_path=X)
# gets its own (unless given: -- template=T / output_dir=D).
MODEL_ARGS=()
LF_MODEL=$(extra_value model_name_or_path)
if [ -n "$LF_MODEL" ] && [ -z "$(extra_value template)" ]; then
  MODEL_ARGS+=("template=$(model_field "$LF_MODEL" llamafactory)")
fi
if [ -n "$LF_MODEL" ] && [ -z "$(extra_value output_dir)" ]; then
  MODEL_ARGS+=("output_dir=$(output_dir llamafactory "$LF_MODEL")")
fi
run_launch FORCE_TORCHRUN=1 "${NODE_ENV[@]}" -- \
  llamafactory-cli train "recipes/$DOMAIN/llamafactory/$METHOD.yaml" \
  "gradient_accumulation_steps=$GA" \
  "${MODEL_ARGS[@]}" \
  "${EXTRA_ARGS[@]}"
