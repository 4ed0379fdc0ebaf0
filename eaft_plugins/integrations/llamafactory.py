"""LLaMA-Factory integration: `use_eaft_loss: true` in a `llamafactory-cli train` YAML.

LLaMA-Factory has no plugin discovery. The `.pth` bootstrap calls `activate()` when
`llamafactory` is imported (in every process, torchrun workers included); it arms hooks that
patch two modules as they load:

* `llamafactory.hparams.parser`: `FinetuningArguments` is replaced in the parser lists by a
  subclass with our keys (so `eaft_topk` etc. parse), and `get_train_args` refuses every setting
  under which EAFT would silently not run;
* `llamafactory.train.sft.trainer`: `CustomSeq2SeqTrainer` uses our core loss instead of
  upstream's (0.9.5) or none (0.9.4), and adds `eaft/*` metrics to its logs.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

from .. import _bootstrap
from ..activation import guarded, distribution_version, record_error, record_patch
from ..options import EAFTOptions
from ..stats import StatsAccumulator

NAME = "llamafactory"
SUPPORTED_VERSIONS = ("0.9.4", "0.9.5")
DOCTOR_IMPORTS = ("llamafactory.hparams.parser", "llamafactory.train.sft.trainer")

# YAML key -> EAFTOptions field. All default to None: "unset", so a key given without
# use_eaft_loss is caught, and EAFTOptions supplies the real defaults.
OPTION_KEYS = {
    "eaft_topk": "topk",
    "eaft_entropy_norm": "entropy_norm",
    "eaft_gate": "gate",
    "eaft_h_min": "h_min",
    "eaft_p_min": "p_min",
    "eaft_weight_norm": "weight_norm",
}
UPSTREAM_KEYS = ("use_eaft_loss", "eaft_alpha")  # LLaMA-Factory 0.9.5 defines these itself
OUR_KEYS = tuple(OPTION_KEYS) + ("eaft_log_metrics", "eaft_fused")

_state = {"unsupported": None}  # why EAFT must be refused in this environment, if it must


def _fields_to_add(base) -> list:
    have = {f.name for f in dataclasses.fields(base)}
    clash = sorted(have & set(OUR_KEYS))
    if clash:
        raise RuntimeError(
            f"llamafactory {distribution_version(NAME)} defines {clash} itself; eaft-plugins would shadow them. "
            "Upgrade eaft-plugins, or set EAFT_PLUGINS_DISABLE=1 to use upstream's EAFT"
        )
    new = []
    if "use_eaft_loss" not in have:
        new.append(("use_eaft_loss", bool, dataclasses.field(default=False, metadata={"help": "Use the EAFT loss."})))
    if "eaft_alpha" not in have:
        new.append(("eaft_alpha", float, dataclasses.field(default=1.0, metadata={"help": "EAFT weight exponent."})))
    help_text = {
        "eaft_topk": "EAFT: entries of the top-K entropy (int >= 2, or 'full'). Default 20.",
        "eaft_entropy_norm": "EAFT: ln_k (default), upstream (divide by 3.0) or none.",
        "eaft_gate": "EAFT: soft (default), hard (drop confident conflicts) or shuffle (control).",
        "eaft_h_min": "EAFT: confident-conflict entropy threshold. Default 0.15.",
        "eaft_p_min": "EAFT: confident-conflict probability threshold. Default 0.1.",
        "eaft_weight_norm": "EAFT: none (default) or mean (divide weights by last step's mean).",
    }
    types = {"eaft_topk": Optional[str], "eaft_entropy_norm": Optional[str], "eaft_gate": Optional[str],
             "eaft_h_min": Optional[float], "eaft_p_min": Optional[float], "eaft_weight_norm": Optional[str]}
    for key in OPTION_KEYS:
        new.append((key, types[key], dataclasses.field(default=None, metadata={"help": help_text[key]})))
    new.append(("eaft_log_metrics", Optional[bool],
                dataclasses.field(default=None, metadata={"help": "EAFT: log eaft/* metrics (default true)."})))
    new.append(("eaft_fused", Optional[bool], dataclasses.field(
        default=None, metadata={"help": "EAFT: compute the loss from hidden states and the LM head, no logits "
                                        "(Llama / Qwen2 / Qwen3). Default false."})))
    return new


def eaft_options(finetuning_args) -> EAFTOptions:
    """EAFTOptions from the YAML keys; errors name the key and its allowed values."""
    values = {"alpha": finetuning_args.eaft_alpha}
    for key, field in OPTION_KEYS.items():
        value = getattr(finetuning_args, key)
        if value is not None:
            values[field] = _topk(value) if key == "eaft_topk" else value
    try:
        return EAFTOptions(**values)
    except ValueError as exc:
        option = str(exc).split()[0]
        key = {v: k for k, v in OPTION_KEYS.items()}.get(option, "eaft_alpha" if option == "alpha" else option)
        raise ValueError(f"LLaMA-Factory key `{key}`: {exc}") from None


def _topk(value):
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _set_keys(finetuning_args) -> list:
    return [k for k in OUR_KEYS if getattr(finetuning_args, k, None) is not None]


def _make_args_class(base):
    new_fields = _fields_to_add(base)

    def __post_init__(self):
        base.__post_init__(self)
        if self.use_eaft_loss:
            self.eaft_options = eaft_options(self)
        else:
            given = _set_keys(self)
            if given:
                raise ValueError(f"{given} set but use_eaft_loss is false: add `use_eaft_loss: true` or remove them")
            self.eaft_options = None

    cls = dataclasses.make_dataclass(base.__name__, new_fields, bases=(base,), namespace={"__post_init__": __post_init__})
    cls.__module__ = __name__
    return cls


def check_combination(model_args, training_args, finetuning_args) -> None:
    """Refuse, before any training step, every setting where EAFT would silently not run."""
    if not getattr(finetuning_args, "use_eaft_loss", False):
        return
    if _state["unsupported"]:
        raise ValueError(_state["unsupported"])
    problems = []
    if finetuning_args.stage != "sft":
        problems.append(f"stage: {finetuning_args.stage} ignores the loss; EAFT needs `stage: sft`")
    if getattr(finetuning_args, "use_mca", False):
        problems.append("the Megatron Core Adapter (use_mca / USE_MCA=1) ignores use_eaft_loss; unset USE_MCA "
                        "(for Megatron use `megatron sft --loss_type eaft` from ms-swift, docs/megatron.md)")
    if getattr(finetuning_args, "use_hyper_parallel", False):
        problems.append("use_hyper_parallel runs its own workflow with upstream's EAFT; unset use_hyper_parallel")
    for other in ("use_dft_loss", "use_asft_loss"):
        if getattr(finetuning_args, other, False):
            problems.append(f"{other} and use_eaft_loss both set (upstream silently picks one); keep one")
    fused = bool(getattr(finetuning_args, "eaft_fused", False))
    if getattr(model_args, "enable_liger_kernel", False) and not fused:
        # Liger's fused linear CE returns no logits. With eaft_fused our per-model forward replaces
        # Liger's (Liger's norm / MLP / RoPE kernels stay), so the pair is allowed.
        problems.append("enable_liger_kernel computes a fused CE without logits, so EAFT cannot see them; "
                        "add `eaft_fused: true` (fused EAFT, keeps Liger's other kernels) or set enable_liger_kernel: false")
    if (getattr(training_args, "label_smoothing_factor", 0) or 0) > 0:
        problems.append("label_smoothing_factor > 0 is ignored once a custom loss is set; set label_smoothing_factor: 0")
    if problems:
        raise ValueError("use_eaft_loss: true cannot run as configured:\n- " + "\n- ".join(problems))


def _patch_parser(parser) -> None:
    base = parser.FinetuningArguments
    if getattr(base, "_eaft_plugins", False):
        return
    try:
        cls = _make_args_class(base)
    except RuntimeError as exc:
        _state["unsupported"] = str(exc)
        record_error(NAME, str(exc))
        _guard_get_train_args(parser)
        return
    cls._eaft_plugins = True
    for name in ("_TRAIN_ARGS", "_TRAIN_MCA_ARGS", "_EVAL_ARGS", "_INFER_ARGS"):
        group = getattr(parser, name, None)
        if isinstance(group, list) and base in group:
            group[group.index(base)] = cls
            record_patch(NAME, f"hparams.parser.{name}: FinetuningArguments + eaft_* keys")
    parser.FinetuningArguments = cls
    _guard_get_train_args(parser)


def _guard_get_train_args(parser) -> None:
    original = parser.get_train_args

    def get_train_args(args=None):
        if _state["unsupported"] and _requests_eaft(parser.read_args(args)):
            raise ValueError(_state["unsupported"])
        parsed = original(args)
        model_args, _, training_args, finetuning_args, _ = parsed
        check_combination(model_args, training_args, finetuning_args)
        return parsed

    get_train_args.__wrapped__ = original
    parser.get_train_args = get_train_args
    record_patch(NAME, "hparams.parser.get_train_args: refuses settings where EAFT would not run")


def _requests_eaft(args) -> bool:
    if isinstance(args, dict):
        return bool(args.get("use_eaft_loss")) or any(str(k).startswith("eaft_") for k in args)
    return any("eaft" in str(a) for a in args or [])


def _patch_v1(launcher) -> None:
    """USE_V1=1 runs LLaMA-Factory's v1 trainer, which has no EAFT: refuse EAFT configs there."""
    original = launcher.launch

    def launch(*args, **kwargs):
        if any("eaft" in a for a in sys.argv[1:]) or any(_file_mentions_eaft(a) for a in sys.argv[1:]):
            raise ValueError("the v1 trainer (USE_V1=1) ignores use_eaft_loss; unset USE_V1 to train with EAFT")
        return original(*args, **kwargs)

    launcher.launch = launch
    record_patch(NAME, "v1.launcher.launch: refuses EAFT configs (v1 has no EAFT)")


