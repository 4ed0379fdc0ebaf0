"""EAFT for ms-swift's Megatron trainer: `megatron sft --loss_type eaft [--eaft_* ...]` (also `megatron pt`).

In ms-swift 4.6 the Megatron model returns per-token cross-entropy: mcore_bridge's GPTModel (a
megatron-core GPTModel) calls `LanguageModule.compute_language_model_loss(labels, logits)` on the
last pipeline stage, with vocab-parallel logits [s, b, V/tp] (sequence-parallel already
gathered; with context parallel each CP rank holds its own slice of the sequence), and the
trainer's `loss_func` only masks, applies DFT / loss_scale and sums. So EAFT goes exactly there:

* `megatron.core...language_module.LanguageModule.compute_language_model_loss` is wrapped: with
  EAFT on it returns the per-token w_t * ce_t from `vocab_parallel_eaft_loss` over the
  tensor-parallel group (exact global top-K, O(K*tp) values exchanged per token) instead of
  Megatron's CE kernel. Both CE paths (unfused and `--cross_entropy_loss_fusion`, native or TE)
  are replaced, so Megatron's in-place fp32 CE never runs on the logits EAFT reads.
* `swift.megatron.arguments.sft_args.MegatronSftArguments` gets the same `--eaft_*` flags as
  `swift sft` (.args) and refuses combinations where EAFT would not apply.
* `swift.megatron.trainers.trainer.MegatronTrainer.loss_func` adds eaft/* metrics.

Per-token weights only need the token's own logits, so pipeline parallel (loss on the last
stage only) and context parallel (each CP rank weights its own tokens) need nothing more.
"""

from __future__ import annotations

import functools
import sys
from typing import Optional

from ... import _bootstrap
from ...activation import record_error, record_patch
from ...options import EAFTConfig, EAFTOptions, make_options
from ...run import EAFTRun, metric_names
from ...stats import EAFTStats

NAME = "swift"
LANGUAGE_MODULE = "megatron.core.models.common.language_module.language_module"
MEGATRON_SFT_ARGS = "swift.megatron.arguments.sft_args"
MEGATRON_TRAINER = "swift.megatron.trainers.trainer"
METRIC_KEYS = metric_names("train")

# Megatron builds the model far from the trainer object, so the process holds the run: set by the
# parsed arguments (or enable()); None: EAFT off.
_run: Optional[EAFTRun] = None
_last_stats: Optional[EAFTStats] = None  # from the model's forward, read by the trainer's loss_func


def enable(options=None, log_metrics: bool = True, **overrides) -> EAFTOptions:
    """Turn EAFT on for every Megatron language-model loss of this process."""
    global _run
    from .args import SPELLING

    _run = EAFTRun(EAFTConfig(make_options(options, **overrides), log_metrics=log_metrics), SPELLING)
    return _run.options


def disable() -> None:
    global _run, _last_stats
    _run, _last_stats = None, None


def enabled_options() -> Optional[EAFTOptions]:
    return _run.options if _run is not None else None


def pop_stats() -> Optional[EAFTStats]:
    global _last_stats
    stats, _last_stats = _last_stats, None
    return stats


# ---- the loss -------------------------------------------------------------------------------


def check_model_config(config) -> None:
    """Model settings under which the wrapped loss would not be plain EAFT."""
    if getattr(config, "mtp_num_layers", None):
        raise ValueError(
            "EAFT (--loss_type eaft) does not support multi-token prediction: the MTP heads call the same "
            "loss and would be EAFT-weighted too. Unset --mtp_num_layers."
        )


def _check_vocab(vocab_size) -> None:
    """The first point where Megatron's (padded) vocabulary size is known: name the flag, not a top-k error."""
    if vocab_size is not None:
        _run.check_vocab_size(int(vocab_size))


def eaft_language_model_loss(model, labels, logits):
    """Per-token EAFT loss [b, s] from labels [b, s] and vocab-parallel logits [s, b, V/tp]."""
    global _last_stats
    from ...ops.vocab_parallel import vocab_parallel_eaft_loss

    check_model_config(model.config)
    _check_vocab(getattr(model, "vocab_size", None))
    pg = getattr(model, "pg_collection", None)
    group = getattr(pg, "tp", None) if pg is not None else None
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    # Megatron's data loader has shifted the labels already.
    out = vocab_parallel_eaft_loss(logits, labels.transpose(0, 1), group=group, options=_run.options, reduction="none",
                                   shift=False)
    _last_stats = out.stats
    return out.loss.transpose(0, 1).contiguous()


def _patch_language_module(module) -> None:
    cls = module.LanguageModule
    original = cls.compute_language_model_loss
    if getattr(original, "__eaft_original__", None) is not None:
        return

    @functools.wraps(original)
    def compute_language_model_loss(self, labels, logits, *args, **kwargs):
        if _run is None:
            return original(self, labels, logits, *args, **kwargs)
        if args or kwargs:
            raise ValueError(
                "EAFT wraps compute_language_model_loss(labels, logits) of megatron-core 0.16; this megatron-core "
                f"passes more arguments ({len(args)} positional, {sorted(kwargs)}): unsupported version"
            )
        return eaft_language_model_loss(self, labels, logits)

    compute_language_model_loss.__eaft_original__ = original
    cls.compute_language_model_loss = compute_language_model_loss
    record_patch(NAME, "megatron: LanguageModule.compute_language_model_loss (vocab-parallel EAFT)")


