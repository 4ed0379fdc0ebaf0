"""The EAFT ops (torch only, no framework import): dense on logits, fused with the LM head, and
vocab-parallel. All share `common` and `entropy`; `eaft_plugins.models` makes a Hugging Face causal
LM use the fused op."""
