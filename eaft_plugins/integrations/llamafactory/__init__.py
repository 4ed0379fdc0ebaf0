"""LLaMA-Factory integration: `use_eaft_loss: true` in a `llamafactory-cli train` YAML (and the math table's other
losses: `use_sft_kl_loss`, `use_flow_loss`, `use_talr_loss: true`, with their sft_kl_* / flow_* / talr_* keys;
LLaMA-Factory's own `use_dft_loss: true` is DFT).

LLaMA-Factory has no plugin discovery. The `.pth` bootstrap calls `activate()` when
`llamafactory` is imported (in every process, torchrun workers included); it arms hooks that
patch three modules as they load:

* `llamafactory.hparams.finetuning_args`: `FinetuningArguments` gains our keys in place (so `eaft_topk`,
  `retention_probe` etc. parse) and checks them in `__post_init__`;
* `llamafactory.hparams.parser`: `get_train_args` refuses every setting under which EAFT would silently not run;
* `llamafactory.train.sft.trainer`: `CustomSeq2SeqTrainer` uses our core loss instead of upstream's (0.9.5)
  or none (0.9.4), and adds `eaft/*` metrics to its logs.
"""

from __future__ import annotations

import json
import os
import sys

from ...hooks import when_imported
from ...activation import distribution_version, guarded, record_error, record_patch
from ...options import ALL_METHOD_KEYS, KEYS, METHOD_KEYS, METHODS, Spelling, config_from_keys, parse_bool
from ...retention import keys as retention_keys
from .. import adapter, methods

NAME = "llamafactory"
SUPPORTED_VERSIONS = ("0.9.4", "0.9.5")
DOCTOR_IMPORTS = ("llamafactory.hparams.parser", "llamafactory.train.sft.trainer")

SPELLING = Spelling("LLaMA-Factory key `{key}`", "`{key}: {value}`", "`use_eaft_loss: true`",
                    method_format="`use_{method}_loss: true`")
UPSTREAM_KEYS = ("use_eaft_loss", "eaft_alpha")  # LLaMA-Factory 0.9.5 defines these itself
EAFT_OFF = "use_eaft_loss is false"
METHOD_OFF = "use_{method}_loss is false"
FLAGS = {m: f"use_{m}_loss" for m in METHODS}  # use_eaft_loss, use_sft_kl_loss, use_flow_loss, use_talr_loss

_state = {"unsupported": None}  # why EAFT must be refused in this environment, if it must


def active_method(values, set_back=None):
    """The method whose use_<method>_loss is true among `values` ({key: value}), None when none is; two are refused.
    YAML may quote a flag ('false'), which would be truthy as a string: each is parsed (and, given `set_back`, an
    object, written back parsed)."""
    on = []
    for method, flag in FLAGS.items():
        value = values.get(flag)
        value = False if value is None else parse_bool(value, SPELLING.shown(flag))
        if set_back is not None and hasattr(set_back, flag):
            setattr(set_back, flag, value)
        if value:
            on.append(method)
    if len(on) > 1:
        raise ValueError(f"{', '.join(SPELLING.assign(FLAGS[m], True) for m in on)}: each chooses the loss, and "
                         "LLaMA-Factory would run one; keep one")
    return on[0] if on else None


def _check(self) -> None:
    """FinetuningArguments.__post_init__, after LLaMA-Factory's own: our keys parsed and checked."""
    method = active_method({flag: getattr(self, flag, None) for flag in FLAGS.values()}, set_back=self)
    # keys with an upstream default (eaft_alpha) are not "given" here: see check_written_keys
    given = [k for k in ALL_METHOD_KEYS if k not in UPSTREAM_KEYS and getattr(self, k, None) is not None]
    adapter.refuse_keys_of_other_methods(given, method, SPELLING, METHOD_OFF)
    if method is not None:
        self.eaft_config = config_from_keys({k: getattr(self, k, None) for k in METHOD_KEYS[method]}, SPELLING, method)
        self.eaft_options = self.eaft_config.options
        setattr(self, f"{method}_fused", self.eaft_config.fused)
        setattr(self, f"{method}_log_metrics", self.eaft_config.log_metrics)
    else:
        self.eaft_config = self.eaft_options = None
    retention_keys.check_keys(self.retention_probe, self.retention_steps, SPELLING)


def extend_finetuning_arguments(cls) -> bool:
    """Our keys as fields of LLaMA-Factory's FinetuningArguments (in place), checked in its __post_init__."""
    # 0.9.4 has neither use_eaft_loss nor eaft_alpha: add them with 0.9.5's defaults.
    extra = {"use_eaft_loss": (bool, "Use the EAFT loss.", False)}
    extra.update({flag: (bool, f"Use the {METHODS[m].title} loss (eaft-plugins, docs/loss.md).", False)
                  for m, flag in FLAGS.items() if m != "eaft"})
    if not adapter.add_setting_fields(cls, SPELLING, extra=extra, defaults={"eaft_alpha": 1.0},
                                      upstream=UPSTREAM_KEYS, framework=f"llamafactory {distribution_version(NAME)}"):
        return False

    def make(original):
        def __post_init__(self, *args, **kwargs):
            original(self, *args, **kwargs)
            _check(self)

        return __post_init__

    adapter.patch_method(cls, "__post_init__", make)
    return True


