"""Entropy-Adaptive Fine-Tuning (EAFT, arXiv 2601.02151) for LLaMA-Factory, ms-swift and TRL.

Layers: the core here (options, stats, run), the ops in `ops/` (dense, fused, vocab-parallel,
their shared helpers; torch only), the Hugging Face model patch in `models/`, one sub-package per
framework in `integrations/`, and the command-line tools in `tools/`.

Importing this package is cheap (no torch): the `.pth` bootstrap imports it at every
interpreter start. The public names below load on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "eaft_loss": ("eaft_plugins.ops.dense", "eaft_loss"),
    "EAFTOutput": ("eaft_plugins.ops.common", "EAFTOutput"),
    "fused_linear_eaft_loss": ("eaft_plugins.ops.fused", "fused_linear_eaft_loss"),
    "vocab_parallel_eaft_loss": ("eaft_plugins.ops.vocab_parallel", "vocab_parallel_eaft_loss"),
    "patch_model_for_fused_eaft": ("eaft_plugins.models", "patch_model_for_fused_eaft"),
    "EAFTConfig": ("eaft_plugins.options", "EAFTConfig"),
    "EAFTRun": ("eaft_plugins.run", "EAFTRun"),
    "EAFTOptions": ("eaft_plugins.options", "EAFTOptions"),
    "make_options": ("eaft_plugins.options", "make_options"),
    "EAFTStats": ("eaft_plugins.stats", "EAFTStats"),
    "StatsAccumulator": ("eaft_plugins.stats", "StatsAccumulator"),
    "install": ("eaft_plugins.activation", "install"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'eaft_plugins' has no attribute {name!r}")
