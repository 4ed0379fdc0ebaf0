#!/usr/bin/env bash
# medical recipe, ms-swift Megatron (megatron sft; TP/PP env vars).
#   bash recipes/medical/swift_megatron.sh {sft|eaft|eaft_hard|dft} [--dry-run] [-- --flag value ...]
# Multi-node: NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE (see recipes/README.md).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/swift_megatron.sh" medical "$@"
