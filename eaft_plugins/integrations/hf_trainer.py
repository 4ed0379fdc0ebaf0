"""EAFT for a plain `transformers.Trainer`, and the trainer-side hook that the TRL integration shares.

One line on a trainer you already built (any causal LM; labels unshifted, -100 = not supervised):

    from eaft_plugins.integrations.hf_trainer import with_eaft
    trainer = with_eaft(Trainer(model=model, args=args, train_dataset=ds, data_collator=collator), eaft_topk=20)
    trainer.train()       # loss = EAFT; logs carry eaft/ce, eaft/weight, eaft/entropy, eaft/conflict_frac

`with_eaft` takes the settings of `eaft_plugins.options.SETTINGS` as keywords (`eaft_topk`, `eaft_alpha`, ...,
`eaft_fused`), parsed by `config_from_keys` (strings such as "20" / "false" / "full" are accepted), and
replaces that trainer instance's `compute_loss` and `log`: the loss is EAFT over the same labels and the same
`num_items_in_batch` as the trainer's own cross-entropy (so gradient accumulation and data parallel give the
same update as SFT would, with per-token weights), and every log adds the EAFT metrics, reduced over ranks.

`EAFTHook` is the part shared with `eaft_plugins.integrations.trl` (SFTTrainer with loss_type="eaft"): one
`EAFTRun` per trainer, the refused settings, the dense and fused forward, the metric logging.
"""

from __future__ import annotations

from typing import Callable, Optional

from ..options import KEYS, EAFTConfig, Spelling, config_from_keys
from ..run import EAFTRun

SPELLING = Spelling("with_eaft(..., {key}=...)", "{key}={value}")