def _file_mentions_eaft(path: str) -> bool:
    if not path.endswith((".yaml", ".yml", ".json")) or not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return "use_eaft_loss" in text or "eaft_" in text


class TrainerEAFT:
    """The loss callable a CustomSeq2SeqTrainer uses, with its metric and weight_norm state."""

    def __init__(self, trainer, options: EAFTOptions, log_metrics: bool):
        self.trainer = trainer
        self.options = options
        self.log_metrics = log_metrics
        self.acc = {"train": StatsAccumulator(), "eval": StatsAccumulator()}
        self.step_acc = StatsAccumulator()  # this optimizer step, for weight_norm="mean"
        self.mean_weight = None
        self._step = None
        self.fused = None  # the FusedEAFT handle when eaft_fused is on

    def __call__(self, outputs, labels, num_items_in_batch=None):
        """The dense path: the trainer's compute_loss_func, on the model's logits."""
        from ..loss import eaft_loss

        logits = outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)
        if logits is None:
            raise ValueError(
                "use_eaft_loss needs the model's logits, but the forward pass returned none (a fused loss kernel, "
                "or sequence/context parallel); disable that or set use_eaft_loss: false"
            )
        training = self.begin()
        out = eaft_loss(logits, labels, options=self.options, num_items_in_batch=num_items_in_batch,
                        mean_weight=self.mean_weight if training else None)
        self.record(out.stats, training)
        return out.loss

    def begin(self) -> bool:
        """Before a micro-batch's loss: whether it trains (and, for weight_norm, the step's divisor)."""
        training = self.trainer.model.training
        if training and self.options.weight_norm == "mean":
            self._start_step()
        return training

    def record(self, stats, training: bool) -> None:
        self.acc["train" if training else "eval"].add(stats)
        if training and self.options.weight_norm == "mean":
            self.step_acc.add(stats)

    def _start_step(self) -> None:
        """On the first micro-batch of an optimizer step, the last step's global mean raw weight."""
        step = self.trainer.state.global_step
        if step == self._step:
            return
        if self._step is not None:  # every rank reaches this at the same micro-batch
            total = self.step_acc.pop(device=self.trainer.args.device)
            self.mean_weight = total.raw_mean_weight
        self._step = step

    def metrics(self, mode: str, prefix: str) -> dict:
        """Reduced over ranks (a collective: every rank calls it from Trainer.log)."""
        stats = self.acc[mode].pop(device=self.trainer.args.device)
        return {k: v for k, v in stats.means(prefix).items()}


