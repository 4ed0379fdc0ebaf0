"""EAFT (or SFT-KL, FLOW, TALR) for a plain `transformers.Trainer`, and the trainer-side hook that the TRL
integration shares.

One line on a trainer you already built (any causal LM; labels unshifted, -100 = not supervised):

    from eaft_plugins.integrations.hf_trainer import with_eaft
    trainer = with_eaft(Trainer(model=model, args=args, train_dataset=ds, data_collator=collator), eaft_topk=20)
    trainer.train()       # loss = EAFT; logs carry eaft/ce, eaft/weight, eaft/entropy, eaft/conflict_frac

`with_eaft` takes the settings of `eaft_plugins.options.SETTINGS` as keywords (`eaft_topk`, `eaft_alpha`, ...,
`eaft_fused`), parsed by `config_from_keys` (strings such as "20" / "false" / "full" are accepted), and
replaces that trainer instance's `compute_loss` and `log`: the loss is EAFT over the same labels and the same
`num_items_in_batch` as the trainer's own cross-entropy (so gradient accumulation and data parallel give the
same update as SFT would, with per-token weights), and every log adds the EAFT metrics, reduced over ranks.

`with_loss(trainer, "flow", flow_tau=...)` does the same for another method of the math table ("sft_kl", "flow",
"talr"; its keys are that method's settings, docs/loss.md).

`EAFTHook` is the part shared with `eaft_plugins.integrations.trl` (SFTTrainer with loss_type="eaft", "sft_kl", ...):
one `EAFTRun` per trainer, the refused settings, the dense and fused forward, the metric logging.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..options import METHOD_KEYS, METHODS, LossConfig, Spelling, config_from_keys
from ..run import EAFTRun
from . import adapter, methods

SPELLING = Spelling("`{key}`", "{key}={value}", "with_eaft(trainer)", python_values=True,
                    method_format="with_loss(trainer, {method!r})")


class EAFTHook:
    """The two methods a trainer delegates to its EAFTRun (the run's spelling names the settings in errors).

    `extra_metrics(trainer, inputs, outputs, labels, mode, loss, num_items_in_batch)` lets a framework record its own
    per-batch metrics from the same forward (TRL's entropy / token accuracy / num_tokens).
    """

    def __init__(self, run: EAFTRun, extra_metrics: Optional[Callable] = None):
        self.run = run
        self.extra_metrics = extra_metrics

    # ---- when the trainer is built

    def bind(self, trainer) -> "EAFTHook":
        """Checks that need the built trainer, then (eaft_fused) the patched forward, then what the method needs of
        the starting model (SFT-KL, FLOW). ValueError before any step."""
        self.check_trainer(trainer)
        self.run.check_vocab(trainer.model)
        if self.run.config.fused:
            keep_logits = (getattr(trainer, "compute_metrics", None) is not None
                           or getattr(trainer, "preprocess_logits_for_metrics", None) is not None)
            self.run.patch_fused(trainer.model, keep_logits=keep_logits)
        methods.bind(trainer, self.run)
        return self

    def check_trainer(self, trainer) -> None:
        args, spelling = trainer.args, self.run.spelling
        observed = [("liger", "use_liger_kernel", getattr(args, "use_liger_kernel", False)),
                    ("label_smoothing", "label_smoothing_factor", getattr(args, "label_smoothing_factor", 0)),
                    ("replicas", "n_gpu", getattr(args, "n_gpu", 1))]
        adapter.refuse(spelling, observed + parallelism(trainer), self.run.config.fused)
        model = trainer.model
        peft_config = getattr(model, "peft_config", None)
        active = getattr(model, "active_adapter", None)
        if isinstance(peft_config, dict) and isinstance(active, str) and active in peft_config:
            if getattr(peft_config[active], "is_prompt_learning", False):
                raise ValueError(
                    f"{spelling.enabled} with a prompt-learning PEFT adapter ({peft_config[active].peft_type}): its "
                    "virtual tokens shift the logits against the labels; use LoRA (or another adapter that adds no "
                    "tokens) or full fine-tuning.")

    # ---- per micro-batch

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        """What Trainer.compute_loss does with a loss function, with the method's loss: same labels (unshifted, the
        model's own causal shift), same `num_items_in_batch`, same `average_tokens_across_devices` factor."""
        run = self.run
        adapter.refuse(run.spelling, parallelism(trainer), run.config.fused)
        training = trainer.model.training
        mode = "train" if training else "eval"
        step = trainer.state.global_step
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"{run.spelling.enabled}: the batch has no `labels`, so there is nothing to train on")
        if inputs.get("shift_labels") is not None:
            raise ValueError(f"{run.spelling.enabled}: the batch carries pre-shifted `shift_labels` (context / "
                             f"sequence parallel), which {run.title} does not support; disable context / sequence "
                             "parallelism")
        if run.needs_inputs:
            run.prepare(trainer.model, inputs, training)
        if run.config.fused:
            outputs = run.fused_forward(training, step, labels.device, labels,
                                        lambda: model(**inputs, num_items_in_batch=num_items_in_batch))
            loss = outputs.loss
        else:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            logits = outputs.get("logits") if isinstance(outputs, dict) else outputs[0]
            loss = run.dense_loss(logits, labels, training=training, step=step,
                                  num_items_in_batch=num_items_in_batch, outputs=outputs, model=model)
        if getattr(trainer.args, "past_index", -1) >= 0:
            trainer._past = outputs[trainer.args.past_index]
        # Like Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if getattr(trainer.args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
            loss = loss * trainer.accelerator.num_processes
        if self.extra_metrics is not None:
            loss = self.extra_metrics(trainer, inputs, outputs, labels, mode, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def parallelism(trainer) -> list:
    """Context / sequence / tensor parallelism of the trainer (its accelerator's, else its arguments'), as
    refusal-table observations: they shard or replicate what the loss sees."""
    pc = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    owner = "accelerator.parallelism_config"
    if pc is None:
        pc, owner = getattr(trainer.args, "parallelism_config", None), "parallelism_config"
    return adapter.parallelism_observed(pc, owner)


def settings_from_keywords(settings: dict, spelling: Spelling = SPELLING, method: str = "eaft") -> LossConfig:
    """`eaft_topk=20, ...` keywords to the method's config (the same parser as every framework)."""
    unknown = sorted(k for k in settings if k not in METHOD_KEYS[method])
    if unknown:
        raise ValueError(f"unknown {METHODS[method].title} setting(s) {unknown}; allowed: {list(METHOD_KEYS[method])}")
    return config_from_keys(settings, spelling, method)


def with_eaft(trainer, **settings):
    """Make an already-built `transformers.Trainer` train (and evaluate) with the EAFT loss; returns it.

    Keywords: `eaft_topk`, `eaft_alpha`, `eaft_entropy_norm`, `eaft_gate`, `eaft_h_min`, `eaft_p_min`,
    `eaft_weight_norm`, `eaft_log_metrics`, `eaft_fused` (docs/trl.md). Call it before `train()`.
    """
    return with_loss(trainer, "eaft", **settings)


def with_loss(trainer, method: str, **settings):
    """Make an already-built `transformers.Trainer` train (and evaluate) with `method`'s loss ("eaft", "sft_kl",
    "flow", "talr"); keywords: that method's settings (`flow_tau=...`, docs/loss.md). Returns the trainer."""
    if method not in METHODS:
        raise ValueError(f"with_loss: method must be one of {list(METHODS)}, got {method!r}")
    spelling = SPELLING.for_method(method)
    shown = spelling.enabled
    try:
        from trl import SFTTrainer
    except Exception:  # TRL absent or broken: nothing to redirect
        SFTTrainer = None
    if SFTTrainer is not None and isinstance(trainer, SFTTrainer):
        example = "eaft_topk=..." if method == "eaft" else "..."
        raise ValueError(f"{shown} got a TRL SFTTrainer: use SFTConfig(loss_type='{method}', {example}) instead "
                         "(docs/trl.md), which keeps TRL's own metrics and checks")
    if getattr(trainer, "_eaft", None) is not None:
        raise ValueError(f"{shown}: this trainer already trains with {trainer._eaft.run.title}")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError(f"{shown}: the trainer already has a compute_loss_func; {METHODS[method].title} replaces the "
                         "loss, so pass only one of the two")
    hook = EAFTHook(EAFTRun(settings_from_keywords(settings, SPELLING, method), SPELLING)).bind(trainer)
    trainer._eaft = hook
    own_log = trainer.log

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        return hook.compute_loss(trainer, model, inputs, return_outputs, num_items_in_batch)

    def log(logs, *args, **kwargs):
        hook.run.log(logs, trainer.args.device)
        return own_log(logs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.log = log
    return trainer