def written_keys(raw) -> dict:
    """The keys the user wrote, with their raw values: a config dict (YAML / JSON + overrides), or argv
    (`--key value`, `--key=value`, a bare `--flag`). Decides by what was written, not by defaults."""
    if isinstance(raw, dict):
        return dict(raw)
    out, items = {}, [str(t) for t in raw or []]
    for i, token in enumerate(items):
        if not token.startswith("--"):
            continue
        key, sep, value = token[2:].partition("=")
        if not sep:
            value = items[i + 1] if i + 1 < len(items) and not items[i + 1].startswith("--") else True
        out[key] = value
    return out


def wants_eaft(written: dict) -> bool:
    """Whether the written keys ask for one of our methods: `use_eaft_loss: true` (or use_flow_loss, ...), or any
    of their keys."""
    flags = [written.get(flag) for flag in FLAGS.values()]
    return (any(on is not None and parse_bool(on, SPELLING.shown("use_eaft_loss")) for on in flags)
            or any(k in ALL_METHOD_KEYS for k in written))


def check_written_keys(raw) -> bool:
    """Whether the written keys turn a method on; its keys without `use_<method>_loss: true` are refused (eaft_*
    keys without `use_eaft_loss: true`, ...)."""
    written = written_keys(raw)
    method = active_method(written)
    adapter.refuse_keys_of_other_methods([k for k in written if k in ALL_METHOD_KEYS], method, SPELLING, METHOD_OFF)
    return method is not None


def check_combination(model_args, training_args, finetuning_args, data_args=None) -> None:
    """Refuse, before any training step, every setting where the loss method (or the retention monitor) would not
    run."""
    if getattr(finetuning_args, "retention_probe", None) is not None:
        if finetuning_args.stage != "sft":
            raise ValueError(f"{SPELLING.shown('retention_probe')} needs `stage: sft` (got {finetuning_args.stage}): "
                             "the monitor is installed on the SFT trainer; drop retention_probe")
        if not training_args.do_train:
            raise ValueError(f"{SPELLING.shown('retention_probe')} needs `do_train: true`: the monitor measures during "
                             "training; drop retention_probe (or measure afterwards with eaft-repro)")
    config = getattr(finetuning_args, "eaft_config", None)
    if config is None:
        return
    if _state["unsupported"]:
        raise ValueError(_state["unsupported"])
    title, flag = config.title, FLAGS[config.method]
    extra = []
    if finetuning_args.stage != "sft":
        extra.append(f"stage: {finetuning_args.stage} ignores the loss; {title} needs `stage: sft`")
    if getattr(finetuning_args, "use_mca", False):
        fix = ("(for Megatron use `megatron sft --loss_type eaft` from ms-swift, docs/megatron.md)"
               if config.method == "eaft" else "")
        extra.append(f"the Megatron Core Adapter (use_mca / USE_MCA=1) ignores {flag}; unset USE_MCA {fix}".rstrip())
    if getattr(finetuning_args, "use_hyper_parallel", False):
        own = " with upstream's EAFT" if config.method == "eaft" else ""
        extra.append(f"use_hyper_parallel runs its own workflow{own}; unset use_hyper_parallel")
    observed = [("liger", "enable_liger_kernel", getattr(model_args, "enable_liger_kernel", False)),
                ("label_smoothing", "label_smoothing_factor", getattr(training_args, "label_smoothing_factor", 0)),
                ("other_loss", "use_dft_loss", getattr(finetuning_args, "use_dft_loss", False)),
                ("other_loss", "use_asft_loss", getattr(finetuning_args, "use_asft_loss", False))]
    if config.method == "flow" and data_args is not None:
        observed += [("packing", "packing", getattr(data_args, "packing", False)),
                     ("packing", "neat_packing", getattr(data_args, "neat_packing", False))]
    # With eaft_fused our per-model forward replaces Liger's (its norm / MLP / RoPE kernels stay): allowed.
    adapter.refuse(SPELLING.for_method(config.method), observed, config.fused, extra)


def _guard_get_train_args(parser) -> None:
    def make(original):
        def get_train_args(args=None):
            written = written_keys(parser.read_args(args))
            if _state["unsupported"] and wants_eaft(written):
                raise ValueError(_state["unsupported"])
            check_written_keys(written)
            parsed = original(args)
            model_args, data_args, training_args, finetuning_args, _ = parsed
            check_combination(model_args, training_args, finetuning_args, data_args)
            return parsed

        return get_train_args

    if adapter.patch_method(parser, "get_train_args", make):
        record_patch(NAME, "hparams.parser.get_train_args: refuses settings where EAFT would not run")


