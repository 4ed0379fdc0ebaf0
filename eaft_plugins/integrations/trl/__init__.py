"""TRL: `SFTTrainer` with `SFTConfig(loss_type="eaft", eaft_topk=20, ...)`, and `trl sft --loss_type eaft`; the
same for the math table's other losses, `loss_type="sft_kl"`, `"flow"`, `"talr"` (their keys: sft_kl_*, flow_*,
talr_*). TRL's own `loss_type="dft"` is DFT.

Activated by the `.pth` bootstrap when `trl` is imported (entry point `trl` of `eaft_plugins.frameworks`):

* `trl.trainer.sft_config` is imported -> every setting of `options.SETTINGS` becomes an `SFTConfig` field
  (`eaft_topk`, ..., `eaft_fused`; default None = "not given", help from the schema) and "eaft" a choice of
  `loss_type`. The fields are added in place to the class, right after its module ran, so TRL's own
  TrlParser (the `trl sft` CLI and its YAML config), `SFTConfig(...)` and subclasses created afterwards
  all see them. `SFTConfig.__post_init__` refuses an `eaft_*` field without `loss_type="eaft"` (even at its
  default value), a bad value (naming the field), and `loss_type="eaft"` on an untested TRL release.
* `trl.trainer.sft_trainer` is imported -> `SFTTrainer.__init__` builds TRL's trainer as for "nll" (so the
  dataset, labels, completion / assistant masks, packing and PEFT are prepared exactly as for "nll") and
  then binds one `EAFTHook` (an `EAFTRun`) to it; `compute_loss` and `log` delegate to it for that trainer.
  The loss reads the `labels` TRL built and passes `num_items_in_batch` like TRL's "nll" does; TRL's own
  metrics (entropy, mean_token_accuracy, num_tokens) are still recorded from the same forward.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Optional

from ...hooks import when_imported
from ...activation import distribution_version, guarded, record_error, record_patch
from ...options import METHOD_KEYS, METHODS, LossConfig, Spelling, config_from_keys
from ...retention import keys as retention_keys
from .. import adapter

NAME = "trl"
LOSS_TYPE = "eaft"
LOSS_TYPES = tuple(METHODS)  # eaft, sft_kl, flow, talr: each a loss_type of SFTConfig
SPELLING = Spelling("SFTConfig field `{key}` (--{key})", "{key}={value}", 'loss_type="eaft"', python_values=True,
                    method_format='loss_type="{method}"')
# (release prefix, why it is supported). Others: loss_type="eaft" is refused, naming these.
SUPPORTED = (("0.24", "the release LLaMA-Factory 0.9.5 pins"), ("1.16", "the newest release, tested"))
SUPPORTED_TEXT = " and ".join(f"{v}.x ({why})" for v, why in SUPPORTED)
DOCTOR_IMPORTS = ("trl.trainer.sft_config", "trl.trainer.sft_trainer")


def trl_version() -> Optional[str]:
    return distribution_version("trl")


def version_supported(version: Optional[str]) -> bool:
    if version is None:
        return False
    parts = version.split(".")
    return any(parts[:2] == prefix.split(".") for prefix, _ in SUPPORTED)


@functools.lru_cache(maxsize=None)
def is_new_trl() -> bool:
    """TRL >= 1: SFTTrainer's own loss runs through its fused LM head (no logits). Read once per process."""
    try:
        return int((distribution_version("trl") or "0").split(".")[0]) >= 1
    except ValueError:
        return False


def check_config(args) -> Optional[LossConfig]:
    """Refuse an SFTConfig under which its loss method would not be applied; return the config (None: TRL's own
    loss)."""
    loss_type = getattr(args, "loss_type", None)
    method = loss_type if loss_type in LOSS_TYPES else None
    adapter.refuse_keys_of_other_methods(adapter.given_method_keys(args), method, SPELLING, f"loss_type={loss_type!r}")
    if method is None:
        return None
    spelling = SPELLING.for_method(method)
    version = trl_version()
    if not version_supported(version):
        raise ValueError(
            f"{spelling.enabled}: eaft-plugins supports TRL {SUPPORTED_TEXT}; found trl {version}. Install a supported "
            "release, e.g. pip install 'trl==1.16.0' (or 'trl==0.24.0'), or use another loss_type.")
    config = config_from_keys({k: getattr(args, k, None) for k in METHOD_KEYS[method]}, SPELLING, method)
    observed = [("liger", "use_liger_kernel", getattr(args, "use_liger_kernel", False)),
                ("label_smoothing", "label_smoothing_factor", getattr(args, "label_smoothing_factor", 0))]
    if method == "flow":
        observed += [("packing", "packing", getattr(args, "packing", False)),
                     ("packing", "padding_free", getattr(args, "padding_free", False))]
    adapter.refuse(spelling, observed + adapter.parallelism_observed(getattr(args, "parallelism_config", None),
                                                                     "parallelism_config"), config.fused)
    return config


