"""`--loss_type eaft` for ms-swift's Seq2SeqTrainer: the object registered as loss_map['eaft'] (and as
loss_map['sft_kl'], ['flow'], ['talr']: the same object runs whichever method --loss_type chose).

The trainer calls it as `loss(outputs, labels, num_items_in_batch=..., loss_scale=..., trainer=...)`
with unshifted labels. When ms-swift's per-token `loss_scale` is present, Seq2SeqTrainer has already
rolled it by one position and flattened it (`torch.roll(loss_scale, -1, -1).view(-1)`), i.e. it is
aligned with the shifted labels, as in swift's own CustomCrossEntropyLoss; so the labels are shifted
here and the core is called with shift=False.

`--eaft_fused true`: the loss object is still created here (ms-swift builds it before the trainer
has its model), then `bind_trainer` runs at the end of Seq2SeqTrainer.__init__ (a hook installed by
the swift integration): it patches the model's forward with `patch_model_for_fused_eaft` (clear
ValueError for unsupported models, before training) and gives that trainer instance a
`compute_loss` that calls the model with the labels, so the EAFT loss comes from the hidden states
and the LM head and no logits are built (see `_FusedComputeLoss`).
"""

from __future__ import annotations

import sys

from swift.loss.base import BaseLoss

from ...activation import record_error, record_patch
from ...ops.common import shift_labels
from ...run import EAFTRun, metric_names, metric_values
from .. import adapter, methods
from .args import LOSS_TYPE, LOSS_TYPES, SPELLING, observed

METRIC_KEYS = metric_names("train")  # EAFT's; a run of another method logs metric_names("train", run.method)


class EAFTLoss(BaseLoss):
    """EAFT for `swift sft --loss_type eaft`; the config comes from the --eaft_* flags (see .args).

    The per-trainer state (weight_norm divisor, statistics, fused handle) is an EAFTRun, shared in
    shape and rules with every other integration.
    """

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        if self.is_megatron:
            raise ValueError("this EAFT loss is for `swift sft`; `megatron sft` has its own wiring (docs/megatron.md)")
        self.run = adapter.run_for(args, SPELLING)
        self.fused_requested = self.run.config.fused
        self.run.router_aux = False  # ms-swift adds its router loss itself (dense) / _FusedComputeLoss (fused)
        if trainer is None:
            return
        task_type = getattr(trainer, "task_type", "causal_lm")
        if task_type != "causal_lm":
            raise ValueError(f"--loss_type {self.run.method} needs --task_type causal_lm, got {task_type!r}")
        _check_sequence_parallel(trainer, self.fused_requested, args, self.run.spelling)
        if self.log_metrics:
            for mode in ("train", "eval"):
                log = _MetricLog(self.run, mode, args)
                for key in metric_names("train", self.run.method):  # on every rank: the ranks' metric keys agree
                    trainer.custom_metrics[mode][key] = _Metric(log, key)

    options = property(lambda self: self.run.options)
    log_metrics = property(lambda self: self.run.log_metrics)
    fused = property(lambda self: self.run.fused)
    mean_weight = property(lambda self: self.run.mean_weight)

    def __call__(self, outputs, labels, *, num_items_in_batch=None, loss_scale=None, **kwargs):
        trainer = kwargs.get("trainer") or self.trainer
        if self.fused_requested and trainer is not None:
            key = f"{self.run.method}_fused"
            raise RuntimeError(
                f"{SPELLING.assign(key, True)} is set, but the trainer computed the loss from the logits: "
                f"the fused {self.run.title} path was not installed on this trainer (run `python -m eaft_plugins "
                f"doctor`); never falling back to the dense loss silently. Drop {SPELLING.shown(key)} or fix the "
                "installation."
            )
        logits = getattr(outputs, "logits", outputs)
        if trainer is not None:
            _check_sequence_parallel(trainer, False, spelling=self.run.spelling)
        labels = shift_labels(labels, self.options.ignore_index)
        token_scale = None if loss_scale is None else loss_scale.reshape(labels.shape)  # already shifted
        training = trainer is not None and trainer.model.training
        step = trainer.state.global_step if trainer is not None else 0
        return self.run.dense_loss(logits, labels, training=training, step=step, num_items_in_batch=num_items_in_batch,
                                   shift=False, token_scale=token_scale)

    def bind_trainer(self, trainer) -> None:
        """At the end of Seq2SeqTrainer.__init__ (model set, no step taken): check the top-K against the
        vocabulary, set up what SFT-KL / FLOW need of the starting model, and with --<method>_fused patch the model
        and the trainer's compute_loss.

        Raises ValueError, before any training step, for what cannot be honoured.
        """
        self.run.check_vocab(trainer.model)
        if getattr(trainer, "_eaft_bound", None) is self:
            return
        trainer._eaft_bound = self
        methods.bind(trainer, self.run)
        if not self.fused_requested:
            if self.run.needs_inputs:
                trainer.compute_loss = _Prepared(self.run, trainer, trainer.compute_loss)
            return
        _check_sequence_parallel(trainer, True, spelling=self.run.spelling)  # and the channel loss (needs logits)
        from swift.template import Template

        own = getattr(type(trainer.template), "compute_sft_loss", None)
        if own is not None and own is not Template.compute_sft_loss:
            raise ValueError(
                f"{SPELLING.assign(f'{self.run.method}_fused', True)}: the template {type(trainer.template).__name__} "
                f"computes its own loss (compute_sft_loss), which the fused path would bypass; drop "
                f"{SPELLING.shown(f'{self.run.method}_fused')}."
            )
        # Logits only where an eval metric consumes them (under no_grad), never for training.
        self.run.patch_fused(trainer.model, keep_logits=trainer.compute_metrics is not None)
        trainer.compute_loss = _FusedComputeLoss(self, trainer)


