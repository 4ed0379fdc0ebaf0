"""Make a Hugging Face causal LM compute its EAFT loss with the fused op (no logits).

Trainer side (what `eaft_fused: true` does), after any PEFT wrapping of the model:

    from eaft_plugins import patch_model_for_fused_eaft

    fused = patch_model_for_fused_eaft(model, options)      # EAFTOptions / dict; once
    fused.mean_weight = prev_step_mean_weight                 # weight_norm="mean" (float, None or a callable)
    outputs = model(**inputs, num_items_in_batch=n)           # HF Trainer passes num_items_in_batch itself
    loss, stats = outputs.loss, outputs.eaft_stats            # stats: EAFTStats (sums) to log

Which families: `models/reader.py` reads each family's forward and refuses, with a ValueError naming the
statement, what the op cannot reproduce.

With labels the patched forward runs the family's own forward (compiled from its source, so a later
class-level patch such as Liger's does not change it) with `labels=None` and the LM head swapped for
a stub that keeps its input: the decoder runs exactly as the family runs it, and with
`output_router_logits` the family computes `aux_loss` itself. Then
`fused_linear_eaft_loss(hidden, lm_head.weight, labels, bias=..., logit_transform=...)` gives
sum_t w_t ce_t / N, exactly what `eaft_loss(model(...).logits, labels)` gives, plus
`coef * aux_loss` as the family adds it (`fused.add_aux_loss = False` where the framework adds the
router loss itself). `outputs.logits` is None (`keep_logits=True`: the real head runs when no
gradient is taken, e.g. for eval metrics). Without labels the original forward runs (generation
is unchanged). The LM head weight is read inside forward, never through the head module, the way
Liger's patches do, so DeepSpeed ZeRO-3 and FSDP see it read during forward.
Extra forward kwargs: `num_items_in_batch`, `shift_labels` (already shifted labels, as HF's
loss accepts), `eaft_token_scale` (per-token multiplier shaped like labels, e.g. ms-swift's
loss_scale before its roll). `fused.last_stats` holds the stats of the latest call;
`fused.unpatch()` restores the original forward.

Call it once, before training starts (HF Trainer's accelerator.prepare happens in train(), so
the trainer's __init__ is a good place). Only plain (floating-point) `nn.Linear` LM heads are
supported: a LoRA or modules_to_save wrapper on lm_head would be bypassed, so it raises.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import fields
from typing import Callable, Optional, Union

import torch
from torch import nn

from ..ops.fused import fused_linear_eaft_loss
from ..options import METHODS, OptionsLike, make_method_options, make_options
from ..stats import EAFTStats
from .reader import HEAD_ATTRS, FamilyPlan, causal_lm_of, describe_model, router_aux_coef


class FusedEAFT:
    """Handle returned by `patch_model_for_fused_eaft`; the model keeps it as `model.eaft_fused`."""

    def __init__(self, model: nn.Module, options, chunk_size: Optional[int], keep_logits: bool, plan: FamilyPlan,
                 method: str = "eaft"):
        self.model = model
        self.options = options
        self.method = method  # eaft, flow or talr (ops.fused)
        self.sample_weights = None  # FLOW: the next call's weight of each row of labels [B]
        self.chunk_size = chunk_size
        self.keep_logits = keep_logits
        self.plan = plan
        self.add_aux_loss = True  # False where the framework adds coef * aux_loss itself (ms-swift, TRL)
        self.mean_weight: Union[float, torch.Tensor, Callable[[], Optional[float]], None] = None
        self.last_stats: Optional[EAFTStats] = None
        self._original_forward = model.forward  # the bound method of the class (or a wrapper's)

    def current_mean_weight(self):
        return self.mean_weight() if callable(self.mean_weight) else self.mean_weight

    def unpatch(self) -> None:
        self.model.__dict__.pop("forward", None)
        self.model.__dict__.pop("eaft_fused", None)


def patch_model_for_fused_eaft(
    model: nn.Module,
    options: OptionsLike = None,
    *,
    chunk_size: Optional[int] = None,
    keep_logits: bool = False,
    method: str = "eaft",
    **overrides,
) -> FusedEAFT:
    """Patch `model` (a supported ForCausalLM, possibly PEFT- or DDP-wrapped) in place; see the module doc.
    `method` "flow" / "talr" (options: FLOWOptions / TALROptions) computes that loss instead (FLOW: set
    `handle.sample_weights` before each call)."""
    if method != "eaft" and not METHODS[method].fused:
        raise ValueError(f"{METHODS[method].title} has no fused path ({METHODS[method].fused_why_not})")
    opts = (make_options(options, **overrides) if method == "eaft"
            else make_method_options(METHODS[method].options, options, **overrides))
    plan = describe_model(model)
    lm = causal_lm_of(model)
    _check_lm_head(lm, plan.head)
    existing = lm.__dict__.get("eaft_fused")
    if existing is not None:  # re-patching replaces the options, never stacks forwards
        existing.unpatch()
    handle = FusedEAFT(lm, opts, chunk_size, keep_logits, plan, method)
    lm.eaft_fused = handle
    # A copy of the function carrying the family's signature: HF Trainer picks dataset columns and
    # loss kwargs from inspect.signature(model.forward).
    fn = types.FunctionType(_fused_forward.__code__, _fused_forward.__globals__, "forward")
    fn.__signature__ = inspect.signature(plan.forward)
    lm.forward = types.MethodType(fn, lm)
    return handle


def _check_lm_head(lm: nn.Module, name: str = "lm_head") -> None:
    head = getattr(lm, name, None)
    plain = isinstance(head, nn.Linear) and head.weight.is_floating_point()  # FSDP2's FSDPLinear is a subclass
    if plain and any(c.__name__ in ("BaseTunerLayer", "LoraLayer") for c in type(head).__mro__):
        plain = False
    if plain and type(head).forward is not nn.Linear.forward:  # e.g. Dory's learned per-token logit scale
        raise ValueError(f"fused EAFT needs a plain nn.Linear {name}: {type(head).__name__} has a forward of its "
                         f"own, which the fused op (hidden @ weight.T + bias) would skip")
    if not plain:
        raise ValueError(
            f"fused EAFT needs a plain nn.Linear {name}, got {type(head).__name__} (e.g. LoRA or modules_to_save "
            f"on {name}, whose delta the fused op would skip); leave {name} out of the adapter"
        )


class _HeadStub(nn.Module):
    """Stands in for the LM head during the family's forward: keeps its input, returns no logits, and answers
    reads of the real head's weight, bias and sizes (HEAD_ATTRS)."""

    def __init__(self, real: nn.Module, run: bool):
        super().__init__()
        self.real = [real]  # a list: not registered as a submodule
        self.run = run
        self.hidden = None

    def __getattr__(self, name):
        # e.g. Mamba's `self.lm_head(hidden.to(self.lm_head.weight.dtype))`; the reader refuses other reads
        if name in HEAD_ATTRS:
            return getattr(self.__dict__["real"][0], name)
        return super().__getattr__(name)

    def forward(self, hidden):
        self.hidden = hidden
        if self.run:
            return self.real[0](hidden)
        return hidden.new_empty(*hidden.shape[:-1], 0)


