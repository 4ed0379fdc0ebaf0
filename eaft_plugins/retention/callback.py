"""The retention monitor on a `transformers.Trainer` (and the trainers built on it: LLaMA-Factory, ms-swift, TRL).

    from eaft_plugins.retention import with_retention
    trainer = with_retention(trainer, probe="builtin", steps=None)   # before trainer.train()

At train begin (before the first optimizer step) the model as loaded builds the reference and the step-0
values are logged; then every `steps` optimizer steps and at the last step the monitor measures and the
values go into that step's training log entry (the trainer is asked to log at that step), so TensorBoard /
W&B / the trainer's own log files get `retention/*`. At train end `retention.png` is drawn in output_dir.

Default interval (`steps` unset): the logging interval (else the eval interval, else once per epoch), or the
smallest multiple of it that keeps one probe under SHARE of the training time between two probes, from the
probe's and the steps' wall time measured in this run (decided once, after the first interval; printed).
The reference is saved in output_dir and in every checkpoint: a resumed run (any world size) measures against the
model before fine-tuning, not against the checkpoint it resumed from. Files in output_dir: retention.jsonl (the
readings per probe step), retention_items.jsonl (the per-item values behind them: `eaft-retention compare`'s paired
differences), retention_probe.json (what was measured: the probe's identity), retention.png.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional

import torch
from transformers import TrainerCallback

from .monitor import MAX_NEW_TOKENS, RetentionMonitor, _device, _dist, model_context
from .probe import BUILTIN, parse_probe, parse_steps
from .readings import readings

TOPK = 32
SHARE = 0.03  # the most of the training time the default interval lets the probe take
REFERENCE = "retention_reference.pt"
LOG, ITEMS, IDENTITY = "retention.jsonl", "retention_items.jsonl", "retention_probe.json"


def tokenizer_of(trainer):
    tok = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    tok = getattr(tok, "tokenizer", tok)  # a multimodal processor carries its tokenizer
    if tok is None or not callable(tok):
        raise ValueError("retention_probe: the trainer has no tokenizer (processing_class) to encode the probe with")
    return tok


def _by_steps(strategy) -> bool:
    return str(getattr(strategy, "value", strategy)).lower() == "steps"  # str(IntervalStrategy.STEPS) is not "steps"


def default_interval(args, state) -> int:
    if _by_steps(getattr(args, "logging_strategy", None)) and state.logging_steps:
        return max(1, int(state.logging_steps))
    if _by_steps(getattr(args, "eval_strategy", None)) and state.eval_steps:
        return max(1, int(state.eval_steps))
    epochs = max(1, math.ceil(getattr(args, "num_train_epochs", 1) or 1))
    return max(1, state.max_steps // epochs)


def measurements(now: int, last: int, interval: int) -> int:
    """Probes after step `now` up to `last` at this interval, the always-measured last step included."""
    return last // interval - now // interval + (1 if last % interval else 0)


def auto_interval(base: int, probe_s: float, step_s: float, share: float = SHARE, now: int = 0,
                  last: Optional[int] = None) -> int:
    """The smallest multiple of `base` steps whose probes take at most `share` of the training time. With the run's
    last step known, the probes still to come (the last step's included) are counted against the steps still to
    come; when even the last step's probe alone is over the share, the interval runs past the end (only the last
    step is measured)."""
    if probe_s <= 0 or step_s <= 0:
        return base
    k = base * max(1, math.ceil(probe_s / (share * step_s * base)))  # the periodic share alone
    if not last or last <= now:
        return k
    budget = share * step_s * (last - now)
    while k <= last and measurements(now, last, k) * probe_s > budget:
        k += base
    return k


def reference_name(rank: int = 0, world: int = 1) -> str:
    return f"retention_reference.rank{rank}.pt" if world > 1 else REFERENCE


def read_reference(folder) -> tuple:
    """The states of the reference saved in `folder` (one per rank of the run that saved it), or (None, why).
    Loaded with weights_only=True (tensors, numbers, strings only); a damaged or missing file is named."""
    folder = Path(folder)
    first = next((folder / n for n in (REFERENCE, reference_name(0, 2)) if (folder / n).is_file()), None)
    if first is None:
        return None, f"no saved reference in {folder}"
    states = []
    paths = [first]
    while paths:
        path = paths.pop(0)
        if not path.is_file():
            return None, f"{path} is missing (the run that saved the reference had {states[0].get('world')} ranks)"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # damaged: truncated, not a torch file, unexpected objects
            return None, (f"{path} is damaged and cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                          f"); delete it (a valid copy elsewhere is used, else the reference is rebuilt)")
        if not isinstance(state, dict) or "fingerprint" not in state:
            return None, f"{path} is not a retention reference of this version of eaft-plugins"
        states.append(state)
        if len(states) == 1 and state.get("world", 1) > 1:
            paths = [folder / reference_name(r, state["world"]) for r in range(1, state["world"])]
    return states, None


class RetentionCallback(TrainerCallback):
    """Builds the reference at train begin, measures every `steps` steps, logs through the trainer, plots."""

    def __init__(self, probe: str = BUILTIN, steps: Optional[int] = None, *, shown_probe: str = "retention_probe",
                 shown_steps: str = "retention_steps", topk: Optional[int] = TOPK,
                 max_new_tokens: int = MAX_NEW_TOKENS):
        self.spec = parse_probe(probe, shown_probe)  # file problems stop here
        self.probe, self.steps, self.shown = probe, parse_steps(steps, shown_steps), shown_probe
        self.shown_steps = shown_steps
        self.topk, self.max_new_tokens = (None if self.spec.exact else topk), max_new_tokens
        self.monitor: Optional[RetentionMonitor] = None
        self.trainer = None
        self.interval = None  # None until decided (default interval)
        self.base_interval = None
        self.pending = None
        self.history = []
        self.seconds = 0.0  # wall time spent probing (reference + measurements)
        self.reference_seconds = 0.0  # of which the one-time reference build
        self.probe_s = 0.0  # one measurement's wall time (for the default interval)
        self.clock = None  # (wall time, step, self.seconds) when training time started counting

    # ---- when the trainer is built

    def bind(self, trainer) -> "RetentionCallback":
        """Encode the probe for this trainer's tokenizer and model (too-long items stop here), hook its log."""
        self.monitor = RetentionMonitor(self.spec.rows, tokenizer_of(trainer), topk=self.topk,
                                        max_new_tokens=self.max_new_tokens, name=self.spec.name,
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

    def _write(self, name: str, rows, mode: str = "a") -> None:
        with open(Path(self.trainer.args.output_dir) / name, mode) as fh:
            fh.write("".join(json.dumps(r) + "\n" for r in rows))

    def _probe(self, state, build: bool) -> dict:
        trainer, mon = self.trainer, self.monitor
        autocast = getattr(trainer, "autocast_smart_context_manager", None) or _null
        t0 = time.perf_counter()
        if build:
            mon.build_reference(trainer.model, autocast)
            table = mon.base
        else:
            table = mon.measure_table(trainer.model, autocast)
        values = readings(mon.kinds, table, mon.base)
        spent = time.perf_counter() - t0
        self.seconds += spent
        if build:
            self.reference_seconds += spent
        self.probe_s = mon.seconds["score"] if build else spent
        self.history.append({"step": state.global_step, **values})
        if state.is_world_process_zero:
            self._write(LOG, self.history[-1:])
            self._write(ITEMS, [{"step": state.global_step, "table": table.tolist()}])
        return values

    def _load_reference(self, args, state) -> bool:
        """On resume: the reference saved by the first run (its checkpoint or output_dir, any world size); the
        first place whose files are whole and fit wins. False (on every rank) if none does."""
        out = Path(args.output_dir)
        places = [Path(args.resume_from_checkpoint)] if isinstance(args.resume_from_checkpoint, str) else []
        places = list(dict.fromkeys(places + [out / f"checkpoint-{state.global_step}", out]))
        whys = []
        loaded = False
        for place in places:
            states, why = read_reference(place)
            if states is not None:
                why = self.monitor.load_state_dicts(states)
                why = None if why is None else f"{place}: the saved reference does not fit: {why}"
            if why is None:
                loaded = True
                break
            whys.append(why)
            if state.is_world_process_zero and "damaged" in why:
                print(f"[eaft-plugins] {self.shown}: {why}", flush=True)
        if _dist()[1] > 1:  # every rank must take the same road (the probe is a collective)
            t = torch.tensor([int(loaded)], dtype=torch.long, device=_device(self.trainer.model))
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            if loaded and not t.item():
                whys.append("another rank could not load it")
            loaded = bool(t.item())
        if not loaded and state.is_world_process_zero:
            print(f"[eaft-plugins] {self.shown}: resumed at step {state.global_step} and {'; '.join(whys)}; the "
                  "retention reference is rebuilt from the resumed model, NOT the model before fine-tuning", flush=True)
        return loaded

    def _save_reference(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        rank, world = _dist()
        torch.save(self.monitor.state_dict(), folder / reference_name(rank, world))
        stale = folder / (reference_name(0, 2) if world == 1 else REFERENCE)  # another world size's, read first
        if rank == 0 and stale.is_file():
            stale.unlink()

    def _keep_apart(self, out: Path, step: int) -> None:
        """A rebuilt reference starts a new curve: the earlier points (another reference) move to their own files."""
        moved = []
        for name in (LOG, ITEMS, IDENTITY):
            path = out / name
            if path.is_file() and path.stat().st_size:
                target = path.with_name(f"{path.stem}.before-step{step}{path.suffix}")
                path.replace(target)
                moved.append(target.name)
        if moved:
            print(f"[eaft-plugins] {self.shown}: the earlier points (measured against the first run's reference) "
                  f"are kept apart in {', '.join(moved)}; {LOG} starts again at step {step}", flush=True)

    def _announce(self, state) -> None:
        mon = self.monitor
        capped, answers = mon.capped
        if _dist()[1] > 1:
            t = torch.tensor([capped, answers], dtype=torch.long, device=_device(self.trainer.model))
            torch.distributed.all_reduce(t)
            capped, answers = t.tolist()
        if state.is_world_process_zero:
            n = mon.identity()["items"]
            print(f"[eaft-plugins] {self.shown}: probe {mon.name} ({n['prompt']} prompts, {n['text']} texts, "
                  f"{n['mc']} multiple-choice items; {mon.tokens} probe tokens); {capped} of {answers} greedy base "
                  f"answers reached the {mon.max_new_tokens}-token cap", flush=True)

    def _note_fsdp(self, args, state) -> None:
        """A Trainer given `fsdp` on CPU trains with DDP (accelerate turns FSDP on only for accelerator devices)."""
        if getattr(args, "fsdp", None) and not _sharded(self.trainer.model) and state.is_world_process_zero:
            print(f"[eaft-plugins] {self.shown}: `fsdp` is set, but the Trainer runs DDP "
                  f"({type(getattr(self.trainer, 'model_wrapped', None)).__name__}: accelerate turns FSDP on only for "
                  "accelerator devices, not on CPU); the monitor measures the unsharded model", flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        self._note_fsdp(args, state)
        self.base_interval = self.steps or default_interval(args, state)
        self.interval = self.steps
        out = Path(args.output_dir)
        self.history = []
        if state.global_step > 0 and self._load_reference(args, state):
            if state.is_world_process_zero:  # the first run's points, up to where this run resumes
                for name in (LOG, ITEMS):
                    rows = [json.loads(x) for x in (out / name).read_text().splitlines()] if (out / name).is_file() else []
                    rows = [r for r in rows if r.get("step", 0) < state.global_step]
                    if name == LOG:
                        self.history = rows
                    self._write(name, rows, "w")
            values = self._probe(state, build=False)
        else:
            if state.is_world_process_zero:
                out.mkdir(parents=True, exist_ok=True)
                if state.global_step > 0:
                    self._keep_apart(out, state.global_step)
                for name in (LOG, ITEMS):
                    (out / name).write_text("")
            values = self._probe(state, build=True)
            self._save_reference(out)
            self._announce(state)
        if state.is_world_process_zero:
            (out / IDENTITY).write_text(json.dumps(self.monitor.identity(), indent=1))
        self.trainer.log(dict(values))  # the step-0 (or resumed step) entry
        self.clock = (time.perf_counter(), state.global_step, self.seconds)

    def _decide(self, state) -> int:
        """The default interval, once: the same on every rank (the probe is a collective)."""
        t0, step0, probed = self.clock
        step_s = (time.perf_counter() - t0 - (self.seconds - probed)) / max(state.global_step - step0, 1)
        last = state.max_steps if state.max_steps and state.max_steps > 0 else None
        n = auto_interval(self.base_interval, self.probe_s, step_s, now=state.global_step, last=last)
        if _dist()[1] > 1:
            t = torch.tensor([n], dtype=torch.long, device=_device(self.trainer.model))
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            n = int(t.item())
        if state.is_world_process_zero:
            why = (f", lengthened so the probes (one: {self.probe_s:.2f} s) stay under {SHARE:.0%} of the training "
                   f"time ({step_s:.2f} s a step)") if n > self.base_interval else ""
            if last and n > last:
                share = self.probe_s / (step_s * max(last - state.global_step, 1))
                why += (f"; only the last step is measured, and its probe alone is {share:.1%} of the remaining "
                        "training" if share > SHARE else "; only the last step is measured")
            print(f"[eaft-plugins] {self.shown}: measuring every {n} steps ({self.shown_steps} not set: the trainer's "
                  f"logging interval {self.base_interval}{why}); set {self.shown_steps} to choose", flush=True)
        return n

    def on_step_end(self, args, state, control, **kwargs):
        if self.interval is None and state.global_step - self.clock[1] >= self.base_interval:
            self.interval = self._decide(state)
        due = self.interval is not None and state.global_step % self.interval == 0
        if due or state.global_step >= state.max_steps:
            self.pending = self._probe(state, build=False)
            control.should_log = True
        return control

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is not None and self.monitor.ready:  # a resume from this checkpoint finds the reference
            self._save_reference(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero and self.history:
            from .plot import plot_runs

            path = plot_runs({Path(args.output_dir).name: self.history}, Path(args.output_dir) / "retention.png")
            if path is not None:
                print(f"[eaft-plugins] retention curves: {path}", flush=True)


def _null():
    import contextlib

    return contextlib.nullcontext()


def _sharded(model) -> bool:
    """FSDP (v1 wrapper or v2 fully_shard) holds the model's parameters."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # an older torch: FSDP2 not there
        from torch.distributed.fsdp import FullyShardedDataParallel

        FSDPModule = FullyShardedDataParallel
    return isinstance(model, (FullyShardedDataParallel, FSDPModule))


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