class _Prepared:
    """Seq2SeqTrainer.compute_loss for SFT-KL and FLOW (dense): the run sees the batch before the forward."""

    def __init__(self, run: EAFTRun, trainer, compute_loss):
        self.run, self.trainer, self.compute_loss = run, trainer, compute_loss

    def __call__(self, model, inputs, *args, **kwargs):
        self.run.prepare(self.trainer.model, inputs, self.trainer.model.training)
        return self.compute_loss(model, inputs, *args, **kwargs)


class _FusedComputeLoss:
    """Seq2SeqTrainer.compute_loss for --eaft_fused, set on the trainer instance by `bind_trainer`.

    What ms-swift's compute_loss does for a loss_type, with the loss computed inside the model's
    forward: the labels (and loss_scale, unshifted, as eaft_token_scale) go to the model with
    num_items_in_batch, the EAFT stats come back on the outputs, then the same aux_loss metric,
    `average_tokens_across_devices` factor and (with logits, eval metrics only) token accuracy.
    """

    def __init__(self, loss: EAFTLoss, trainer):
        self.loss = loss
        self.trainer = trainer

    def __call__(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        trainer, eaft = self.trainer, self.loss
        inputs.pop("compute_loss_func", None)
        loss_scale = inputs.pop("loss_scale", None)  # aligned with the unshifted labels (swift rolls it later)
        text_position_ids = inputs.pop("text_position_ids", None)
        if text_position_ids is None:
            text_position_ids = inputs.get("position_ids")
        inputs.pop("channel", None)
        inputs.pop("skip_logits", None)  # Trainer.prediction_step's Liger flag: this forward never builds logits anyway
        if eaft.run.needs_inputs:
            eaft.run.prepare(trainer.model, inputs, trainer.model.training)
        labels = inputs.pop("labels", None)
        _check_sequence_parallel(trainer, True, spelling=eaft.run.spelling)
        training = trainer.model.training
        mode = "train" if training else "eval"
        outputs = eaft.run.fused_forward(
            training, trainer.state.global_step, None if labels is None else labels.device, labels,
            lambda: model(**inputs, labels=labels, num_items_in_batch=num_items_in_batch, eaft_token_scale=loss_scale))
        if getattr(outputs, "aux_loss", None) is not None:
            trainer.custom_metrics[mode]["aux_loss"].update(outputs.aux_loss)
        if getattr(trainer.args, "past_index", -1) >= 0:
            trainer._past = outputs[trainer.args.past_index]
        loss = outputs.loss
        aux = outputs.get("aux_loss")
        coef = getattr(trainer.args, "router_aux_loss_coef", None)
        moe = getattr(getattr(trainer.model, "model_info", None), "is_moe_model", False)
        if aux is not None and coef is not None and moe:
            # ms-swift's compute_loss adds this after a loss function; the fused forward left it out
            if num_items_in_batch is not None:
                aux = aux * ((labels[:, 1:] != -100).sum() / num_items_in_batch)
            loss = loss + coef * aux.to(loss.device)
        if (getattr(trainer.args, "average_tokens_across_devices", False) and trainer.model_accepts_loss_kwargs
                and num_items_in_batch is not None):
            loss = loss * trainer.accelerator.num_processes
        if outputs.logits is not None and trainer.args.tuner_backend != "unsloth":
            cu_seqlens = None
            if trainer.template.padding_free and trainer.args.acc_strategy == "seq":
                cu_seqlens = trainer.get_cu_seqlens(text_position_ids, inputs.get("logits_to_keep"))
            trainer._compute_acc(outputs, labels, cu_seqlens=cu_seqlens)
        return (loss, outputs) if return_outputs else loss


def _check_sequence_parallel(trainer, fused: bool, args=None, spelling=SPELLING) -> None:
    """What the trainer really runs (its template's sequence parallel size), through the refusal table."""
    size = getattr(getattr(trainer, "template", None), "sequence_parallel_size", 1) or 1
    args = args if args is not None else trainer.args
    adapter.refuse(spelling, [entry for entry in observed(args, size) if entry[0] in ("parallel", "channel_loss")],
                   fused)


class _MetricLog:
    """One mode's EAFT metrics: reduced over ranks once per log round, read by four keys."""

    def __init__(self, run: EAFTRun, mode: str, args):
        self.run, self.mode, self._args = run, mode, args
        self._values = {}
        self._unread = set()

    def value(self, key):
        # ms-swift computes every metric key, in sorted order, on every rank at each log: the first
        # EAFT key of a round does the (collective) reduction, the other three read its result.
        # ms-swift adds the eval_ prefix itself, so both modes use the train names.
        if key not in self._unread:
            self._values = metric_values(self.run.acc[self.mode].pop(device=self._args.device), "train",
                                         self.run.method)
            self._unread = set(metric_names("train", self.run.method))
        self._unread.discard(key)
        return self._values.get(key)  # None (not logged) when no token was supervised


class _Metric:
    """What ms-swift's `custom_metrics` needs of a metric: compute() and reset() (None is not logged)."""

    def __init__(self, log: _MetricLog, key: str):
        self.log = log
        self.key = key

    def compute(self):
        return self.log.value(self.key)

    def reset(self):
        pass


def register(mapping) -> None:
    """loss_map['eaft'] (and 'sft_kl', 'flow', 'talr') = EAFTLoss, unless something else holds that name (recorded,
    left as is)."""
    for loss_type in LOSS_TYPES:
        existing = mapping.loss_map.get(loss_type)
        if existing is not None and existing is not EAFTLoss:
            record_error("swift", f"swift.loss.mapping.loss_map[{loss_type!r}] already holds {existing!r}; left as is")
            continue
        mapping.loss_map[loss_type] = EAFTLoss
        record_patch("swift", f"swift.loss.mapping.loss_map[{loss_type!r}] = EAFTLoss")


register(sys.modules["swift.loss.mapping"])  # imported by `swift.loss.base` above