# ---- SFTConfig fields ------------------------------------------------------------------------------


def extend_sft_config(cls) -> bool:
    """Our settings as SFTConfig fields in place, our methods among loss_type's choices, checked in __post_init__."""
    if not adapter.add_setting_fields(cls, SPELLING, framework=f"trl {trl_version()}", prepare=_add_loss_type_choice):
        return False

    def make(original):
        @functools.wraps(original)
        def __post_init__(self, *a, **kw):
            self.eaft_config = check_config(self)  # bad settings fail before the (slower) TrainingArguments set-up
            retention_keys.check_keys(self.retention_probe, self.retention_steps, SPELLING)
            original(self, *a, **kw)

        return __post_init__

    adapter.patch_method(cls, "__post_init__", make)
    return True


def _add_loss_type_choice(cls, annotations: dict, own_fields: dict) -> None:
    """Our methods among loss_type's choices (TRL 1.x checks them) and in its help."""
    loss_field = own_fields.get("loss_type")
    if loss_field is None:
        return
    meta = dict(loss_field.metadata)
    if "choices" in meta:
        meta["choices"] = list(meta["choices"]) + [m for m in LOSS_TYPES if m not in meta["choices"]]
    meta["help"] = (meta.get("help", "") + f" '{LOSS_TYPE}': Entropy-Adaptive Fine-Tuning (eaft-plugins; "
                    "its settings are the eaft_* fields). 'sft_kl', 'flow', 'talr': the EAFT paper's math baselines "
                    "SFT-KL, FLOW, TALR (eaft-plugins; sft_kl_*, flow_*, talr_* fields).").strip()
    loss_field.metadata = types.MappingProxyType(meta)
    if "loss_type" not in annotations:  # inherited: declare it here so the new metadata is used
        annotations["loss_type"] = loss_field.type
        setattr(cls, "loss_type", loss_field)


# ---- SFTTrainer ------------------------------------------------------------------------------------


def patch_sft_trainer(cls) -> bool:
    """Wrap SFTTrainer.__init__ / compute_loss / log; a trainer whose loss_type is not ours is untouched."""

    def make_init(init):
        signature = inspect.signature(init)

        @functools.wraps(init)
        def __init__(self, *a, **kw):
            init_eaft(self, init, signature, *a, **kw)
            if getattr(self.args, "retention_probe", None) is not None:
                retention_keys.attach(self, self.args.retention_probe, self.args.retention_steps, SPELLING)

        return __init__

    def init_eaft(self, init, signature, *a, **kw):
        bound = signature.bind(self, *a, **kw)
        args = bound.arguments.get("args")
        method = getattr(args, "loss_type", None)
        if method not in LOSS_TYPES:
            return init(self, *a, **kw)
        spelling = SPELLING.for_method(method)
        if type(self) is not cls and type(self).__module__.startswith("trl."):
            raise ValueError(f"{spelling.enabled} is for SFTTrainer; {type(self).__name__} computes its own loss")
        if bound.arguments.get("compute_loss_func") is not None:
            raise ValueError(f"{spelling.enabled} with a compute_loss_func: both replace the loss; pass only one of "
                             "the two")
        config = getattr(args, "eaft_config", None)
        if config is None or config.method != method:  # loss_type set after the SFTConfig was built
            args.eaft_config = check_config(args)
        run = adapter.run_for(args, SPELLING)
        args.loss_type = "nll"  # TRL prepares data, labels, PEFT and collator exactly as for its own "nll"
        try:
            init(self, *a, **kw)
        finally:
            args.loss_type = method
        self.args.loss_type = method
        from ..hf_trainer import EAFTHook

        run.router_aux = False  # _trl_metrics adds TRL's own router loss, dense and fused
        self._eaft = EAFTHook(run, extra_metrics=_trl_metrics).bind(self)

    def make_compute_loss(compute_loss):
        @functools.wraps(compute_loss)
        def eaft_compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            hook = self.__dict__.get("_eaft")
            if hook is None:
                return compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)
            if self.args.loss_type != hook.run.method:
                raise ValueError(f"trainer built with {hook.run.spelling.enabled}, but args.loss_type is now "
                                 f"{self.args.loss_type!r}")
            inputs["use_cache"] = False
            if getattr(self, "aux_loss_enabled", False) and is_new_trl():
                inputs["output_router_logits"] = True
            return hook.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

        return eaft_compute_loss

    def make_log(log):
        @functools.wraps(log)
        def eaft_log(self, logs, *a, **kw):
            hook = self.__dict__.get("_eaft")
            if hook is not None:
                hook.run.log(logs, self.args.device)
            return log(self, logs, *a, **kw)

        return eaft_log

    patched = [adapter.patch_method(cls, name, make) for name, make in
               (("__init__", make_init), ("compute_loss", make_compute_loss), ("log", make_log))]
    return any(patched)


