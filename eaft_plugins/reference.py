"""What SFT-KL and FLOW need of the starting model (the model before its first fine-tuning step).

* `StartingModel` (SFT-KL): the starting model's logits on a micro-batch, under no_grad. A PEFT model (LoRA, ...) is
  its own starting model with the adapters disabled: no memory at all. A fully fine-tuned model gets a frozen copy
  made when the trainer is built, before any step: one more copy of the weights in their dtype (no gradient, no
  optimizer state), i.e. +2 bytes per parameter in bf16 next to the ~16 of mixed-precision AdamW training.
* `FlowTable` (FLOW): each training example's starting loss (its mean token cross-entropy), measured in one pass over
  the training set before the first step, keyed by the example's tokens; then w = exp(-L / tau) per example.

Torch only: the frameworks hand in their model and batches (integrations/methods.py).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import os
from typing import Iterable, Optional

import torch

from .ops.flow import flow_weights, sequence_losses

# Keys of a training batch that are not model inputs (the trainer's loss arguments, ms-swift's and TRL's extras).
NOT_INPUTS = frozenset({"labels", "shift_labels", "num_items_in_batch", "loss_scale", "channel", "compute_loss_func",
                        "text_position_ids", "completion_mask", "assistant_masks", "return_loss", "use_cache",
                        "skip_logits", "eaft_token_scale"})


def forward_inputs(model, inputs: dict) -> dict:
    """The model inputs of a training batch (no labels, so the model computes no loss of its own)."""
    forward = getattr(model, "forward", model)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        params = {}
    open_kwargs = not params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {k: v for k, v in inputs.items() if k not in NOT_INPUTS and (open_kwargs or k in params)}
    out["use_cache"] = False
    return out


def _logits(outputs):
    return outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", outputs[0])


def is_peft(model) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and bool(getattr(model, "peft_config", None))


def is_partitioned(model) -> bool:
    """DeepSpeed ZeRO-3 partitions each parameter (ds_id); a deep copy would copy empty shards."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class StartingModel:
    """The frozen starting model of SFT-KL (see the module doc). Build it before the first optimizer step."""

    def __init__(self, model, shown: str = "SFT-KL"):
        self.peft = is_peft(model)
        self.copy = None
        if not self.peft:
            if is_partitioned(model):
                raise ValueError(
                    f"{shown} with full fine-tuning under DeepSpeed ZeRO-3: the frozen starting model cannot be copied "
                    "from partitioned weights. Use LoRA (the starting model is then the model with its adapters "
                    "disabled, no memory), or ZeRO-2 / DDP")
            self.copy = copy.deepcopy(model).eval()
            self.copy.requires_grad_(False)
            # An instance-level forward (a wrapper a trainer set, e.g. TRL 1.x's) is a function copied by reference:
            # its closure may still call the *trained* model. The copy runs its classes' own forwards.
            for module in self.copy.modules():
                module.__dict__.pop("forward", None)

    @property
    def kind(self) -> str:
        return "the model with its PEFT adapters disabled" if self.peft else "a frozen copy of the starting weights"

    def logits(self, model, inputs: dict) -> torch.Tensor:
        """The starting model's logits on `inputs` (a training batch), detached."""
        with torch.no_grad():
            if self.peft:
                with _eval_mode(model), model.disable_adapter():
                    return _logits(model(**forward_inputs(model, inputs))).detach()
            return _logits(self.copy(**forward_inputs(self.copy, inputs))).detach()


def row_keys(inputs: dict) -> list:
    """One key per row of a batch: a digest of the row's tokens and labels (padding, by the attention mask, left
    out), so the same example gets the same key whatever its neighbours or its padding."""
    ids, labels = inputs["input_ids"], inputs["labels"]
    if labels.dim() == 2 and labels.shape[1] < ids.shape[1]:
        # ms-swift's logits_to_keep keeps the labels from the first supervised position on: the cut ones are all
        # unsupervised, so the full row's labels are these, padded back on the left
        labels = torch.nn.functional.pad(labels, (ids.shape[1] - labels.shape[1], 0), value=-100)
    mask = inputs.get("attention_mask")
    keys = []
    for r in range(ids.shape[0]):
        keep = slice(None) if mask is None or mask.dim() != 2 else mask[r].bool()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(ids[r][keep].detach().cpu().to(torch.int64).numpy().tobytes())
        digest.update(labels[r][keep].detach().cpu().to(torch.int64).numpy().tobytes())
        keys.append(digest.hexdigest())
    return keys


class FlowTable:
    """FLOW's starting losses and weights, one per training example (see the module doc)."""

    FILE = "flow_weights.json"

    def __init__(self, tau: Optional[float] = None, shown: str = "FLOW"):
        self.fixed_tau = tau
        self.shown = shown
        self.losses: dict = {}  # key -> starting loss
        self.weights: dict = {}  # key -> weight
        self.tau: Optional[float] = None

    def measure(self, model, batches: Iterable[dict]) -> None:
        """Add the starting losses of every row of `batches` (the training set, in any order), `model` being the
        starting model."""
        with torch.no_grad(), _eval_mode(model):
            for inputs in batches:
                logits = _logits(model(**forward_inputs(model, inputs)))
                for key, loss in zip(row_keys(inputs), sequence_losses(logits, inputs["labels"]).tolist()):
                    if loss == loss:  # NaN: a row with no supervised token teaches nothing
                        self.losses[key] = loss

    def merge(self, other: dict) -> None:
        self.losses.update(other)

    def finish(self) -> None:
        if not self.losses:
            raise ValueError(f"{self.shown}: the training set has no example with a supervised token")
        keys = sorted(self.losses)
        w, self.tau = flow_weights(torch.tensor([self.losses[k] for k in keys], dtype=torch.float64), self.fixed_tau)
        self.weights = dict(zip(keys, w.tolist()))

    def row_weights(self, inputs: dict, training: bool) -> torch.Tensor:
        """[B] weights of a micro-batch's rows. Evaluation weighs every row 1 (FLOW weighs training examples)."""
        rows = inputs["labels"].shape[0]
        if not training:
            return torch.ones(rows, dtype=torch.float64)
        out = []
        supervised = (inputs["labels"].reshape(rows, -1) != -100).any(1).tolist()
        for key, teaches in zip(row_keys(inputs), supervised):
            if not teaches:  # no supervised token: nothing to weigh (measure() skipped it too)
                out.append(1.0)
                continue
            if key not in self.weights:
                raise ValueError(
                    f"{self.shown}: a training row was not among the examples measured before the first step (the "
                    "rows must be the training examples as collated: packing and padding-free batches mix them); "
                    "turn packing off")
            out.append(self.weights[key])
        return torch.tensor(out, dtype=torch.float64)

    # ---- resuming: the starting model is gone, so its losses are kept next to the checkpoints

    def save(self, folder: str) -> str:
        path = os.path.join(folder, self.FILE)
        os.makedirs(folder, exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"tau": self.tau, "fixed_tau": self.fixed_tau, "losses": self.losses}, fh)
        return path

    def load(self, folder: str) -> bool:
        path = os.path.join(folder, self.FILE)
        if not os.path.isfile(path):
            return False
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        self.losses = dict(saved["losses"])
        self.finish()
        return True
