#!/usr/bin/env bash
# agent recipe, ms-swift + DeepSpeed ZeRO-3 (swift sft).
#   bash recipes/agent/swift_deepspeed.sh {sft|eaft|eaft_hard|dft} [--dry-run] [-- --flag value ...]
# Multi-node: NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE (see recipes/README.md).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/swift_deepspeed.sh" agent "$@"
