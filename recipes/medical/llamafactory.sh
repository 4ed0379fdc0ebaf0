#!/usr/bin/env bash
# medical recipe, LLaMA-Factory (llamafactory-cli + torchrun, DeepSpeed ZeRO-3).
#   bash recipes/medical/llamafactory.sh {sft|eaft|eaft_hard|dft} [--dry-run] [-- key=value ...]
# Multi-node: NNODES NODE_RANK MASTER_ADDR MASTER_PORT NPROC_PER_NODE (see recipes/README.md).
exec bash "$(dirname "${BASH_SOURCE[0]}")/../common/llamafactory.sh" medical "$@"
