"""The trainer side of a loss method (EAFT, SFT-KL, FLOW, TALR), shared by every framework adapter (LLaMA-Factory,
ms-swift, TRL, HF Trainer).

An adapter only translates its framework's hooks into calls on one `EAFTRun` (the run of any method; `LossRun` is
the same class):

    run = EAFTRun(config, spelling)              # when the trainer is built (config.method picks the loss)
    run.check_vocab(model)                       # eaft_topk larger than the vocabulary: stop now
    run.prepare(model, inputs, training)         # SFT-KL / FLOW, before the forward: the starting model's logits,
                                                 # the examples' FLOW weights (run.needs_inputs says whether to call it)
    loss = run.dense_loss(logits, labels, training=..., step=..., outputs=outputs, model=model)   # compute_loss_func
    # or, with eaft_fused: run.patch_fused(model), then per micro-batch
    outputs = run.fused_forward(training, step, device, labels, lambda: model(..., labels=labels))
    run.log(logs, device)                        # at each log (a collective: every rank calls it)

It owns the per-step mean weight of `weight_norm="mean"` (one rule: the divisor is the previous
optimizer step's global mean raw weight, in training and in evaluation; before the first step each
micro-batch divides by its own mean), the train / eval statistics and their cross-rank reduction,
the metric names, and the check that a fused forward really produced statistics. Its collectives run over
`group` (None: every rank; Megatron: the data-parallel group of the ranks that compute the loss).
"""

from __future__ import annotations

from typing import Optional

from .options import METHODS, EAFTConfig, LossConfig, Spelling
from .stats import EAFTStats, MethodStats, StatsAccumulator

METRICS = METHODS["eaft"].metrics  # ce, weight, entropy, conflict_frac
PREFIXES = {"train": "eaft/", "eval": "eval_eaft/"}


def prefix(mode: str = "train", method: str = "eaft") -> str:
    return f"{method}/" if mode == "train" else f"eval_{method}/"


def metric_names(mode: str = "train", method: str = "eaft") -> tuple:
    return tuple(prefix(mode, method) + m for m in METHODS[method].metrics)


def metric_values(stats, mode: str = "train", method: str = "eaft") -> dict:
    """Per-token means of `stats` under the mode's metric names, and the token count (`eaft/tokens`).
    With no supervised token only the count is there: a mean over 0 tokens is not a measurement."""
    means = stats.means(prefix(mode, method))
    keep = metric_names(mode, method) if float(stats.tokens) > 0 else ()
    return {k: v for k, v in means.items() if k in keep or k.endswith("/tokens")}


def metric_pairs(stats: EAFTStats, mode: str = "train") -> dict:
    """{metric name: (sum, tokens)}: the form of frameworks that add pairs over micro-batches (Megatron)."""
    sums = (stats.ce_sum, stats.weight_sum, stats.entropy_sum, stats.conflict_count)
    return {name: (total, stats.tokens) for name, total in zip(metric_names(mode), sums)}