def _check_topk_fits(options: EAFTOptions, model) -> None:
    """eaft_topk larger than the vocabulary: stop now, naming the key, not at the first loss call."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None and weight.dim() == 2:
        try:
            options.check_vocab(weight.shape[0])
        except ValueError as exc:
            raise ValueError(f"LLaMA-Factory key `eaft_topk`: {exc}") from None


def _use_fused(trainer, finetuning_args) -> None:
    """eaft_fused: the model's own forward computes the EAFT loss from hidden states and the LM head
    (fused op, no logits), the way Liger patches a model; the trainer passes it labels and
    num_items_in_batch, and reads the stats the forward left behind."""
    from ..fused_model import patch_model_for_fused_eaft

    eaft = trainer._eaft
    try:  # logits only where eval metrics need them (compute_accuracy), never with a gradient
        eaft.fused = patch_model_for_fused_eaft(trainer.model, eaft.options,
                                                keep_logits=bool(getattr(finetuning_args, "compute_accuracy", False)))
    except ValueError as exc:
        raise ValueError(f"LLaMA-Factory key `eaft_fused`: {exc}") from None
    eaft.fused.mean_weight = lambda: eaft.mean_weight if trainer.model.training else None
    trainer.compute_loss_func = None  # upstream 0.9.5 set its own EAFT loss func here
    trainer.model_accepts_loss_kwargs = True  # the patched forward takes num_items_in_batch


def _patch_trainer(trainer_module) -> None:
    cls = trainer_module.CustomSeq2SeqTrainer
    if getattr(cls, "_eaft_plugins", False):
        return
    original_init, original_log, original_compute_loss = cls.__init__, cls.log, cls.compute_loss

    def __init__(self, finetuning_args, *args, **kwargs):
        original_init(self, finetuning_args, *args, **kwargs)
        options = getattr(finetuning_args, "eaft_options", None)
        if getattr(finetuning_args, "use_eaft_loss", False):
            if options is None:  # the parser patch did not run: never fall back silently
                raise RuntimeError("use_eaft_loss is set but eaft-plugins did not patch the argument parser; "
                                   "run `python -m eaft_plugins doctor`")
            _check_topk_fits(options, self.model)
            log_metrics = finetuning_args.eaft_log_metrics is not False
            self._eaft = TrainerEAFT(self, options, log_metrics)
            if finetuning_args.eaft_fused:
                _use_fused(self, finetuning_args)
            else:
                self.compute_loss_func = self._eaft

    def compute_loss(self, model, inputs, *args, **kwargs):
        eaft = getattr(self, "_eaft", None)
        if eaft is None or eaft.fused is None:
            return original_compute_loss(self, model, inputs, *args, **kwargs)
        if "labels" not in inputs:
            raise ValueError("eaft_fused: the batch has no labels, so the model would compute no EAFT loss")
        training = eaft.begin()
        eaft.fused.last_stats = None
        result = original_compute_loss(self, model, inputs, *args, **kwargs)
        if eaft.fused.last_stats is None:  # e.g. a wrapper that replaced our forward
            raise RuntimeError("eaft_fused: the model's forward did not run the fused EAFT loss; "
                               "set eaft_fused: false and report this model setup")
        eaft.record(eaft.fused.last_stats, training)
        return result

    def log(self, logs, *args, **kwargs):
        eaft = getattr(self, "_eaft", None)
        if eaft is not None and eaft.log_metrics:
            if "loss" in logs:
                logs.update(eaft.metrics("train", "eaft/"))
            elif "eval_loss" in logs:
                logs.update(eaft.metrics("eval", "eval_eaft/"))
        return original_log(self, logs, *args, **kwargs)

    cls.__init__, cls.log, cls.compute_loss, cls._eaft_plugins = __init__, log, compute_loss, True
    record_patch(NAME, "train.sft.trainer.CustomSeq2SeqTrainer: EAFT loss from eaft_plugins, eaft/* metrics")


def _guarded(what, callback):
    return guarded(NAME, what, callback)


def activate() -> None:
    version = distribution_version(NAME)
    if version not in SUPPORTED_VERSIONS:
        _state["unsupported"] = (
            f"eaft-plugins supports llamafactory {', '.join(SUPPORTED_VERSIONS)}; found {version}. "
            f"Install one of those (pip install 'llamafactory>={SUPPORTED_VERSIONS[0]},<={SUPPORTED_VERSIONS[-1]}')"
        )
        record_error(NAME, _state["unsupported"])
        _bootstrap.when_imported("llamafactory.hparams.parser", _guarded("version guard", _guard_get_train_args))
        return
    _bootstrap.when_imported("llamafactory.hparams.parser", _guarded("patching the argument parser", _patch_parser))
    _bootstrap.when_imported("llamafactory.train.sft.trainer", _guarded("patching the SFT trainer", _patch_trainer))
    _bootstrap.when_imported("llamafactory.v1.launcher", _guarded("guarding the v1 launcher", _patch_v1))
