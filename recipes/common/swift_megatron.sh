#!/usr/bin/env bash
# ms-swift Megatron launcher (`megatron sft`, mcore-bridge loads/saves HF safetensors directly).
# `megatron sft` starts torchrun itself from NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR,
# MASTER_PORT (swift/cli/_megatron/main.py).
#   TP=2 PP=1 recipes/common/swift_megatron.sh DOMAIN METHOD [--dry-run] [-- --flag value ...]
# TP/PP default to the domain's hparams.yaml (sized for a 4B model on 8x80GB); for GLM-4-32B use
# e.g. TP=8 PP=2 on two nodes (see recipes/README.md). Data parallel = world / (TP x PP).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_lib.sh"
DOMAIN=${1:?usage: $0 DOMAIN METHOD [--dry-run] [-- --flag value ...]}
shift
parse_launch_args "$DOMAIN" "$@"
# eaft-plugins runs only EAFT on Megatron's vocab-parallel logits; DFT is ms-swift's own --enable_dft_loss,
# which `megatron sft` has. SFT-KL, FLOW and TALR train with swift_deepspeed.sh or llamafactory.sh.
case "$METHOD" in
  sft_kl|flow|talr)
    echo "METHOD $METHOD: \`megatron sft\` has no --loss_type $METHOD (eaft-plugins wires only eaft into Megatron);" \
         "run it with recipes/$DOMAIN/swift_deepspeed.sh or recipes/$DOMAIN/llamafactory.sh (docs/loss.md)" >&2
    exit 2 ;;
esac

TP=${TP:-$DEFAULT_TP}
PP=${PP:-$DEFAULT_PP}
if [ $((WORLD_SIZE % (TP * PP))) -ne 0 ]; then
  echo "world size $WORLD_SIZE is not divisible by TP=$TP x PP=$PP" >&2
  exit 2
fi
DP=$((WORLD_SIZE / (TP * PP)))
data_parallel_grad_accum "$DP" >/dev/null  # fail early when the global batch does not split
SEQUENCE_PARALLEL=false
if [ "$TP" -gt 1 ]; then SEQUENCE_PARALLEL=true; fi

swift_data_args
# Layers that do not split evenly over PP stages (GLM-4-32B: 61) give the first stage the rest.
PIPELINE_ARGS=()
if [ "$PP" -gt 1 ]; then
  N_LAYERS=$(model_field "$MODEL_USED" layers)
  if [ -n "$N_LAYERS" ] && [ $((N_LAYERS % PP)) -ne 0 ]; then
    PIPELINE_ARGS=(--decoder_first_pipeline_num_layers $((N_LAYERS - (PP - 1) * (N_LAYERS / PP))))
  fi
fi

run_launch "${NODE_ENV[@]}" -- \
  megatron sft \
  "${SWIFT_DATA_ARGS[@]}" \
  --tensor_model_parallel_size "$TP" \
  --pipeline_model_parallel_size "$PP" \
  "${PIPELINE_ARGS[@]}" \
  --sequence_parallel "$SEQUENCE_PARALLEL" \
  --micro_batch_size "$PER_DEVICE_BATCH_SIZE" \
  --global_batch_size "$GLOBAL_BATCH_SIZE" \
  --recompute_granularity full \
  --recompute_method uniform \
  --recompute_num_layers 1 \
  --num_train_epochs "$EPOCHS" \
  --lr "$LEARNING_RATE" \
  --lr_decay_style "$LR_SCHEDULER" \
  --lr_warmup_fraction "$WARMUP_RATIO" \
  --min_lr 0 \
  --optimizer adam \
  --weight_decay "$WEIGHT_DECAY" \
  --adam_beta1 "$ADAM_BETA1" \
  --adam_beta2 "$ADAM_BETA2" \
  --clip_grad "$MAX_GRAD_NORM" \
  --bf16 true \
  --save_strategy epoch \
  --no_save_optim true \
  --no_save_rng true \
  --save_safetensors true \
  --logging_steps 10 \
  --dataset_num_proc 16 \
  --dataloader_num_workers 4 \
  --seed "$SEED" \
  --add_version false \
  --output_dir "$(output_dir megatron "$MODEL_USED")" \
  "${LOSS_ARGS[@]}" \
  "${EXTRA_ARGS[@]}"