def _patch_arguments(module) -> None:
    try:
        if extend_finetuning_arguments(module.FinetuningArguments):
            record_patch(NAME, "hparams.finetuning_args.FinetuningArguments: eaft_* and retention_* keys")
    except RuntimeError as exc:  # a release that defines our keys itself
        _state["unsupported"] = str(exc)
        record_error(NAME, str(exc))


def _patch_v1(launcher) -> None:
    """USE_V1=1 runs LLaMA-Factory's v1 trainer, which has no EAFT: refuse configs that ask for EAFT."""
    def make(original):
        def launch(*args, **kwargs):
            if wants_eaft(written_keys(_raw_cli_args())):
                raise ValueError("the v1 trainer (USE_V1=1) ignores use_eaft_loss and every eaft_* key (and "
                                 "eaft-plugins' other losses); unset USE_V1 to train with EAFT")
            return original(*args, **kwargs)

        return launch

    if adapter.patch_method(launcher, "launch", make):
        record_patch(NAME, "v1.launcher.launch: refuses EAFT configs (v1 has no EAFT)")


def _raw_cli_args():
    """What `llamafactory-cli train ...` was given, read the way LLaMA-Factory's parser reads it."""
    argv = sys.argv[1:]
    if argv and argv[0] in ("train", "sft"):
        argv = argv[1:]
    if argv and argv[0].endswith((".yaml", ".yml", ".json")) and os.path.isfile(argv[0]):
        from omegaconf import OmegaConf

        if argv[0].endswith(".json"):
            with open(argv[0], encoding="utf-8") as fh:
                config = OmegaConf.create(json.load(fh))
        else:
            config = OmegaConf.load(argv[0])
        return OmegaConf.to_container(OmegaConf.merge(config, OmegaConf.from_cli(argv[1:])))
    return argv


def _logits(outputs):
    return outputs.get("logits") if isinstance(outputs, dict) else getattr(outputs, "logits", None)


def _use_eaft(trainer, finetuning_args) -> None:
    """Build the trainer's EAFTRun (of the chosen method) and route its loss through it: the dense compute_loss_func,
    or with <method>_fused the model's own forward (fused op, no logits), the way Liger patches a model."""
    run = trainer._eaft = adapter.run_for(finetuning_args, SPELLING)
    run.check_vocab(trainer.model)
    methods.bind(trainer, run)
    if run.config.fused:
        # Logits only where eval metrics need them (compute_accuracy), never with a gradient.
        run.patch_fused(trainer.model, keep_logits=bool(getattr(finetuning_args, "compute_accuracy", False)))
        trainer.compute_loss_func = None  # upstream 0.9.5 set its own EAFT loss func here
        trainer.model_accepts_loss_kwargs = True  # the patched forward takes num_items_in_batch
        return

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        return run.dense_loss(_logits(outputs), labels, training=trainer.model.training,
                              step=trainer.state.global_step, device=trainer.args.device,
                              num_items_in_batch=num_items_in_batch, outputs=outputs, model=trainer.model)

    trainer.compute_loss_func = compute_loss_func


def _patch_trainer(trainer_module) -> None:
    cls = trainer_module.CustomSeq2SeqTrainer

    def make_init(original):
        def __init__(self, finetuning_args, *args, **kwargs):
            original(self, finetuning_args, *args, **kwargs)
            if getattr(finetuning_args, "eaft_config", None) is not None:
                _use_eaft(self, finetuning_args)
            if getattr(finetuning_args, "retention_probe", None) is not None:
                retention_keys.attach(self, finetuning_args.retention_probe, finetuning_args.retention_steps,
                                      SPELLING)

        return __init__

    def make_compute_loss(original):
        def compute_loss(self, model, inputs, *args, **kwargs):
            run = getattr(self, "_eaft", None)
            if run is not None and run.needs_inputs:
                run.prepare(self.model, inputs, self.model.training)
            if run is None or run.fused is None:
                return original(self, model, inputs, *args, **kwargs)
            return run.fused_forward(self.model.training, self.state.global_step, self.args.device,
                                     inputs.get("labels"), lambda: original(self, model, inputs, *args, **kwargs))

        return compute_loss

    def make_log(original):
        def log(self, logs, *args, **kwargs):
            run = getattr(self, "_eaft", None)
            if run is not None:
                run.log(logs, self.args.device)
            return original(self, logs, *args, **kwargs)

        return log

    patched = [adapter.patch_method(cls, name, make) for name, make in
               (("__init__", make_init), ("compute_loss", make_compute_loss), ("log", make_log))]
    if any(patched):
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
        when_imported("llamafactory.hparams.parser", _guarded("version guard", _guard_get_train_args))
        return
    when_imported("llamafactory.hparams.finetuning_args",
                             _guarded("adding eaft_* keys to FinetuningArguments", _patch_arguments))
    when_imported("llamafactory.hparams.parser", _guarded("guarding get_train_args", _guard_get_train_args))
    when_imported("llamafactory.train.sft.trainer", _guarded("patching the SFT trainer", _patch_trainer))
    when_imported("llamafactory.v1.launcher", _guarded("guarding the v1 launcher", _patch_v1))