# ---- arguments ------------------------------------------------------------------------------


def configure(args) -> Optional[EAFTOptions]:
    """Validate `megatron sft/pt` arguments; turn EAFT on (--loss_type eaft) or off. Returns the options."""
    from .args import LOSS_TYPE, check_arguments

    if getattr(args, "loss_type", None) == LOSS_TYPE:
        if getattr(args, "rlhf_type", None) is not None:
            raise ValueError(f"--loss_type {LOSS_TYPE} is for `megatron sft` / `megatron pt`, not `megatron rlhf`.")
        task_type = getattr(args, "task_type", None)
        if task_type not in (None, "causal_lm"):
            raise ValueError(f"--loss_type {LOSS_TYPE} needs --task_type causal_lm, got {task_type!r}")
        if getattr(args, "mtp_num_layers", None):
            raise ValueError(f"--loss_type {LOSS_TYPE} does not support --mtp_num_layers (multi-token prediction).")
    config = check_arguments(args)  # flags without --loss_type eaft, DFT, bad values
    if config is not None and config.fused:
        raise ValueError("--eaft_fused is for `swift sft`: `megatron sft` already computes EAFT on the vocab-parallel "
                         "logits shard by shard (docs/megatron.md); drop --eaft_fused.")
    if config is None:
        disable()
        return None
    return enable(config.options, log_metrics=config.log_metrics)


def _extend_megatron_arguments(module) -> None:
    from .args import FLAGS, extend_sft_arguments

    cls = module.MegatronSftArguments
    extend_sft_arguments(cls)  # the --eaft_* dataclass fields, shared with `swift sft`
    original = cls.__post_init__
    if getattr(original, "__eaft_megatron__", False):
        return

    def __post_init__(self, *a, **kw):
        configure(self)  # before Megatron's slow initialisation: bad flags fail fast
        original(self, *a, **kw)

    __post_init__.__eaft_megatron__ = True
    __post_init__.__wrapped__ = original
    cls.__post_init__ = __post_init__
    record_patch(NAME, f"megatron: MegatronSftArguments --loss_type eaft --{' --'.join(FLAGS)}")


# ---- trainer metrics ------------------------------------------------------------------------


def _patch_trainer(module) -> None:
    cls = module.MegatronTrainer
    original = cls.loss_func
    if getattr(original, "__eaft_original__", None) is not None:
        return

    @functools.wraps(original)
    def loss_func(self, output_tensor, *args, **kwargs):
        result = original(self, output_tensor, *args, **kwargs)
        if _run is None:
            if getattr(self.args, "loss_type", None) == "eaft" and getattr(self.args, "rlhf_type", None) is None:
                raise RuntimeError(
                    "--loss_type eaft is set but EAFT was not enabled (the --eaft_* argument patch did not run); "
                    "see `python -m eaft_plugins doctor`."
                )
            return result
        stats = pop_stats()
        if stats is None:
            raise RuntimeError(
                "--loss_type eaft is set but the model's forward did not compute the EAFT loss "
                "(LanguageModule.compute_language_model_loss was not reached); see `python -m eaft_plugins doctor`."
            )
        if not _run.log_metrics:
            return result
        loss, num_tokens, metrics = result
        metrics.update(stats_metrics(stats, output_tensor.device))
        return loss, num_tokens, metrics

    loss_func.__eaft_original__ = original
    cls.loss_func = loss_func
    record_patch(NAME, "megatron: MegatronTrainer.loss_func (eaft/* metrics)")


def stats_metrics(stats: EAFTStats, device) -> dict:
    """eaft/* as [sum, tokens] pairs summed over data-parallel x context-parallel ranks.

    ms-swift adds such pairs over micro-batches and logs sum / tokens. The stats are identical on
    every tensor-parallel rank, so only the data-parallel (with CP) group is reduced.
    """
    import torch
    from megatron.core import mpu

    vec = stats.to_vector().to(device=device, dtype=torch.float32)
    torch.distributed.all_reduce(vec, group=mpu.get_data_parallel_group(with_context_parallel=True))
    return {key: torch.stack([vec[i], vec[4]]) for i, key in enumerate(METRIC_KEYS)}


# ---- activation -----------------------------------------------------------------------------


def _guarded(what, callback):
    def run(module):
        try:
            callback(module)
        except Exception as exc:  # never break the user's import; doctor shows it
            record_error(NAME, f"megatron: {what}: {exc!r}")
            print(f"[eaft_plugins] megatron: {what} failed: {exc!r}", file=sys.stderr)

    return run


def activate() -> None:
    """Arm the hooks; each patch happens when ms-swift / megatron-core imports the module."""
    _bootstrap.when_imported(LANGUAGE_MODULE, _guarded("wrapping compute_language_model_loss", _patch_language_module))
    _bootstrap.when_imported(MEGATRON_SFT_ARGS, _guarded("adding --eaft_* to MegatronSftArguments", _extend_megatron_arguments))
    _bootstrap.when_imported(MEGATRON_TRAINER, _guarded("adding eaft/* metrics", _patch_trainer))
