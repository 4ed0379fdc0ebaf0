"""`--eaft_*` command-line flags for ms-swift: extra fields on `swift.arguments.SftArguments`.

ms-swift parses `swift sft` / `swift pt` flags with HfArgumentParser over the SftArguments
dataclass and rejects unknown flags, so the EAFT flags must be dataclass fields. They are added
in place, right after `swift.arguments.sft_args` is imported (before PretrainArguments and
RLHFArguments subclass it), so the CLI, YAML configs, args.json and the Python API
(`SftArguments(..., eaft_topk=10)`) all see them. Every field defaults to None ("not set"), so
a flag given without `--loss_type eaft` is an error even when its value equals the default.

The trainer is built from a separate TrainingArguments copy that drops unknown fields, so the
validated options travel to the loss as attributes of `args.training_args`.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

from ..options import ENTROPY_NORMS, GATES, WEIGHT_NORMS, EAFTOptions

LOSS_TYPE = "eaft"

# flag -> (type, help). Option defaults are those of EAFTOptions (shown in the help).
FLAGS = {
    "eaft_topk": (Optional[str], "EAFT: entries of the top-K entropy, an integer >= 2 or 'full' (default 20)"),
    "eaft_alpha": (Optional[float], "EAFT: exponent on the normalised entropy, >= 0 (default 1.0)"),
    "eaft_entropy_norm": (Optional[str], f"EAFT: entropy normalisation, one of {list(ENTROPY_NORMS)} (default ln_k)"),
    "eaft_gate": (Optional[str], f"EAFT: gate, one of {list(GATES)} (default soft)"),
    "eaft_h_min": (Optional[float], "EAFT: confident-conflict entropy threshold, >= 0 (default 0.15)"),
    "eaft_p_min": (Optional[float], "EAFT: confident-conflict probability threshold, in [0, 1] (default 0.1)"),
    "eaft_weight_norm": (Optional[str], f"EAFT: weight normalisation, one of {list(WEIGHT_NORMS)} (default none)"),
    "eaft_log_metrics": (Optional[bool], "EAFT: log eaft/ce, eaft/weight, eaft/entropy, eaft/conflict_frac (default true)"),
    "eaft_fused": (Optional[bool], ("EAFT: compute the loss inside the model's forward from the last hidden states and "
                                    "the LM head, never building the logits (Llama / Qwen2 / Qwen3; default false)")),
}
TRAINER_FLAGS = ("eaft_log_metrics", "eaft_fused")  # handed to the trainer, not EAFTOptions fields
OPTION_FLAGS = [f for f in FLAGS if f not in TRAINER_FLAGS]


def given_flags(args) -> Dict[str, object]:
    """The --eaft_* flags that were set (not None) on an arguments object."""
    return {f: getattr(args, f, None) for f in FLAGS if getattr(args, f, None) is not None}


def _topk_value(value):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def options_from_flags(flags: Dict[str, object]) -> EAFTOptions:
    """Validated EAFTOptions from --eaft_* values; a bad value raises ValueError naming its flag."""
    values = {}
    for flag in OPTION_FLAGS:
        if flags.get(flag) is None:
            continue
        name = flag[len("eaft_"):]
        value = _topk_value(flags[flag]) if name == "topk" else flags[flag]
        try:
            EAFTOptions(**{name: value})
        except ValueError as exc:
            raise ValueError(f"--{flag} {flags[flag]!r} is invalid: {exc}") from None
        values[name] = value
    return EAFTOptions(**values)


def check_arguments(args) -> Optional[EAFTOptions]:
    """Refuse settings under which EAFT would not be applied; return the options (None: EAFT off)."""
    flags = given_flags(args)
    loss_type = getattr(args, "loss_type", None)
    if loss_type != LOSS_TYPE:
        if flags:
            raise ValueError(
                f"{', '.join('--' + f for f in flags)} set but --loss_type is {loss_type!r}: "
                f"EAFT options only apply with --loss_type {LOSS_TYPE}. Add --loss_type {LOSS_TYPE} or drop them."
            )
        return None
    if getattr(args, "rlhf_type", None) is not None:
        raise ValueError(f"--loss_type {LOSS_TYPE} is for sft / pt, not rlhf (--rlhf_type {args.rlhf_type}).")
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
    fused = bool(flags.get("eaft_fused"))
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
    return options_from_flags(flags)


def attach(training_args, options: EAFTOptions, log_metrics: Optional[bool], fused: Optional[bool] = None) -> None:
    """Hand the validated options to the trainer's arguments (read back by the loss)."""
    training_args.eaft_options = options
    training_args.eaft_log_metrics = True if log_metrics is None else bool(log_metrics)
    training_args.eaft_fused = bool(fused)


def extend_sft_arguments(cls) -> None:
    """Add the FLAGS as dataclass fields of `cls` (in place) and validate them in __post_init__."""
    if "eaft_topk" in {f.name for f in dataclasses.fields(cls)}:
        return
    annotations = cls.__dict__.get("__annotations__", {})
    for name, (tp, help_text) in FLAGS.items():
        annotations[name] = tp
        setattr(cls, name, dataclasses.field(default=None, metadata={"help": help_text}))
    cls.__annotations__ = annotations
    # dataclass() never overwrites a method already in the class dict: drop the generated ones.
    for name in ("__init__", "__repr__", "__eq__", "__match_args__"):
        member = cls.__dict__.get(name)
        if member is not None and (name == "__match_args__" or _is_generated(member)):
            delattr(cls, name)
    dataclasses.dataclass(cls)

    original = cls.__post_init__

    def __post_init__(self, *a, **kw):
        options = check_arguments(self)  # before the slow part: bad flags fail fast
        original(self, *a, **kw)
        if options is not None and getattr(self, "training_args", None) is not None:
            attach(self.training_args, options, getattr(self, "eaft_log_metrics", None), getattr(self, "eaft_fused", None))

    __post_init__.__wrapped__ = original
    cls.__post_init__ = __post_init__


def _is_generated(member) -> bool:
    code = getattr(member, "__code__", None)
    return code is not None and (code.co_filename == "<string>" or code.co_filename.endswith("dataclasses.py"))