class EAFTRun:
    """Loss state of one trainer: method, options, weight_norm divisor, statistics, fused handle, and what SFT-KL
    (the starting model) and FLOW (the examples' weights) need per micro-batch."""

    def __init__(self, config: LossConfig, spelling: Spelling = Spelling()):
        self.config = config
        self.method = getattr(config, "method", "eaft")
        self.title = METHODS[self.method].title
        self.options = config.options
        self.spelling = spelling.for_method(self.method)
        self.log_metrics = config.log_metrics
        kind = EAFTStats if self.method == "eaft" else MethodStats
        self.acc = {"train": StatsAccumulator(kind), "eval": StatsAccumulator(kind)}
        self.starting_model = None  # SFT-KL: a reference.StartingModel, set by the adapter when the trainer is built
        self.flow_table = None  # FLOW: a reference.FlowTable, filled before the first step
        self._pending = None  # what prepare() measured for the next dense_loss
        self.mean_weight: Optional[float] = None  # weight_norm="mean": the last finished step's global mean
        self._step_acc = StatsAccumulator(kind)
        self._step = None
        self.fused = None  # the FusedEAFT handle once patch_fused ran
        self.group = None  # the process group of the collectives (None: every rank)
        self.step = 0  # the optimizer step, for frameworks that do not pass it (Megatron sets it)
        self._forward = None  # the patched forward, to re-patch when something replaced it
        # Add the MoE router loss (coef * aux_loss) as the model's own forward adds it with labels; False
        # where the framework adds it itself (ms-swift, TRL). HF Trainer never adds it after compute_loss_func.
        self.router_aux = True

    # ---- before training

    def check_vocab(self, model) -> None:
        """A top-K larger than the model's vocabulary stops here, naming the user's key."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        weight = getattr(head, "weight", None)
        if weight is not None and weight.dim() == 2:
            self.check_vocab_size(weight.shape[0])

    def check_vocab_size(self, vocab_size: int) -> None:
        if self.method != "eaft":  # only EAFT's top-K depends on the vocabulary
            return
        try:
            self.options.check_vocab(vocab_size)
        except ValueError as exc:
            raise ValueError(f"{self.spelling.shown('eaft_topk')}: {exc}") from None

    def patch_fused(self, model, keep_logits: bool = False):
        """Patch the model's forward to compute the fused loss (ValueError, naming the key, when it cannot)."""
        from .models import patch_model_for_fused_eaft

        try:
            self.fused = patch_model_for_fused_eaft(model, self.options, keep_logits=keep_logits, method=self.method)
            self.fused.add_aux_loss = self.router_aux
        except ValueError as exc:
            why = str(exc).replace("fused EAFT", f"fused {self.title}")  # the model layer words it for EAFT
            raise ValueError(f"{self._fused_on}: {why}; or set {self.spelling.assign(self._fused_key, False)} "
                             f"({self.title} on the model's logits)") from None
        self.fused.mean_weight = lambda: self.mean_weight
        self._forward = self.fused.model.__dict__["forward"]
        return self.fused

    @property
    def _fused_key(self) -> str:
        return f"{self.method}_fused"

    @property
    def _fused_on(self) -> str:
        return self.spelling.assign(self._fused_key, True)

    @property
    def needs_inputs(self) -> bool:
        """Whether the adapter must call `prepare(model, inputs, training)` before each micro-batch's forward."""
        return self.method in ("sft_kl", "flow")

    def prepare(self, model, inputs, training: bool) -> None:
        """Before a micro-batch's forward: SFT-KL's starting-model logits, FLOW's example weights (the next
        dense_loss, or fused forward, consumes them)."""
        if self.method == "sft_kl":
            if self.starting_model is None:
                raise RuntimeError(f"{self.spelling.enabled}: the starting model was not set up when the trainer "
                                   "was built; see `python -m eaft_plugins doctor`")
            self._pending = self.starting_model.logits(model, inputs)
        elif self.method == "flow":
            if self.flow_table is None:
                raise RuntimeError(f"{self.spelling.enabled}: the examples' starting losses were not measured before "
                                   "the first step; see `python -m eaft_plugins doctor`")
            self._pending = self.flow_table.row_weights(inputs, training)

    def _take_pending(self):
        pending, self._pending = self._pending, None
        if pending is None:
            what = "starting model's logits" if self.method == "sft_kl" else "examples' FLOW weights"
            raise RuntimeError(f"{self.spelling.enabled}: the loss ran without the {what} of its micro-batch (the "
                               "trainer's compute_loss was bypassed); see `python -m eaft_plugins doctor`")
        return pending

    # ---- per micro-batch

    def begin(self, training: bool, step: int, device=None) -> Optional[float]:
        """Before a micro-batch's loss: the weight_norm divisor to use (None: the micro-batch's own mean).

        On the first training micro-batch of a new optimizer step, the previous step's raw sums are
        reduced over ranks (every rank runs the same micro-batches, so all join the collective).
        """
        if training and getattr(self.options, "weight_norm", "none") == "mean" and step != self._step:
            if self._step is not None:
                mean = self._step_acc.pop(group=self.group, device=device).raw_mean_weight
                if mean is not None:
                    self.mean_weight = mean
            self._step = step
        return self.mean_weight

    def record(self, stats, training: bool) -> None:
        self.acc["train" if training else "eval"].add(stats)
        if training and getattr(self.options, "weight_norm", "none") == "mean":
            self._step_acc.add(stats)

    def dense_loss(self, logits, labels, *, training: bool, step: int, device=None, num_items_in_batch=None,
                   shift: bool = True, token_scale=None, outputs=None, model=None):
        """The method's loss on materialised logits, with the statistics recorded; plus the MoE router loss
        when `outputs` (the model's outputs) carry an aux_loss that `model`'s own forward would add."""
        if logits is None:
            fix = (f"set {self._fused_on} where the model supports it, or disable what removed the logits"
                   if METHODS[self.method].fused else "disable what removed the logits")
            raise ValueError(
                f"{self.title} needs the model's logits, but the forward pass returned none (a fused loss kernel such "
                f"as Liger's, or sequence / context parallel): {fix}")
        mean_weight = self.begin(training, step, device if device is not None else logits.device)
        out = self._loss(logits, labels, num_items_in_batch=num_items_in_batch, shift=shift,
                         mean_weight=mean_weight, token_scale=token_scale)
        self.record(out.stats, training)
        aux = self.router_aux_loss(outputs, model)
        return out.loss if aux is None else out.loss + aux.to(out.loss.device)

    def _loss(self, logits, labels, *, mean_weight, **common):
        """The method's dense op (eaft_plugins.ops) on this micro-batch."""
        if self.method == "eaft":
            from .ops.dense import eaft_loss

            return eaft_loss(logits, labels, options=self.options, mean_weight=mean_weight, **common)
        if self.method == "sft_kl":
            from .ops.sft_kl import sft_kl_loss

            return sft_kl_loss(logits, labels, self._take_pending(), options=self.options, **common)
        if self.method == "flow":
            from .ops.flow import flow_loss

            return flow_loss(logits, labels, self._take_pending(), options=self.options, **common)
        from .ops.talr import talr_loss

        return talr_loss(logits, labels, options=self.options, **common)

    def router_aux_loss(self, outputs, model):
        """`coef * aux_loss` exactly as the model's forward adds it when given labels (None: nothing to add)."""
        aux = None if outputs is None else (outputs.get("aux_loss") if isinstance(outputs, dict)
                                            else getattr(outputs, "aux_loss", None))
        if not self.router_aux or aux is None:
            return None
        import torch

        from .models import router_aux_coef

        try:
            if model is None:
                raise ValueError("no model given")
            coef = router_aux_coef(model)
        except ValueError as exc:
            raise ValueError(f"the model returned a MoE router aux_loss, but {self.title} cannot tell its coefficient "
                             f"({exc}); turn output_router_logits off or report this model") from None
        return None if coef is None else coef * torch.as_tensor(aux)

    def fused_forward(self, training: bool, step: int, device, labels, forward):
        """`forward()` (the model called with the labels) through the fused loss, its statistics recorded.

        The model is patched again first if its forward was replaced since patch_fused (Liger's instance-level
        patch, applied by Trainer.train() after the trainer was built, does that): the fused forward always wins.
        """
        if labels is None:
            raise ValueError(f"{self._fused_on}: the batch has no labels, so the model would compute no {self.title} "
                             "loss")
        model = self.fused.model
        if model.__dict__.get("forward") is not self._forward or model.__dict__.get("eaft_fused") is not self.fused:
            self.patch_fused(model, keep_logits=self.fused.keep_logits)
        self.begin(training, step, device)
        self.fused.last_stats = None
        self.fused.sample_weights = self._take_pending() if self.method == "flow" else None
        outputs = forward()
        if self.fused.last_stats is None:  # a wrapper replaced or bypassed the patched forward
            raise RuntimeError(
                f"{self._fused_on}: the model's forward did not run the fused {self.title} loss (it was replaced or "
                f"wrapped after patching); set {self.spelling.assign(self._fused_key, False)} and report this model setup")
        self.record(self.fused.last_stats, training)
        return outputs

    # ---- at log time

    def metrics(self, mode: str, device=None, reduce: bool = True) -> dict:
        """The mode's metrics since the last call, reduced over ranks (see metric_values).

        A collective when `reduce`: every rank must call it at the same point.
        """
        return metric_values(self.acc[mode].pop(group=self.group, device=device, reduce=reduce), mode, self.method)

    def log(self, logs: dict, device=None) -> None:
        """Add the metrics to a trainer's log entry: training ones to an entry with `loss`, evaluation ones to an
        entry with `eval_loss` (every rank logs the same entries, so the collective is reached by all)."""
        if not self.log_metrics:
            return
        if "loss" in logs:
            logs.update(self.metrics("train", device))
        elif "eval_loss" in logs:
            logs.update(self.metrics("eval", device))

    def take(self, training: bool, device=None) -> EAFTStats:
        """The statistics recorded since the last call, reduced over `group`; an error when the loss never ran
        (frameworks that log per micro-batch: Megatron)."""
        acc = self.acc["train" if training else "eval"]
        if acc.empty:
            raise RuntimeError(f"{self.spelling.enabled} is set but the model's forward did not compute the "
                               f"{self.title} loss; see `python -m eaft_plugins doctor`")
        return acc.pop(group=self.group, device=device)


LossRun = EAFTRun  # the run of any method: the name says what it is for SFT-KL, FLOW and TALR
