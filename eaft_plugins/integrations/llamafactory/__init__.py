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
import json
import os
import sys

from ... import _bootstrap
from ...activation import distribution_version, guarded, record_error, record_patch
from ...options import KEYS, SETTINGS, EAFTConfig, Spelling, config_from_keys, parse_bool
from ...retention import keys as retention_keys
from ...run import EAFTRun

NAME = "llamafactory"
SUPPORTED_VERSIONS = ("0.9.4", "0.9.5")
DOCTOR_IMPORTS = ("llamafactory.hparams.parser", "llamafactory.train.sft.trainer")

SPELLING = Spelling("LLaMA-Factory key `{key}`", "`{key}: {value}`")
RETENTION_SHOWN = "LLaMA-Factory key `{key}`"
UPSTREAM_KEYS = ("use_eaft_loss", "eaft_alpha")  # LLaMA-Factory 0.9.5 defines these itself
OUR_KEYS = tuple(k for k in KEYS if k not in UPSTREAM_KEYS)

_state = {"unsupported": None}  # why EAFT must be refused in this environment, if it must


def _fields_to_add(base) -> list:
    """The eaft_* keys LLaMA-Factory lacks, from the option schema. Ours default to None ("not given")."""
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
    for setting in SETTINGS:
        if setting.key in have:
            continue
        default = 1.0 if setting.key == "eaft_alpha" else None  # as upstream 0.9.5 declares it
        new.append((setting.key, setting.field_type, dataclasses.field(
            default=default, metadata={"help": f"EAFT: {setting.help} (default {setting.default_text})"})))
    for key, (field_type, help_text) in retention_keys.FIELDS.items():  # any loss, not EAFT keys
        if key not in have:
            new.append((key, field_type, dataclasses.field(default=None, metadata={"help": help_text})))
    return new


def eaft_config(finetuning_args) -> EAFTConfig:
    """EAFTConfig from the eaft_* keys; errors name the key and its allowed values."""
    return config_from_keys({s.name: getattr(finetuning_args, s.key, None) for s in SETTINGS}, SPELLING)


def _set_keys(finetuning_args) -> list:
    return [k for k in OUR_KEYS if getattr(finetuning_args, k, None) is not None]


def _refuse_keys_without_eaft(given) -> None:
    if given:
        raise ValueError(f"{sorted(given)} set but use_eaft_loss is false: add `use_eaft_loss: true` or remove them")


def _make_args_class(base):
    new_fields = _fields_to_add(base)

    def __post_init__(self):
        base.__post_init__(self)
        # YAML may quote it ('false'), which would be truthy as a string.
        self.use_eaft_loss = parse_bool(self.use_eaft_loss, "LLaMA-Factory key `use_eaft_loss`")
        if self.use_eaft_loss:
            self.eaft_config = eaft_config(self)
            self.eaft_options = self.eaft_config.options
            self.eaft_fused, self.eaft_log_metrics = self.eaft_config.fused, self.eaft_config.log_metrics
        else:
            _refuse_keys_without_eaft(_set_keys(self))  # keys with an upstream default: see check_written_keys
            self.eaft_config = self.eaft_options = None
        retention_keys.check_keys(self.retention_probe, self.retention_steps, RETENTION_SHOWN)

    cls = dataclasses.make_dataclass(base.__name__, new_fields, bases=(base,), namespace={"__post_init__": __post_init__})
    cls.__module__ = __name__
    return cls


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


def check_written_keys(raw) -> bool:
    """Whether the written keys ask for EAFT; eaft_* keys without `use_eaft_loss: true` are refused."""
    written = written_keys(raw)
    on = written.get("use_eaft_loss")
    on = False if on is None else parse_bool(on, "LLaMA-Factory key `use_eaft_loss`")
    if not on:
        _refuse_keys_without_eaft([k for k in written if k in KEYS])
    return on


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
    fused = finetuning_args.eaft_config.fused
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
        wants_eaft = check_written_keys(parser.read_args(args))
        if _state["unsupported"] and wants_eaft:
            raise ValueError(_state["unsupported"])
        parsed = original(args)
        model_args, _, training_args, finetuning_args, _ = parsed
        check_combination(model_args, training_args, finetuning_args)
        if getattr(finetuning_args, "retention_probe", None) is not None and finetuning_args.stage != "sft":
            raise ValueError(f"LLaMA-Factory key `retention_probe` needs `stage: sft` (got {finetuning_args.stage}): "
                             "the monitor is installed on the SFT trainer; drop retention_probe")
        return parsed

    get_train_args.__wrapped__ = original
    parser.get_train_args = get_train_args
    record_patch(NAME, "hparams.parser.get_train_args: refuses settings where EAFT would not run")


def _patch_v1(launcher) -> None:
    """USE_V1=1 runs LLaMA-Factory's v1 trainer, which has no EAFT: refuse configs that ask for EAFT."""
    original = launcher.launch

    def launch(*args, **kwargs):
        if check_written_keys(_raw_cli_args()):
            raise ValueError("the v1 trainer (USE_V1=1) ignores use_eaft_loss; unset USE_V1 to train with EAFT")
        return original(*args, **kwargs)

    launcher.launch = launch
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
    """Build the trainer's EAFTRun and route its loss through it: the dense compute_loss_func, or with
    eaft_fused the model's own forward (fused op, no logits), the way Liger patches a model."""
    config = getattr(finetuning_args, "eaft_config", None)
    if config is None:  # the parser patch did not run: never fall back silently
        raise RuntimeError("use_eaft_loss is set but eaft-plugins did not patch the argument parser; "
                           "run `python -m eaft_plugins doctor`")
    run = trainer._eaft = EAFTRun(config, SPELLING)
    run.check_vocab(trainer.model)
    if config.fused:
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
    if getattr(cls, "_eaft_plugins", False):
        return
    original_init, original_log, original_compute_loss = cls.__init__, cls.log, cls.compute_loss

    def __init__(self, finetuning_args, *args, **kwargs):
        original_init(self, finetuning_args, *args, **kwargs)
        if getattr(finetuning_args, "use_eaft_loss", False):
            _use_eaft(self, finetuning_args)
        if getattr(finetuning_args, "retention_probe", None) is not None:
            retention_keys.attach(self, finetuning_args.retention_probe, finetuning_args.retention_steps,
                                  RETENTION_SHOWN)

    def compute_loss(self, model, inputs, *args, **kwargs):
        run = getattr(self, "_eaft", None)
        if run is None or run.fused is None:
            return original_compute_loss(self, model, inputs, *args, **kwargs)
        if "labels" not in inputs:
            raise ValueError("eaft_fused: the batch has no labels, so the model would compute no EAFT loss")
        training = self.model.training
        run.begin_fused(training, self.state.global_step, self.args.device)
        result = original_compute_loss(self, model, inputs, *args, **kwargs)
        run.end_fused(training)
        return result

    def log(self, logs, *args, **kwargs):
        run = getattr(self, "_eaft", None)
        if run is not None and run.log_metrics:
            if "loss" in logs:
                logs.update(run.metrics("train", self.args.device))
            elif "eval_loss" in logs:
                logs.update(run.metrics("eval", self.args.device))
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
