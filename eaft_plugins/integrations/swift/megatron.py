"""EAFT for ms-swift's Megatron trainer: `megatron sft --loss_type eaft [--eaft_* ...]` (also `megatron pt`).

In ms-swift 4.6 the Megatron model returns per-token cross-entropy: mcore_bridge's GPTModel (a
megatron-core GPTModel) calls `LanguageModule.compute_language_model_loss(labels, logits)` on the
last pipeline stage, with vocab-parallel logits [s, b, V/tp] (sequence-parallel already
gathered; with context parallel each CP rank holds its own slice of the sequence), and the
trainer's `loss_func` only masks, applies DFT / loss_scale and sums. So EAFT goes exactly there:

* `megatron.core...language_module.LanguageModule.compute_language_model_loss` is wrapped: for a model
  that carries an EAFTRun (`model.eaft_run`, set by the trainer) it returns the per-token w_t * ce_t from
  `vocab_parallel_eaft_loss` over the tensor-parallel group (exact global top-K, O(K*tp) values exchanged
  per token) instead of Megatron's CE kernel. Both CE paths (unfused and `--cross_entropy_loss_fusion`,
  native or TE) are replaced, so Megatron's in-place fp32 CE never runs on the logits EAFT reads.
* `swift.megatron.arguments.sft_args.MegatronSftArguments` gets the same `--eaft_*` flags as
  `swift sft` (.args) and refuses combinations where EAFT would not apply.
* `swift.megatron.trainers.trainer.MegatronTrainer`: its __init__ builds the trainer's EAFTRun (the one
  trainer core of every framework) and gives it to each model chunk; `train_step` tells it the step (the
  weight_norm divisor is the previous step's global mean, as everywhere); `loss_func` adds eaft/* metrics.

Per-token weights only need the token's own logits, so pipeline parallel (loss on the last
stage only) and context parallel (each CP rank weights its own tokens) need nothing more. The run's
collectives go over the data-parallel (with context-parallel) group: the statistics are the same on
every tensor-parallel rank, and only the last pipeline stage computes them.
"""

from __future__ import annotations

from typing import Optional

from ...hooks import when_imported
from ...activation import guarded, record_patch
from ...options import EAFTConfig
from ...run import EAFTRun, metric_pairs
from .. import adapter
from .args import LOSS_TYPE, LOSS_TYPES, SPELLING, check_arguments, extend_sft_arguments

NAME = "swift"
LANGUAGE_MODULE = "megatron.core.models.common.language_module.language_module"
MEGATRON_SFT_ARGS = "swift.megatron.arguments.sft_args"
MEGATRON_TRAINER = "swift.megatron.trainers.trainer"


# ---- the loss -------------------------------------------------------------------------------


def check_model_config(config) -> None:
    """Model settings under which the wrapped loss would not be plain EAFT."""
    if getattr(config, "mtp_num_layers", None):
        raise ValueError(
            "EAFT (--loss_type eaft) does not support multi-token prediction: the MTP heads call the same "
            "loss and would be EAFT-weighted too. Unset --mtp_num_layers."
        )


def tensor_parallel_group(model):
    pg = getattr(model, "pg_collection", None)
    group = getattr(pg, "tp", None) if pg is not None else None
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


def eaft_language_model_loss(model, run: EAFTRun, labels, logits):
    """Per-token EAFT loss [b, s] from labels [b, s] and vocab-parallel logits [s, b, V/tp]; statistics to `run`."""
    from ...ops.vocab_parallel import vocab_parallel_eaft_loss

    check_model_config(model.config)
    vocab_size = getattr(model, "vocab_size", None)  # Megatron's padded vocabulary: known only here
    if vocab_size is not None:
        run.check_vocab_size(int(vocab_size))
    mean_weight = run.begin(model.training, run.step, logits.device)
    # Megatron's data loader has shifted the labels already.
    out = vocab_parallel_eaft_loss(logits, labels.transpose(0, 1), group=tensor_parallel_group(model),
                                   options=run.options, reduction="none", shift=False, mean_weight=mean_weight)
    run.record(out.stats, model.training)
    return out.loss.transpose(0, 1).contiguous()


def attach(models, run: Optional[EAFTRun]) -> None:
    """Give each model chunk (a LanguageModule) the trainer's run; None turns EAFT off for them."""
    for model in models:
        model.eaft_run = run


