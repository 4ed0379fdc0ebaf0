"""Entropy-Adaptive Fine-Tuning (EAFT, arXiv 2601.02151) for LLaMA-Factory and ms-swift.

Importing this package is cheap (no torch): the `.pth` bootstrap imports it at every
interpreter start. The public names below load on first use.
"""

__version__ = "0.1.0"

_LAZY = {
    "eaft_loss": ("eaft_plugins.loss", "eaft_loss"),
    "EAFTOutput": ("eaft_plugins.loss", "EAFTOutput"),
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
