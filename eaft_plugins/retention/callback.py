"""The retention monitor on a `transformers.Trainer` (and the trainers built on it: LLaMA-Factory, ms-swift, TRL).

    from eaft_plugins.retention import with_retention
    trainer = with_retention(trainer, probe="builtin", steps=None)   # before trainer.train()

At train begin (before the first optimizer step) the model as loaded builds the reference and the step-0
values are logged; then every `steps` optimizer steps (default: the logging interval, else the eval
interval, else once per epoch) and at the last step the monitor measures and the values go into that
step's training log entry (the trainer is asked to log at that step), so TensorBoard / W&B / the
trainer's own log files get `retention/*`. At train end `retention.png` is drawn in output_dir.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from .monitor import RetentionMonitor, model_context
from .probe import BUILTIN, load_rows, parse_steps

BUILTIN_BUDGET = 2048  # probe tokens of the builtin set (prompts counted with their answer budget)
TOPK = 32


def tokenizer_of(trainer):
    tok = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)  # a multimodal processor carries its tokenizer
    if tok is None or not callable(tok):
        raise ValueError("retention_probe: the trainer has no tokenizer (processing_class) to encode the probe with")
    return tok


def default_interval(args, state) -> int:
    if str(getattr(args, "logging_strategy", "")).endswith("steps") and state.logging_steps:
        return max(1, int(state.logging_steps))
    if str(getattr(args, "eval_strategy", "")).endswith("steps") and state.eval_steps:
        return max(1, int(state.eval_steps))
    epochs = max(1, math.ceil(getattr(args, "num_train_epochs", 1) or 1))
    return max(1, state.max_steps // epochs)


class RetentionCallback(TrainerCallback):
    """Builds the reference at train begin, measures every `steps` steps, logs through the trainer, plots."""

    def __init__(self, probe: str = BUILTIN, steps: Optional[int] = None, *, shown_probe: str = "retention_probe",
                 shown_steps: str = "retention_steps", topk: Optional[int] = TOPK, max_new_tokens: int = 48,
                 budget: Optional[int] = None):
        self.rows = load_rows(probe, shown_probe)  # file problems stop here
        self.probe, self.steps, self.shown = probe, parse_steps(steps, shown_steps), shown_probe
        self.topk, self.max_new_tokens = topk, max_new_tokens
        self.budget = budget if budget is not None else (BUILTIN_BUDGET if probe.strip() == BUILTIN else None)
        self.monitor: Optional[RetentionMonitor] = None
        self.trainer = None
        self.interval = None
        self.pending = None
        self.history = []
        self.seconds = 0.0  # wall time spent probing (reference + measurements)

    # ---- when the trainer is built

    def bind(self, trainer) -> "RetentionCallback":
        """Encode the probe for this trainer's tokenizer and model (too-long items stop here), hook its log."""
        self.monitor = RetentionMonitor(self.rows, tokenizer_of(trainer), topk=self.topk,
                                        max_new_tokens=self.max_new_tokens, budget=self.budget,
                                        context=model_context(_base_model(trainer.model)), shown=self.shown)
        self.trainer = trainer
        trainer.add_callback(self)
        own_log = trainer.log

        def log(logs, *args, **kwargs):
            if self.pending is not None and not any(k.startswith("eval_") for k in logs):
                logs.update(self.pending)
                self.pending = None
            return own_log(logs, *args, **kwargs)

        trainer.log = log
        trainer._retention = self
        return self

    # ---- training events

    def _probe(self, state, build: bool) -> dict:
        trainer = self.trainer
        autocast = getattr(trainer, "autocast_smart_context_manager", None) or _null
        t0 = time.perf_counter()
        run = self.monitor.build_reference if build else self.monitor.measure
        values = run(trainer.model, autocast)
        self.seconds += time.perf_counter() - t0
        self.history.append({"step": state.global_step, **values})
        if state.is_world_process_zero:
            with open(Path(trainer.args.output_dir) / "retention.jsonl", "a") as fh:
                fh.write(json.dumps(self.history[-1]) + "\n")
        return values

    def on_train_begin(self, args, state, control, **kwargs):
        self.interval = self.steps or default_interval(args, state)
        self.history = []
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            (Path(args.output_dir) / "retention.jsonl").write_text("")
            if state.global_step > 0:
                print(f"[eaft-plugins] {self.shown}: resumed at step {state.global_step}; the retention reference is "
                      "the resumed model, not the model before fine-tuning", flush=True)
        values = self._probe(state, build=True)
        self.trainer.log(dict(values))  # the step-0 entry

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.interval == 0 or state.global_step >= state.max_steps:
            self.pending = self._probe(state, build=False)
            control.should_log = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.history:
            from .plot import plot_runs

            path = plot_runs({Path(args.output_dir).name: self.history}, Path(args.output_dir) / "retention.png")
            if path is not None:
                print(f"[eaft-plugins] retention curves: {path}", flush=True)


def _null():
    import contextlib

    return contextlib.nullcontext()


def _base_model(model):
    """The transformers model under a PEFT wrapper (for its config)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def with_retention(trainer, probe: str = BUILTIN, steps: Optional[int] = None, **kwargs):
    """Turn the retention monitor on for an already-built `transformers.Trainer`; returns the trainer."""
    if getattr(trainer, "_retention", None) is not None:
        raise ValueError("with_retention(trainer): this trainer already has a retention monitor")
    RetentionCallback(probe, steps, shown_probe="with_retention(probe=...)", shown_steps="with_retention(steps=...)",
                      **kwargs).bind(trainer)
    return trainer
