"""SFT-KL's starting model and FLOW's measuring pass on any `transformers.Trainer` (LLaMA-Factory's, ms-swift's and
TRL's trainers are ones), set up once by every adapter when the trainer is built:

    methods.bind(trainer, run)      # SFT-KL: the frozen starting model now; FLOW: a callback measures at train begin
    ...                             # then, per micro-batch, the adapter calls run.prepare(trainer.model, inputs, ...)

FLOW's pass runs at `on_train_begin`, when the model is still the starting model (and every rank is up): the training
set, sequentially and collated as in training (the trainer's own evaluation dataloader over the training set, so no
random state of the training order is consumed), each rank its share, gathered. Its losses are saved to
`output_dir/flow_weights.json`; a resumed run reads them back (its model is no longer the starting model).
"""

from __future__ import annotations

import sys

from ..reference import FlowTable, StartingModel
from ..run import EAFTRun


def bind(trainer, run: EAFTRun) -> None:
    """What `run`'s method needs of `trainer` before the first step (nothing for EAFT and TALR)."""
    if run.method == "sft_kl":
        run.starting_model = StartingModel(trainer.model, run.spelling.enabled)
        _say(f"{run.spelling.enabled}: the starting model is {run.starting_model.kind}")
    elif run.method == "flow":
        from torch.utils.data import IterableDataset

        if isinstance(getattr(trainer, "train_dataset", None), IterableDataset):
            raise ValueError(f"{run.spelling.enabled} weighs each training example by its starting loss, measured "
                             "before the first step: it needs a map-style training set, not a streamed one")
        trainer.add_callback(_flow_pass(trainer, run))


def _say(text: str) -> None:
    print(f"[eaft-plugins] {text}", file=sys.stderr)


def _flow_pass(trainer, run: EAFTRun):
    from transformers import TrainerCallback

    class FlowPass(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            measure_flow(trainer, run, resumed=state.global_step > 0)

    return FlowPass()


def measure_flow(trainer, run: EAFTRun, resumed: bool = False) -> FlowTable:
    """run.flow_table from the starting model (or, resumed, from the losses saved when the run started)."""
    table = FlowTable(run.options.tau, run.spelling.enabled)
    folder = trainer.args.output_dir
    if resumed:
        if not table.load(folder):
            raise ValueError(f"{run.spelling.enabled}: resuming needs the starting losses measured when the run "
                             f"started ({folder}/{FlowTable.FILE}); the resumed model is no longer the starting model")
        _say(f"{run.spelling.enabled}: {len(table.losses)} starting losses read from {folder}/{FlowTable.FILE}")
    else:
        table.measure(trainer.model, _training_rows(trainer))
        _gather(table)
        table.finish()
        if trainer.is_world_process_zero():
            table.save(folder)
        _say(f"{run.spelling.enabled}: starting losses of {len(table.losses)} training examples measured before "
             f"step 1; tau = {table.tau:.4g} ({'given' if run.options.tau is not None else 'their median'})")
    run.flow_table = table
    return table


def _training_rows(trainer):
    """The training set, in order, collated as in training: the trainer's evaluation dataloader over it. Under
    dataloader_persistent_workers Trainer caches that loader as *the* evaluation loader; it is taken back out, so
    evaluation never runs over the training set (and a cached evaluation loader is not measured instead)."""
    cache = getattr(trainer, "_eval_dataloaders", None)
    kept = cache.pop("eval", None) if isinstance(cache, dict) else None
    try:
        return trainer.get_eval_dataloader(trainer.train_dataset)
    finally:
        cache = getattr(trainer, "_eval_dataloaders", None)
        if isinstance(cache, dict):
            cache.pop("eval", None)
            if kept is not None:
                cache["eval"] = kept


def _gather(table: FlowTable) -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, table.losses)
        for part in parts:
            table.merge(part)
