#!/usr/bin/env bash
# ms-swift + DeepSpeed ZeRO-3 launcher. `swift sft` starts torchrun itself when NPROC_PER_NODE /
# NNODES are set (swift/cli/main.py), reading NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT.
#   recipes/common/swift_deepspeed.sh DOMAIN METHOD [--dry-run] [-- --flag value ...]
# Run the same command on every node with its own NODE_RANK (MASTER_ADDR = node 0).
# ZERO_CONFIG=recipes/common/ds_z3_offload_config.json for models that do not fit (e.g. 32B on one node).
# A method may have its own config (hparams.sh ZERO_CONFIG_<method>: SFT-KL's is ZeRO-2); ZERO_CONFIG wins.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"
DOMAIN=${1:?usage: $0 DOMAIN METHOD [--dry-run] [-- --flag value ...]}
shift
ZERO_OVERRIDE=${ZERO_CONFIG:-}
parse_launch_args "$DOMAIN" "$@"
METHOD_ZERO="ZERO_CONFIG_$METHOD"
ZERO_CONFIG=${ZERO_OVERRIDE:-${!METHOD_ZERO:-$ZERO_CONFIG}}

GA=$(data_parallel_grad_accum "$WORLD_SIZE")
swift_data_args

run_launch "${NODE_ENV[@]}" -- \
  swift sft \
  "${SWIFT_DATA_ARGS[@]}" \
  --num_train_epochs "$EPOCHS" \
  --learning_rate "$LEARNING_RATE" \
  --lr_scheduler_type "$LR_SCHEDULER" \
  --warmup_ratio "$WARMUP_RATIO" \
  --optim adamw_torch \
  --weight_decay "$WEIGHT_DECAY" \
  --adam_beta1 "$ADAM_BETA1" \
  --adam_beta2 "$ADAM_BETA2" \
  --max_grad_norm "$MAX_GRAD_NORM" \
  --per_device_train_batch_size "$PER_DEVICE_BATCH_SIZE" \
  --gradient_accumulation_steps "$GA" \
  --gradient_checkpointing true \
  --deepspeed "$ZERO_CONFIG" \
  --save_strategy epoch \
  --save_only_model true \
  --logging_steps 10 \
  --dataset_num_proc 16 \
  --dataloader_num_workers 4 \
  --seed "$SEED" \
  --add_version false \
  --output_dir "$(output_dir swift "$MODEL_USED")" \
  "${LOSS_ARGS[@]}" \
  "${EXTRA_ARGS[@]}"