def _patch_language_module(module) -> None:
    def make(original):
        def compute_language_model_loss(self, labels, logits, *args, **kwargs):
            run = getattr(self, "eaft_run", None)
            if run is None:
                return original(self, labels, logits, *args, **kwargs)
            if args or kwargs:
                raise ValueError(
                    "EAFT wraps compute_language_model_loss(labels, logits) of megatron-core 0.16; this megatron-core "
                    f"passes more arguments ({len(args)} positional, {sorted(kwargs)}): unsupported version"
                )
            return eaft_language_model_loss(self, run, labels, logits)

        return compute_language_model_loss

    if adapter.patch_method(module.LanguageModule, "compute_language_model_loss", make):
        record_patch(NAME, "megatron: LanguageModule.compute_language_model_loss (vocab-parallel EAFT)")


# ---- arguments ------------------------------------------------------------------------------


def configure(args) -> Optional[EAFTConfig]:
    """Validate `megatron sft/pt` arguments; the EAFTConfig (None: EAFT off)."""
    loss_type = getattr(args, "loss_type", None)
    if loss_type in LOSS_TYPES and loss_type != LOSS_TYPE:
        raise ValueError(f"--loss_type {loss_type} is not wired into `megatron sft` (eaft-plugins runs only EAFT on "
                         f"Megatron's vocab-parallel logits); run {loss_type} with `swift sft` (docs/swift.md)")
    if loss_type == LOSS_TYPE:
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
    return config


def _extend_megatron_arguments(module) -> None:
    if extend_sft_arguments(module.MegatronSftArguments, check=configure):
        record_patch(NAME, "megatron: MegatronSftArguments --loss_type eaft, --eaft_* flags")


# ---- the trainer ----------------------------------------------------------------------------


def bind(trainer, models, group=None) -> Optional[EAFTRun]:
    """The trainer's EAFTRun from its arguments (None when --loss_type is not eaft), given to its model chunks."""
    args = trainer.args
    if getattr(args, "loss_type", None) != LOSS_TYPE or getattr(args, "rlhf_type", None) is not None:
        return None
    run = adapter.run_for(args, SPELLING)
    run.group = group
    attach(models, run)
    trainer._eaft = run
    return run


def loss_metrics(trainer, result, device):
    """After MegatronTrainer.loss_func: eaft/* as [sum, tokens] pairs (ms-swift adds them over micro-batches)."""
    run = getattr(trainer, "_eaft", None)
    if run is None:
        return result
    stats = run.take(trainer.unwrapped_models[0].training, device)  # reduced over the run's group
    if not run.log_metrics:
        return result
    import torch

    loss, num_tokens, metrics = result
    metrics.update({key: torch.stack([total, tokens]).to(device=device, dtype=torch.float32)
                    for key, (total, tokens) in metric_pairs(stats).items()})
    return loss, num_tokens, metrics


def _patch_trainer(module) -> None:
    def make_init(original):
        def __init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            from megatron.core import mpu

            bind(self, self.unwrapped_models, mpu.get_data_parallel_group(with_context_parallel=True))

        return __init__

    def make_train_step(original):
        def train_step(self, *args, **kwargs):
            run = getattr(self, "_eaft", None)
            if run is not None:
                run.step = self.state.iteration
            return original(self, *args, **kwargs)

        return train_step

    def make_loss_func(original):
        def loss_func(self, output_tensor, *args, **kwargs):
            return loss_metrics(self, original(self, output_tensor, *args, **kwargs), output_tensor.device)

        return loss_func

    cls = module.MegatronTrainer
    patched = [adapter.patch_method(cls, name, make) for name, make in
               (("__init__", make_init), ("train_step", make_train_step), ("loss_func", make_loss_func))]
    if any(patched):
        record_patch(NAME, "megatron: MegatronTrainer (EAFTRun per trainer, eaft/* metrics)")


# ---- activation -----------------------------------------------------------------------------


def activate() -> None:
    """Arm the hooks; each patch happens when ms-swift / megatron-core imports the module."""
    when_imported(LANGUAGE_MODULE, guarded(NAME, "megatron: wrapping compute_language_model_loss",
                                                      _patch_language_module))
    when_imported(MEGATRON_SFT_ARGS, guarded(NAME, "megatron: adding --eaft_* to MegatronSftArguments",
                                                        _extend_megatron_arguments))
    when_imported(MEGATRON_TRAINER, guarded(NAME, "megatron: adding eaft/* metrics", _patch_trainer))
