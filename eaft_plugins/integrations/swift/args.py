"""`--eaft_*` command-line flags for ms-swift: extra fields on `swift.arguments.SftArguments`.

ms-swift parses `swift sft` / `swift pt` flags with HfArgumentParser over the SftArguments
dataclass and rejects unknown flags, so the EAFT flags must be dataclass fields. They are added
in place, right after `swift.arguments.sft_args` is imported (before PretrainArguments and
RLHFArguments subclass it), so the CLI, YAML configs, args.json and the Python API
(`SftArguments(..., eaft_topk=10)`) all see them. Every field defaults to None ("not set"), so
a flag given without `--loss_type eaft` is an error even when its value equals the default.

`--enable_eaft_loss true [--eaft_alpha A]` is the spelling of the paper's own ms-swift fork: it means
`--loss_type eaft` with the fork's normalisation (top-20 entropy / 3.0, `--eaft_entropy_norm upstream`).

The trainer is built from a separate TrainingArguments copy that drops unknown fields, so the
validated EAFTConfig travels to the loss as `args.training_args.eaft_config`.
"""

from __future__ import annotations

import sys
from typing import Optional

from ...options import METHOD_KEYS, METHODS, SETTINGS_BY_KEY, LossConfig, Spelling, config_from_keys, parse_bool
from ...retention import keys as retention_keys
from .. import adapter

LOSS_TYPE = "eaft"
LOSS_TYPES = tuple(METHODS)  # --loss_type eaft, sft_kl, flow, talr (ms-swift's own DFT: --enable_dft_loss true)
SPELLING = Spelling("--{key}", "--{key} {value}", f"--loss_type {LOSS_TYPE}", method_format="--loss_type {method}")
FORK_FLAG = "enable_eaft_loss"  # the paper's fork
FORK_ENTROPY_NORM = "upstream"  # the fork divides the top-20 entropy by 3.0, as LLaMA-Factory 0.9.5 does


def resolve_fork_flag(args) -> None:
    """`--enable_eaft_loss true` -> `--loss_type eaft` (+ the fork's normalisation unless given). Refused with
    another --loss_type. When ms-swift defines the flag itself, its own EAFT runs (said once), never both."""
    value = getattr(args, FORK_FLAG, None)
    if value is None or not parse_bool(value, f"--{FORK_FLAG}"):
        return
    loss_type = getattr(args, "loss_type", None)
    if FORK_FLAG in getattr(type(args), "__eaft_upstream__", ()):
        if loss_type == LOSS_TYPE:
            raise ValueError(f"--{FORK_FLAG} true (ms-swift's own EAFT) with --loss_type {LOSS_TYPE} (eaft-plugins): "
                             "EAFT would be applied twice; keep one")
        print(f"[eaft-plugins] --{FORK_FLAG} true: ms-swift's own EAFT runs, not eaft-plugins' (use --loss_type "
              f"{LOSS_TYPE} for the latter)", file=sys.stderr)
        return
    if loss_type not in (None, LOSS_TYPE):
        raise ValueError(f"--{FORK_FLAG} true (the EAFT fork's flag) with --loss_type {loss_type}: both choose the "
                         f"loss; drop one (--{FORK_FLAG} true means --loss_type {LOSS_TYPE})")
    args.loss_type = LOSS_TYPE
    if getattr(args, "eaft_entropy_norm", None) is None:
        args.eaft_entropy_norm = FORK_ENTROPY_NORM


