"""ms-swift integration: `swift sft --loss_type eaft [--eaft_* ...]` works after `pip install eaft-plugins`.

ms-swift 4.6 has no EAFT and no plugin discovery of its own; `swift sft` re-runs itself in a
subprocess (or under torchrun), and every such Python process starts the bootstrap of
`eaft_plugins.pth`, which calls `activate()` when `swift` is first imported. `activate()` only
arms import hooks; the patches happen when ms-swift imports the modules concerned:

* `swift.loss.mapping`: adds `loss_map["eaft"]` (looked up by name when the trainer is built);
* `swift.arguments.sft_args`: adds the `--eaft_*` fields to SftArguments (see .args);
* `swift.trainers.seq2seq_trainer`: at the end of Seq2SeqTrainer.__init__ (the model is set by
  then, training has not started), an EAFT loss checks `--eaft_topk` against the vocabulary and,
  with `--eaft_fused true`, patches the model and the trainer's compute_loss
  (`EAFTLoss.bind_trainer`); nothing changes for other losses.

Megatron (`megatron sft`) is wired by `.megatron` (docs/megatron.md).
"""

from __future__ import annotations

import importlib
import sys

from ...activation import guarded, record_patch
from ...hooks import when_imported
from .. import adapter
from .args import SPELLING

NAME = "swift"
# The modules whose import applies the patches (`import swift` alone is lazy and patches nothing yet).
DOCTOR_IMPORTS = ("swift.loss.mapping", "swift.arguments.sft_args", "swift.trainers.seq2seq_trainer")


def _register_loss(mapping) -> None:
    """Importing our .loss registers loss_map['eaft'] (at its end, once EAFTLoss exists). When .loss is being
    imported right now (its `import swift.loss` loaded this mapping), it registers itself when it finishes."""
    name = f"{__name__}.loss"
    if name not in sys.modules:
        importlib.import_module(name)


def _extend_arguments(sft_args) -> None:
    from .args import extend_sft_arguments

    from ...options import USER_SETTINGS

    if extend_sft_arguments(sft_args.SftArguments):
        flags = " ".join(f"--{s.key}" for s in USER_SETTINGS)
        record_patch(NAME, f"swift.arguments.SftArguments: {flags}, --enable_eaft_loss")


def _patch_trainer(seq2seq_trainer) -> None:
    def make(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            from .loss import EAFTLoss

            loss = getattr(self, "compute_loss_func", None)
            if isinstance(loss, EAFTLoss):
                loss.bind_trainer(self)  # top-K vs vocabulary; with --eaft_fused, the fused forward
            probe = getattr(self.args, "retention_probe", None)
            if probe is not None:  # any --loss_type (handed over by swift/args.py)
                from ...retention import keys as retention_keys

                retention_keys.attach(self, probe, getattr(self.args, "retention_steps", None), SPELLING)

        return __init__

    if adapter.patch_method(seq2seq_trainer.Seq2SeqTrainer, "__init__", make):
        record_patch(NAME, "swift.trainers.Seq2SeqTrainer.__init__: EAFT loss bound to the model (--eaft_topk "
                           "check, --eaft_fused), --retention_probe monitor")


def runtime_problems() -> list:
    """What stops `swift sft` in this environment although ms-swift imports (shown by doctor)."""
    try:
        from datasets.features import Json  # noqa: F401  ms-swift 4.6 imports it when it preprocesses a dataset
    except ImportError:
        from ...activation import distribution_version

        return [f"`swift sft` cannot run here: ms-swift {distribution_version('ms-swift')} imports "
                f"datasets.features.Json (datasets >= 4.1), found datasets {distribution_version('datasets')} "
                "(llamafactory 0.9.5 pins datasets<=4.0.0). Run swift from its own environment: "
                "pip install 'eaft-plugins[swift]' there (this checkout: .venv-swift)"]
    return []


def _guarded(what, callback):
    return guarded(NAME, what, callback)


def activate() -> None:
    when_imported("swift.loss.mapping", _guarded("registering loss_map['eaft']", _register_loss))
    when_imported("swift.arguments.sft_args", _guarded("adding --eaft_* flags", _extend_arguments))
    when_imported("swift.trainers.seq2seq_trainer", _guarded("hooking Seq2SeqTrainer for --eaft_fused", _patch_trainer))
    from . import megatron

    megatron.activate()