def _trl_metrics(trainer, inputs, outputs, labels, mode, loss, num_items_in_batch):
    """After the EAFT loss: TRL's MoE aux loss and its own metrics, as its compute_loss records them."""
    import torch

    acc = trainer.accelerator
    metrics = trainer._metrics[mode]
    new = is_new_trl()
    aux = getattr(outputs, "aux_loss", None)
    if getattr(trainer, "aux_loss_enabled", False) and aux is not None:
        coef = getattr(trainer, "router_aux_loss_coef", None)
        if coef is None:
            config = getattr(trainer.accelerator.unwrap_model(trainer.model), "config", None)
            coef = getattr(config, "router_aux_loss_coef", 0.0) if config is not None else 0.0
        steps = trainer.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + coef * aux / steps
        metrics["aux_loss"].append(acc.gather_for_metrics(aux.detach()).mean().item())
    logits = getattr(outputs, "logits", None)
    if logits is not None:  # no logits with eaft_fused: no entropy / accuracy (as TRL with Liger)
        from trl.trainer.utils import entropy_from_logits

        with torch.no_grad():
            shift_labels = labels[..., 1:]
            mask = shift_labels != -100
            per_token_entropy = entropy_from_logits(logits[..., :-1, :] if new else logits)
            if new:  # TRL >= 1: over the supervised tokens
                valid = acc.gather_for_metrics(mask.sum()).sum()
                ent_sum = acc.gather_for_metrics((per_token_entropy * mask).sum()).sum()
                metrics["entropy"].append((ent_sum / valid).item() if valid > 0 else 0.0)
            elif "attention_mask" in inputs:  # TRL 0.24: over the attended positions
                am = inputs["attention_mask"]
                entropy = torch.sum(per_token_entropy * am) / am.sum()
                metrics["entropy"].append(acc.gather_for_metrics(entropy).mean().item())
            else:
                metrics["entropy"].append(acc.gather_for_metrics(per_token_entropy.mean()).mean().item())
            correct = (logits[..., :-1, :].argmax(dim=-1) == shift_labels) & mask
            total = acc.gather_for_metrics(mask.sum()).sum()
            right = acc.gather_for_metrics(correct.sum()).sum()
            metrics["mean_token_accuracy"].append((right / total).item() if total > 0 else 0.0)
    if mode == "train":
        if "attention_mask" in inputs:
            n = acc.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
        else:
            ids = inputs.get("position_ids", inputs.get("input_ids"))
            n = acc.gather_for_metrics(torch.tensor(ids.size(1), device=ids.device)).sum().item()
        trainer._total_train_tokens += n
    metrics["num_tokens"] = [trainer._total_train_tokens]
    return loss


# ---- activation ------------------------------------------------------------------------------------


def _extend(module) -> None:
    if extend_sft_config(module.SFTConfig):
        record_patch(NAME, f"trl.SFTConfig: loss_type {', '.join(repr(m) for m in LOSS_TYPES)}, their settings and "
                           "retention_* fields")
    version = trl_version()
    if not version_supported(version):
        record_error(NAME, f"trl {version} is not a supported release ({SUPPORTED_TEXT}): loss_type='eaft' (and our "
                           "other methods) is refused")


def _patch(module) -> None:
    if patch_sft_trainer(module.SFTTrainer):
        record_patch(NAME, "trl.SFTTrainer: __init__ / compute_loss / log (EAFT when loss_type='eaft'; SFT-KL, FLOW, "
                           "TALR for 'sft_kl', 'flow', 'talr')")


def activate() -> None:
    when_imported("trl.trainer.sft_config", guarded(NAME, "adding SFTConfig eaft_* fields", _extend))
    when_imported("trl.trainer.sft_trainer", guarded(NAME, "hooking SFTTrainer", _patch))