def check_arguments(args) -> Optional[LossConfig]:
    """Refuse settings under which the loss method would not be applied; return the config (None: none of ours)."""
    resolve_fork_flag(args)
    given = adapter.given_method_keys(args)
    loss_type = getattr(args, "loss_type", None)
    method = loss_type if loss_type in LOSS_TYPES else None
    rlhf_type = getattr(args, "rlhf_type", None)
    if rlhf_type is not None and (method is not None or given):
        title = METHODS[method or SETTINGS_BY_KEY[next(iter(given))].method].title  # the flags' method
        shown = [f"--loss_type {method}"] if method is not None else []
        raise ValueError(f"{', '.join(shown + [SPELLING.shown(k) for k in given])}: {title} is for `swift sft` / "
                         f"`swift pt`, not rlhf (--rlhf_type {rlhf_type}); drop the {title} flags.")
    adapter.refuse_keys_of_other_methods(given, method, SPELLING, f"--loss_type is {loss_type!r}")
    if method is None:
        return None
    config = config_from_keys({k: getattr(args, k, None) for k in METHOD_KEYS[method]}, SPELLING, method)
    # Without --eaft_fused, ms-swift pops the labels before the forward (a loss_type is set), so Liger's fused
    # linear cross-entropy never runs: the full logits are built anyway, and its loss-only evaluation fails.
    seen = observed(args)
    if method == "flow":
        seen += [("packing", "packing", getattr(args, "packing", False)),
                 ("packing", "padding_free", getattr(args, "padding_free", False))]
    adapter.refuse(SPELLING.for_method(method), seen, config.fused)
    return config


def observed(args, sequence_parallel_size=None) -> list:
    """ms-swift's keys that the refusal table (adapter.REFUSALS) looks at."""
    size = sequence_parallel_size if sequence_parallel_size is not None else getattr(args, "sequence_parallel_size", 1)
    return [("other_loss", "enable_dft_loss", getattr(args, "enable_dft_loss", False)),
            ("label_smoothing", "label_smoothing_factor", getattr(args, "label_smoothing_factor", 0)),
            ("parallel", "sequence_parallel_size", size),
            ("liger", "use_liger_kernel", getattr(args, "use_liger_kernel", False)),
            ("channel_loss", "enable_channel_loss", getattr(args, "enable_channel_loss", False))]


def check_retention(args) -> bool:
    """--retention_probe / --retention_steps (any --loss_type): validated here; True when the monitor is on."""
    on = retention_keys.check_keys(getattr(args, "retention_probe", None), getattr(args, "retention_steps", None),
                                   SPELLING)
    if on and type(args).__name__.startswith("Megatron"):
        raise ValueError("--retention_probe is not supported by `megatron sft` (the monitor runs on the transformers "
                         "Trainer of `swift sft`); drop it, or measure retention afterwards with eaft-repro "
                         "(docs/retention.md)")
    if on and getattr(args, "rlhf_type", None) is not None:
        raise ValueError(f"--retention_probe is for `swift sft` / `swift pt`, not rlhf (--rlhf_type {args.rlhf_type}); "
                         "drop it")
    return on


def extend_sft_arguments(cls, check=check_arguments) -> bool:
    """Our flags (EAFT, retention, the fork's --enable_eaft_loss) as fields of `cls` (in place), checked in
    __post_init__ by `check` (before ms-swift's own, slower set-up); the config is handed to the trainer's copy."""
    have = {name for name in getattr(cls, "__dataclass_fields__", {})}
    extra = {} if FORK_FLAG in have else {FORK_FLAG: (Optional[str], f"the EAFT fork's spelling of --loss_type "
                                                      f"{LOSS_TYPE} (top-20 entropy / 3.0): true or false")}
    if FORK_FLAG in have:
        cls.__eaft_upstream__ = (FORK_FLAG,)
    if not adapter.add_setting_fields(cls, SPELLING, extra=extra, framework="ms-swift"):
        return False

    def make(original):
        def __post_init__(self, *a, **kw):
            config = check(self)  # before the slow part: bad flags fail fast
            retention = check_retention(self)
            original(self, *a, **kw)
            training_args = getattr(self, "training_args", None)
            if training_args is not None:  # the trainer's TrainingArguments copy drops unknown fields: hand over
                training_args.eaft_config = config
                if retention:
                    training_args.retention_probe = self.retention_probe
                    training_args.retention_steps = self.retention_steps
            self.eaft_config = config

        return __post_init__

    adapter.patch_method(cls, "__post_init__", make)
    return True
