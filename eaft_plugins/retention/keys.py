"""The retention keys (`retention_probe`, `retention_steps`; declared in options.RetentionConfig) as every framework
checks and attaches them. Any loss: not EAFT settings, so the "eaft_* key without EAFT" rules never see them."""

from __future__ import annotations

from ..options import Spelling
from .probe import load_rows, parse_steps


def check_keys(probe, steps, spelling: Spelling = Spelling()) -> bool:
    """Validate the two keys as written (file problems stop here); True when the monitor is on."""
    parse_steps(steps, spelling.shown("retention_steps"))
    if probe is None:
        if steps is not None:
            raise ValueError(f"{spelling.shown('retention_steps')} is set but `retention_probe` is not: add "
                             f"{spelling.assign('retention_probe', 'builtin')} (or a probe file) or drop "
                             "`retention_steps`")
        return False
    load_rows(probe, spelling.shown("retention_probe"))
    return True


def attach(trainer, probe, steps, spelling: Spelling = Spelling()):
    """Put a RetentionCallback on a built trainer (the probe is encoded for its tokenizer and model here)."""
    from .callback import RetentionCallback

    return RetentionCallback(probe, steps, shown_probe=spelling.shown("retention_probe"),
                             shown_steps=spelling.shown("retention_steps")).bind(trainer)
