"""`--eaft_*` command-line flags for ms-swift: extra fields on `swift.arguments.SftArguments`.

ms-swift parses `swift sft` / `swift pt` flags with HfArgumentParser over the SftArguments
dataclass and rejects unknown flags, so the EAFT flags must be dataclass fields. They are added
in place, right after `swift.arguments.sft_args` is imported (before PretrainArguments and
RLHFArguments subclass it), so the CLI, YAML configs, args.json and the Python API
(`SftArguments(..., eaft_topk=10)`) all see them. Every field defaults to None ("not set"), so
a flag given without `--loss_type eaft` is an error even when its value equals the default.

The trainer is built from a separate TrainingArguments copy that drops unknown fields, so the
validated EAFTConfig travels to the loss as `args.training_args.eaft_config`.
"""

from __future__ import annotations

from typing import Dict, Optional

from ..fields import add_fields
from ...retention import keys as retention_keys
from ...options import SETTINGS, EAFTConfig, EAFTOptions, Spelling, config_from_keys

LOSS_TYPE = "eaft"
SPELLING = Spelling("--{key}", "--{key} {value}")

# flag -> (type, help), from the option schema. Every flag defaults to None: "not given".
FLAGS = {s.key: (s.field_type, f"EAFT: {s.help} (default {s.default_text})") for s in SETTINGS}
TRAINER_FLAGS = tuple(s.key for s in SETTINGS if s.trainer)  # handed to the trainer, not EAFTOptions fields
OPTION_FLAGS = [f for f in FLAGS if f not in TRAINER_FLAGS]


def given_flags(args) -> Dict[str, object]:
    """The --eaft_* flags that were set (not None) on an arguments object."""
    return {f: getattr(args, f, None) for f in FLAGS if getattr(args, f, None) is not None}


def config_from_flags(flags: Dict[str, object]) -> EAFTConfig:
    """Validated EAFTConfig from --eaft_* values; a bad value raises ValueError naming its flag."""
    return config_from_keys({flag[len("eaft_"):]: value for flag, value in flags.items()}, SPELLING)


def options_from_flags(flags: Dict[str, object]) -> EAFTOptions:
    return config_from_flags(flags).options


def check_arguments(args) -> Optional[EAFTConfig]:
    """Refuse settings under which EAFT would not be applied; return the config (None: EAFT off)."""
    flags = given_flags(args)
    loss_type = getattr(args, "loss_type", None)
    rlhf_type = getattr(args, "rlhf_type", None)
    if rlhf_type is not None and (loss_type == LOSS_TYPE or flags):
        given = [f"--loss_type {LOSS_TYPE}"] if loss_type == LOSS_TYPE else []
        raise ValueError(f"{', '.join(given + ['--' + f for f in flags])}: EAFT is for `swift sft` / `swift pt`, "
                         f"not rlhf (--rlhf_type {rlhf_type}); drop the EAFT flags.")
    if loss_type != LOSS_TYPE:
        if flags:
            raise ValueError(
                f"{', '.join('--' + f for f in flags)} set but --loss_type is {loss_type!r}: "
                f"EAFT options only apply with --loss_type {LOSS_TYPE}. Add --loss_type {LOSS_TYPE} or drop them."
            )
        return None
    if getattr(args, "enable_dft_loss", False):
        raise ValueError(f"--loss_type {LOSS_TYPE} with --enable_dft_loss: both replace the loss; use one of the two.")
    if (getattr(args, "label_smoothing_factor", 0) or 0) > 0:
        raise ValueError(
            f"--loss_type {LOSS_TYPE} with --label_smoothing_factor > 0: ms-swift skips label smoothing when a "
            "loss_type is set; set --label_smoothing_factor 0."
        )
    if (getattr(args, "sequence_parallel_size", 1) or 1) > 1:
        raise ValueError(
            f"--loss_type {LOSS_TYPE} does not support sequence parallel (--sequence_parallel_size "
            f"{args.sequence_parallel_size}); set --sequence_parallel_size 1."
        )
    config = config_from_flags(flags)
    fused = config.fused
    if getattr(args, "use_liger_kernel", False) and not fused:
        # Without --eaft_fused, ms-swift pops the labels before the forward (a loss_type is set), so
        # Liger's fused linear cross-entropy never runs: the full logits are built anyway, and Liger's
        # loss-only evaluation (skip_logits=True without labels) fails.
        raise ValueError(
            f"--loss_type {LOSS_TYPE} with --use_liger_kernel: the dense EAFT loss needs the full logits, which "
            "Liger's fused cross-entropy exists to avoid (its memory saving would be lost and its evaluation "
            "fails). Add --eaft_fused true (fused EAFT from the hidden states and the LM head; Liger's other "
            "kernels stay) or drop --use_liger_kernel."
        )
    if fused and getattr(args, "enable_channel_loss", False):
        raise ValueError(
            "--eaft_fused true with --enable_channel_loss: the per-channel losses need per-token losses from the "
            "logits, which the fused path never builds; drop one of the two."
        )
    return config


def attach(training_args, config: EAFTConfig) -> None:
    """Hand the validated config to the trainer's arguments (read back by the loss)."""
    training_args.eaft_config = config


def check_retention(args) -> bool:
    """--retention_probe / --retention_steps (any --loss_type): validated here; True when the monitor is on."""
    on = retention_keys.check_keys(getattr(args, "retention_probe", None), getattr(args, "retention_steps", None),
                                   "--{key}")
    if on and type(args).__name__.startswith("Megatron"):
        raise ValueError("--retention_probe is not supported by `megatron sft` (the monitor runs on the transformers "
                         "Trainer of `swift sft`); drop it, or measure retention afterwards with eaft-repro "
                         "(docs/retention.md)")
    if on and getattr(args, "rlhf_type", None) is not None:
        raise ValueError(f"--retention_probe is for `swift sft` / `swift pt`, not rlhf (--rlhf_type {args.rlhf_type}); "
                         "drop it")
    return on


def extend_sft_arguments(cls) -> None:
    """Add the FLAGS (and the retention flags) as dataclass fields of `cls` (in place), validated in __post_init__."""
    add_fields(cls, retention_keys.FIELDS)
    if not add_fields(cls, FLAGS):
        return

    original = cls.__post_init__

    def __post_init__(self, *a, **kw):
        config = check_arguments(self)  # before the slow part: bad flags fail fast
        retention = check_retention(self)
        original(self, *a, **kw)
        if config is not None and getattr(self, "training_args", None) is not None:
            attach(self.training_args, config)
        if retention and getattr(self, "training_args", None) is not None:
            # the trainer's TrainingArguments copy drops unknown fields: hand the two over
            self.training_args.retention_probe = self.retention_probe
            self.training_args.retention_steps = self.retention_steps

    __post_init__.__wrapped__ = original
    cls.__post_init__ = __post_init__