def _fused_forward(self, *args, **kwargs):
    handle: FusedEAFT = self.eaft_fused
    plan = handle.plan
    if args:  # positional arguments, bound the way the original forward binds them
        bound = inspect.signature(handle._original_forward).bind_partial(*args, **kwargs)
        extra = bound.arguments.pop("kwargs", {}) if "kwargs" in bound.arguments else {}
        kwargs = {**bound.arguments, **extra}
    labels = kwargs.pop("labels", None)
    shifted = kwargs.pop("shift_labels", None)
    if labels is None and shifted is None:
        return handle._original_forward(**kwargs)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    token_scale = kwargs.pop("eaft_token_scale", None)
    _check_lm_head(self, plan.head)
    head = getattr(self, plan.head)
    keep = handle.keep_logits and not torch.is_grad_enabled()
    stub = _HeadStub(head, run=keep)
    self._modules[plan.head] = stub  # the head module is never called: its weight is read below, inside forward
    try:
        outputs = plan.forward(self, **kwargs)
    finally:
        self._modules[plan.head] = head
    if not isinstance(outputs, dict):
        raise ValueError("fused EAFT needs the model's outputs as a ModelOutput; do not pass return_dict=False")
    if stub.hidden is None:
        raise RuntimeError(f"fused EAFT: {plan.family}'s forward did not call its LM head")
    out = fused_linear_eaft_loss(
        stub.hidden,
        head.weight,  # read here, inside forward: ZeRO-3 / FSDP have it gathered
        shifted if shifted is not None else labels,
        bias=head.bias,
        options=handle.options,
        num_items_in_batch=num_items_in_batch,
        shift=shifted is None,
        mean_weight=handle.current_mean_weight(),
        token_scale=token_scale,
        chunk_size=handle.chunk_size,
        logit_transform=plan.transform,
        **({} if handle.method == "eaft" else {"method": handle.method, "sample_weights": handle.sample_weights}),
    )
    handle.last_stats = out.stats
    loss = out.loss
    aux = outputs.get("aux_loss")
    if handle.add_aux_loss and aux is not None and plan.aux_coef is not None:
        # as the family adds it (some return a plain 0 when no router logits were collected)
        loss = loss + router_aux_coef(self) * torch.as_tensor(aux, device=loss.device)
    values = {f.name: getattr(outputs, f.name) for f in fields(outputs)}
    values.update(loss=loss, logits=values.get("logits") if keep else None)
    result = type(outputs)(**values)
    result.eaft_stats = out.stats
    return result
