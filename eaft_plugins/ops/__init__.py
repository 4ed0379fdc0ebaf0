"""The EAFT ops (torch only): dense on logits, fused with the LM head, vocab-parallel, and the
patch that makes a Hugging Face causal LM use the fused op. All share `common` and `entropy`."""
