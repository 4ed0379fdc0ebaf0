"""Retention monitor: how far fine-tuning moves the model from its base on a small general probe set,
measured live (every N steps) and logged with the trainer's own metrics. Works for plain SFT and EAFT.

Framework keys: LLaMA-Factory `retention_probe` / `retention_steps`, `swift sft --retention_probe`,
TRL `SFTConfig(retention_probe=...)`; a plain `transformers.Trainer`: `with_retention(trainer)`.
See docs/retention.md.
"""

from .monitor import METRICS, RetentionMonitor, kl_from_reference, reference_of
from .probe import BUILTIN, PRESETS, Row, load_rows, parse_probe, parse_steps

__all__ = ["BUILTIN", "METRICS", "PRESETS", "RetentionMonitor", "Row", "kl_from_reference", "load_rows",
           "parse_probe", "parse_steps", "reference_of", "with_retention", "RetentionCallback"]


def __getattr__(name):  # the callback needs transformers: imported on first use
    if name in ("with_retention", "RetentionCallback"):
        from . import callback

        return getattr(callback, name)
    raise AttributeError(name)
