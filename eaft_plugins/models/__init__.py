"""The Hugging Face model adapter of fused EAFT: `reader` reads a family's forward (what the op must
reproduce, or why it cannot), `patch` swaps the model's forward for the fused one, `families` checks
every family a transformers release exports (and writes the docs table)."""

from .patch import FusedEAFT, patch_model_for_fused_eaft
from .reader import causal_lm_of, describe_model, router_aux_coef

__all__ = ["FusedEAFT", "causal_lm_of", "describe_model", "patch_model_for_fused_eaft", "router_aux_coef"]
