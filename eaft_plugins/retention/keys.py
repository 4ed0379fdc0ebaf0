"""The retention keys every framework adds (YAML key, flag, config field). Not EAFT options: they work with any
loss, so the "eaft_* key without EAFT" rules never see them."""

from __future__ import annotations

from typing import Optional

from .probe import load_rows, parse_steps

PROBE_HELP = ("retention monitor (any loss, SFT or EAFT): `builtin` (the package's ~2k-token general probe set) or "
              "a JSONL file of {\"text\"} / {\"prompt\"} / {\"question\", \"choices\", \"answer\"} rows; logs "
              "retention/kl_base, retention/text_nll, retention/mc_logp and draws retention.png (docs/retention.md)")
STEPS_HELP = ("optimizer steps between two retention probes (default: the logging interval, else the eval "
              "interval, else once per epoch, lengthened to a multiple of it if a probe would take more than 3% of "
              "the training time; printed at the first interval); needs retention_probe")
FIELDS = {"retention_probe": (Optional[str], PROBE_HELP), "retention_steps": (Optional[int], STEPS_HELP)}


def check_keys(probe, steps, shown: str = "`{key}`") -> bool:
    """Validate the two keys as written (file problems stop here); True when the monitor is on."""
    probe_key, steps_key = shown.format(key="retention_probe"), shown.format(key="retention_steps")
    parse_steps(steps, steps_key)
    if probe is None:
        if steps is not None:
            raise ValueError(f"{steps_key} is set but {probe_key} is not: add {probe_key} (e.g. builtin) or drop it")
        return False
    load_rows(probe, probe_key)
    return True


def attach(trainer, probe, steps, shown: str = "`{key}`"):
    """Put a RetentionCallback on a built trainer (the probe is encoded for its tokenizer and model here)."""
    from .callback import RetentionCallback

    return RetentionCallback(probe, steps, shown_probe=shown.format(key="retention_probe"),
                             shown_steps=shown.format(key="retention_steps")).bind(trainer)
