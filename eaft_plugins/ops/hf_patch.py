"""Make a Llama / Qwen2 / Qwen3 causal LM compute its EAFT loss with the fused op (no logits).

Trainer side (what `eaft_fused: true` does), after any PEFT wrapping of the model:

    from eaft_plugins.ops.hf_patch import patch_model_for_fused_eaft

    fused = patch_model_for_fused_eaft(model, options)      # EAFTOptions / dict; once
    fused.mean_weight = prev_step_mean_weight                 # weight_norm="mean" (float, None or a callable)
    outputs = model(**inputs, num_items_in_batch=n)           # HF Trainer passes num_items_in_batch itself
    loss, stats = outputs.loss, outputs.eaft_stats            # stats: EAFTStats (sums) to log

When `labels` are given the patched forward runs the decoder, then
`fused_linear_eaft_loss(last_hidden_state, lm_head.weight, labels, bias=lm_head.bias, ...)`:
loss = sum_t w_t ce_t / N, exactly what `eaft_loss(model(...).logits, labels)` gives, with
`outputs.logits = None` (set `keep_logits=True` to also get logits when no gradient is taken,
e.g. for metrics in evaluation). Without labels the original forward runs (generation is
unchanged). The LM head weight is read inside forward, while it is live, the way Liger's
patches do, so DeepSpeed ZeRO-3 (which gathers parameters read during forward) and FSDP work.
Extra forward kwargs: `num_items_in_batch`, `shift_labels` (already shifted labels, as HF's
loss accepts), `eaft_token_scale` (per-token multiplier shaped like labels, e.g. ms-swift's
loss_scale before its roll). `fused.last_stats` holds the stats of the latest call;
`fused.unpatch()` restores the original forward.

Call it once, before training starts (HF Trainer's accelerator.prepare happens in train(), so
the trainer's __init__ is a good place). Only plain (floating-point) `nn.Linear` LM heads are
supported: a LoRA or modules_to_save wrapper on lm_head would be bypassed, so it raises. Other
model families raise ValueError naming the supported ones: never a silent dense fall-back.
"""

from __future__ import annotations

import types
from typing import Callable, Optional, Union

import torch
from torch import nn

from .fused import fused_linear_eaft_loss
from ..options import OptionsLike, make_options
from ..stats import EAFTStats

SUPPORTED = {
    "LlamaForCausalLM": "transformers.models.llama.modeling_llama",
    "Qwen2ForCausalLM": "transformers.models.qwen2.modeling_qwen2",
    "Qwen3ForCausalLM": "transformers.models.qwen3.modeling_qwen3",
}


class FusedEAFT:
    """Handle returned by `patch_model_for_fused_eaft`; the model keeps it as `model.eaft_fused`."""

    def __init__(self, model: nn.Module, options, chunk_size: Optional[int], keep_logits: bool):
        self.model = model
        self.options = options
        self.chunk_size = chunk_size
        self.keep_logits = keep_logits
        self.mean_weight: Union[float, torch.Tensor, Callable[[], Optional[float]], None] = None
        self.last_stats: Optional[EAFTStats] = None
        self._original_forward = model.forward  # the bound method of the class

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
    **overrides,
) -> FusedEAFT:
    """Patch `model` (a Llama/Qwen2/Qwen3 ForCausalLM, possibly PEFT- or DDP-wrapped) in place."""
    opts = make_options(options, **overrides)
    lm = causal_lm_of(model)
    _check_lm_head(lm)
    existing = lm.__dict__.get("eaft_fused")
    if existing is not None:  # re-patching replaces the options, never stacks forwards
        existing.unpatch()
    handle = FusedEAFT(lm, opts, chunk_size, keep_logits)
    lm.eaft_fused = handle
    lm.forward = types.MethodType(_fused_forward, lm)
    return handle


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The supported ForCausalLM inside PEFT / DDP / DeepSpeed wrappers; ValueError otherwise."""
    seen = model
    for _ in range(8):
        if _supported_class(seen) is not None:
            return seen
        if hasattr(seen, "get_base_model"):  # peft.PeftModel
            seen = seen.get_base_model()
        elif isinstance(getattr(seen, "module", None), nn.Module):  # DDP, DeepSpeedEngine
            seen = seen.module
        else:
            break
    names = ", ".join(sorted(SUPPORTED))
    raise ValueError(
        f"fused EAFT supports {names}; got {type(seen).__name__}"
    )


def _supported_class(module: nn.Module) -> Optional[str]:
    import importlib

    for name, path in SUPPORTED.items():
        cls = getattr(importlib.import_module(path), name, None)
        if cls is not None and isinstance(module, cls):
            return name
    return None


def _check_lm_head(lm: nn.Module) -> None:
    head = getattr(lm, "lm_head", None)
    plain = isinstance(head, nn.Linear) and head.weight.is_floating_point()  # FSDP2's FSDPLinear is a subclass
    if plain and any(c.__name__ in ("BaseTunerLayer", "LoraLayer") for c in type(head).__mro__):
        plain = False
    if not plain:
        raise ValueError(
            f"fused EAFT needs a plain nn.Linear lm_head, got {type(head).__name__} (e.g. LoRA or modules_to_save "
            "on lm_head, whose delta the fused op would skip); leave lm_head out of the adapter"
        )


def _fused_forward(
    self,
    input_ids=None,
    attention_mask=None,
    position_ids=None,
    past_key_values=None,
    inputs_embeds=None,
    labels=None,
    use_cache=None,
    logits_to_keep=0,
    **kwargs,
):
    handle: FusedEAFT = self.eaft_fused
    shifted = kwargs.pop("shift_labels", None)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache)
    if labels is None and shifted is None:
        return handle._original_forward(**inputs, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    token_scale = kwargs.pop("eaft_token_scale", None)
    _check_lm_head(self)
    outputs = self.model(**inputs, **kwargs)
    hidden = outputs.last_hidden_state
    slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    hidden = hidden[:, slice_indices, :]
    head = self.lm_head
    out = fused_linear_eaft_loss(
        hidden,
        head.weight,  # read here, inside forward: ZeRO-3 / FSDP have it gathered
        shifted if shifted is not None else labels,
        bias=head.bias,
        options=handle.options,
        num_items_in_batch=num_items_in_batch,
        shift=shifted is None,
        mean_weight=handle.current_mean_weight(),
        token_scale=token_scale,
        chunk_size=handle.chunk_size,
    )
    handle.last_stats = out.stats
    logits = head(hidden) if handle.keep_logits and not torch.is_grad_enabled() else None
    result = CausalLMOutputWithPast(
        loss=out.loss,
        logits=logits,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
    result.eaft_stats = out.stats
    return result