class EAFTHook:
    """EAFT state of one trainer and the two methods the trainer delegates to it.

    `shown_loss` is how the user turned EAFT on (for error messages), `spelling` how they write a setting.
    `extra_metrics(trainer, inputs, outputs, labels, mode)` lets a framework record its own per-batch
    metrics from the same forward (TRL's entropy / token accuracy / num_tokens).
    """

    def __init__(self, config: EAFTConfig, spelling: Spelling, shown_loss: str,
                 extra_metrics: Optional[Callable] = None):
        self.run = EAFTRun(config, spelling)
        self.spelling = spelling
        self.shown_loss = shown_loss
        self.extra_metrics = extra_metrics
        self._forward = None
        self._keep_logits = False

    # ---- when the trainer is built

    def bind(self, trainer) -> None:
        """Checks that need the built trainer, then (eaft_fused) the patched forward. ValueError before any step."""
        self.check_trainer(trainer)
        self.run.check_vocab(trainer.model)
        if self.run.config.fused:
            self._keep_logits = (getattr(trainer, "compute_metrics", None) is not None
                                 or getattr(trainer, "preprocess_logits_for_metrics", None) is not None)
            self._patch(trainer.model)

    def check_trainer(self, trainer) -> None:
        args = trainer.args
        fused_fix = self.spelling.assign("fused", "true")
        if getattr(args, "use_liger_kernel", False) and not self.run.config.fused:
            raise ValueError(
                f"{self.shown_loss} with use_liger_kernel=True: the dense EAFT loss needs the full logits, which "
                f"Liger's fused cross-entropy exists to avoid. Set {fused_fix} (fused EAFT from the hidden states "
                "and the LM head; Liger's other kernels stay) or use_liger_kernel=False.")
        if (getattr(args, "label_smoothing_factor", 0) or 0) > 0:
            raise ValueError(
                f"{self.shown_loss} with label_smoothing_factor={args.label_smoothing_factor}: EAFT replaces the "
                "loss, so the smoothing would be dropped silently; set label_smoothing_factor=0.")
        if (getattr(args, "n_gpu", 1) or 1) > 1:
            raise ValueError(
                f"{self.shown_loss} does not support nn.DataParallel (several GPUs visible to one process, "
                f"n_gpu={args.n_gpu}); launch with torchrun / accelerate launch (one process per GPU) or make one "
                "GPU visible with CUDA_VISIBLE_DEVICES.")
        check_parallelism(trainer, self.shown_loss)
        model = trainer.model
        peft_config = getattr(model, "peft_config", None)
        active = getattr(model, "active_adapter", None)
        if isinstance(peft_config, dict) and isinstance(active, str) and active in peft_config:
            if getattr(peft_config[active], "is_prompt_learning", False):
                raise ValueError(
                    f"{self.shown_loss} with a prompt-learning PEFT adapter ({peft_config[active].peft_type}): its "
                    "virtual tokens shift the logits against the labels; use LoRA (or another adapter that adds no "
                    "tokens) or full fine-tuning.")

    def _patch(self, model) -> None:
        self.run.patch_fused(model, keep_logits=self._keep_logits)
        self._forward = self.run.fused.model.__dict__["forward"]

    def _fused_handle(self):
        """Re-patch when the model's forward was replaced since (Liger patches the instance in Trainer.train())."""
        lm = self.run.fused.model
        if lm.__dict__.get("forward") is not self._forward or lm.__dict__.get("eaft_fused") is not self.run.fused:
            self._patch(lm)
        return self.run.fused

    # ---- per micro-batch

    def compute_loss(self, trainer, model, inputs, return_outputs=False, num_items_in_batch=None):
        """What Trainer.compute_loss does with a loss function, with the EAFT loss: same labels (unshifted, the
        model's own causal shift), same `num_items_in_batch`, same `average_tokens_across_devices` factor."""
        check_parallelism(trainer, self.shown_loss)
        training = trainer.model.training
        mode = "train" if training else "eval"
        step = trainer.state.global_step
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(f"{self.shown_loss}: the batch has no `labels`, so there is nothing to train on")
        if inputs.get("shift_labels") is not None:
            raise ValueError(f"{self.shown_loss}: the batch carries pre-shifted `shift_labels` (context / sequence "
                             "parallel), which EAFT does not support; disable context / sequence parallelism")
        if self.run.config.fused:
            self._fused_handle()
            self.run.begin_fused(training, step, labels.device)
            outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
            self.run.end_fused(training)
            loss = outputs.loss
        else:
            outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
            logits = outputs.get("logits") if isinstance(outputs, dict) else outputs[0]
            loss = self.run.dense_loss(logits, labels, training=training, step=step,
                                       num_items_in_batch=num_items_in_batch, outputs=outputs, model=model)
        if getattr(trainer.args, "past_index", -1) >= 0:
            trainer._past = outputs[trainer.args.past_index]
        # Like Trainer.compute_loss: num_items_in_batch counts every rank's tokens and DDP averages gradients.
        if getattr(trainer.args, "average_tokens_across_devices", False) and num_items_in_batch is not None:
            loss = loss * trainer.accelerator.num_processes
        if self.extra_metrics is not None:
            loss = self.extra_metrics(trainer, inputs, outputs, labels, mode, loss, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    # ---- at each log (every rank: Trainer.log runs on all of them)

    def log_metrics(self, trainer, logs: dict) -> None:
        if not self.run.log_metrics:
            return
        mode = "train" if trainer.model.training else "eval"
        values = self.run.metrics(mode, trainer.args.device)  # a collective
        if any(k.endswith("/tokens") and v > 0 for k, v in values.items()):
            logs.update(values)


def check_parallelism(trainer, shown_loss: str) -> None:
    """Context / sequence / tensor parallelism shard or replicate what the loss sees: refused."""
    pc = getattr(getattr(trainer, "accelerator", None), "parallelism_config", None)
    if pc is None:
        pc = getattr(trainer.args, "parallelism_config", None)
    if pc is None:
        return
    for attr, what in (("cp_enabled", "context parallelism (cp_size"), ("sp_enabled", "sequence parallelism (sp_size"),
                       ("tp_enabled", "tensor parallelism (tp_size")):
        if getattr(pc, attr, False):
            size = getattr(pc, attr.replace("_enabled", "_size"), "?")
            raise ValueError(
                f"{shown_loss} does not support {what}={size}): the EAFT loss and its statistics need each "
                "token's full-vocabulary logits exactly once per data-parallel rank; drop it from "
                "parallelism_config (or the accelerate config).")


def settings_from_keywords(settings: dict, spelling: Spelling = SPELLING) -> EAFTConfig:
    """`eaft_topk=20, ...` keywords to an EAFTConfig (the same parser as every framework)."""
    unknown = sorted(k for k in settings if k not in KEYS)
    if unknown:
        raise ValueError(f"unknown EAFT setting(s) {unknown}; allowed: {list(KEYS)}")
    return config_from_keys({k[len("eaft_"):]: v for k, v in settings.items()}, spelling)


def with_eaft(trainer, **settings):
    """Make an already-built `transformers.Trainer` train (and evaluate) with the EAFT loss; returns it.

    Keywords: `eaft_topk`, `eaft_alpha`, `eaft_entropy_norm`, `eaft_gate`, `eaft_h_min`, `eaft_p_min`,
    `eaft_weight_norm`, `eaft_log_metrics`, `eaft_fused` (docs/trl.md). Call it before `train()`.
    """
    shown = "with_eaft(trainer)"
    try:
        from trl import SFTTrainer
    except Exception:  # TRL absent or broken: nothing to redirect
        SFTTrainer = None
    if SFTTrainer is not None and isinstance(trainer, SFTTrainer):
        raise ValueError(f"{shown} got a TRL SFTTrainer: use SFTConfig(loss_type='eaft', eaft_topk=...) instead "
                         "(docs/trl.md), which keeps TRL's own metrics and checks")
    if getattr(trainer, "_eaft", None) is not None:
        raise ValueError(f"{shown}: this trainer already trains with EAFT")
    if getattr(trainer, "compute_loss_func", None) is not None:
        raise ValueError(f"{shown}: the trainer already has a compute_loss_func; EAFT replaces the loss, so pass "
                         "only one of the two")
    config = settings_from_keywords(settings)
    hook = EAFTHook(config, SPELLING, shown)
    hook.bind(trainer)
    trainer._eaft = hook
    own_log = trainer.log

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        return hook.compute_loss(trainer, model, inputs, return_outputs, num_items_in_batch)

    def log(logs, *args, **kwargs):
        hook.log_metrics(trainer, logs)
        return own_log(logs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    trainer.log = log
    return trainer
