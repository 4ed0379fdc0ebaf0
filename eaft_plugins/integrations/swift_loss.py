"""`--loss_type eaft` for ms-swift's Seq2SeqTrainer: the object registered as loss_map['eaft'].

The trainer calls it as `loss(outputs, labels, num_items_in_batch=..., loss_scale=..., trainer=...)`
with unshifted labels. When ms-swift's per-token `loss_scale` is present, Seq2SeqTrainer has already
rolled it by one position and flattened it (`torch.roll(loss_scale, -1, -1).view(-1)`), i.e. it is
aligned with the shifted labels, as in swift's own CustomCrossEntropyLoss; so the labels are shifted
here and the core is called with shift=False.
"""

from __future__ import annotations

import dataclasses

from swift.loss.base import BaseLoss

from ..loss import eaft_loss, shift_labels
from ..options import EAFTOptions
from ..stats import StatsAccumulator
from .swift_args import LOSS_TYPE

METRIC_KEYS = ("eaft/ce", "eaft/weight", "eaft/entropy", "eaft/conflict_frac")


class EAFTLoss(BaseLoss):
    """EAFT for `swift sft --loss_type eaft`; options come from the --eaft_* flags (see swift_args)."""

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        if self.is_megatron:
            raise ValueError("this EAFT loss is for `swift sft`; `megatron sft` has its own wiring (docs/megatron.md)")
        self.options: EAFTOptions = getattr(args, "eaft_options", None) or EAFTOptions()
        self.log_metrics = bool(getattr(args, "eaft_log_metrics", True))
        self.mean_weight = None  # weight_norm="mean": global mean raw weight of the previous optimizer step
        self._step = None
        self._step_raw = StatsAccumulator()
        self._logs = {}
        if trainer is None:
            return
        task_type = getattr(trainer, "task_type", "causal_lm")
        if task_type != "causal_lm":
            raise ValueError(f"--loss_type {LOSS_TYPE} needs --task_type causal_lm, got {task_type!r}")
        _check_sequence_parallel(trainer)
        if self.log_metrics:
            for mode in ("train", "eval"):
                log = self._logs[mode] = _MetricLog(args)
                for key in METRIC_KEYS:  # on every rank, so the ranks' metric keys always agree
                    trainer.custom_metrics[mode][key] = _Metric(log, key)

    def __call__(self, outputs, labels, *, num_items_in_batch=None, loss_scale=None, **kwargs):
        trainer = kwargs.get("trainer") or self.trainer
        logits = getattr(outputs, "logits", outputs)
        if logits is None:
            raise ValueError(
                f"--loss_type {LOSS_TYPE} needs the model's logits, but the forward pass returned none "
                "(e.g. a fused Liger loss); drop --use_liger_kernel."
            )
        if trainer is not None:
            _check_sequence_parallel(trainer)
        opts = self.options
        labels = shift_labels(labels, opts.ignore_index)
        token_scale = None if loss_scale is None else loss_scale.reshape(labels.shape)  # already shifted
        training = trainer is not None and trainer.model.training
        track = training and opts.weight_norm == "mean"
        if track:
            self._start_step(trainer.state.global_step, logits.device)
        out = eaft_loss(
            logits,
            labels,
            options=opts,
            num_items_in_batch=num_items_in_batch,
            shift=False,
            mean_weight=self.mean_weight,
            token_scale=token_scale,
        )
        if track:
            self._step_raw.add(self._raw_stats(out.stats, logits, labels))
        if self._logs and trainer is not None:
            self._logs["train" if training else "eval"].acc.add(out.stats)
        return out.loss

    def _start_step(self, step, device):
        """At the first micro-batch of an optimizer step, turn the last step's raw sums into mean_weight.

        Every rank runs the same micro-batches, so every rank joins this all-reduce.
        """
        if step == self._step:
            return
        if self._step is not None:
            raw = self._step_raw.pop(device=device)
            if float(raw.tokens) > 0 and float(raw.weight_sum) > 0:
                self.mean_weight = float(raw.weight_sum) / float(raw.tokens)
        self._step = step

    def _raw_stats(self, stats, logits, labels):
        """This micro-batch's stats with the weights before weight_norm (to average over the step)."""
        if self.mean_weight is not None:  # the core divided every weight by mean_weight (> 0)
            return dataclasses.replace(stats, weight_sum=stats.weight_sum * self.mean_weight)
        # First step: the core divided by this micro-batch's own mean; one extra no-grad pass gets the raw sums.
        return eaft_loss(logits.detach(), labels, options=self.options.replace(weight_norm="none"), shift=False).stats


def _check_sequence_parallel(trainer) -> None:
    template = getattr(trainer, "template", None)
    size = getattr(template, "sequence_parallel_size", 1) or 1
    if size > 1:
        raise ValueError(
            f"--loss_type {LOSS_TYPE} does not support sequence parallel (sequence_parallel_size={size}); "
            "set --sequence_parallel_size 1."
        )


class _MetricLog:
    """EAFT stats of one mode since the last log; reduced over ranks once per log, read by four keys."""

    def __init__(self, args):
        self.acc = StatsAccumulator()
        self._args = args
        self._means = None
        self._unread = set()

    def value(self, key):
        # ms-swift computes every metric key, in sorted order, on every rank at each log: the first
        # EAFT key of a round does the (collective) reduction, the other three read its result.
        if key not in self._unread:
            stats = self.acc.pop(device=self._args.device)
            self._means = stats.means() if float(stats.tokens) > 0 else None
            self._unread = set(METRIC_KEYS)
        self._unread.discard(key)
        return None if self._means is None else self._means[key]


class _Metric:
    """What ms-swift's `custom_metrics` needs of a metric: compute() and reset() (None is not logged)."""

    def __init__(self, log: _MetricLog, key: str):
        self.log = log
        self.key = key

    def compute(self):
        return self.log.value(self.key)

    def reset(self):
        pass
