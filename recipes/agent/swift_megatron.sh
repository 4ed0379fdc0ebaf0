#!/usr/bin/env bash
# agent recipe, ms-swift Megatron (megatron sft; TP/PP env vars).
#   bash recipes/agent/swift_megatron.sh {sft|eaft|eaft_hard|dft} [--dry-run] [-- --flag value ...]
# Multi-node: NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE (see recipes/README.md).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/swift_megatron.sh" agent "$@"
