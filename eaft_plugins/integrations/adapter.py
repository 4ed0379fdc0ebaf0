"""What every framework adapter does alike, written once; a framework module keeps only what is its own.

* `add_setting_fields(cls, spelling)`: the user settings of `options.USER_SETTINGS` (every method's keys and the
  retention keys) become fields of the framework's argument dataclass, in place;
* `refuse(spelling, observed, fused)`: the combinations under which a loss method would silently not run, one table
  (`REFUSALS`) for every framework; the framework only reports its own keys and values;
* `refuse_keys_without_eaft` / `refuse_keys_of_other_methods`: a method's keys (eaft_*, flow_*, ...) given while
  that method is off;
* `run_for(args, spelling)`: a trainer's EAFTRun (of any method), from the config its parsed arguments carry (never a
  default);
* `patch_method`: a method wrapped once, with one marker.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Optional, Tuple

from ..options import ALL_METHOD_KEYS, KEYS, METHODS, SETTINGS_BY_KEY, USER_SETTINGS, LossConfig, Spelling
from ..run import EAFTRun
from .fields import add_fields

MARK = "__eaft_plugins__"


def patch_method(owner, name: str, make: Callable) -> bool:
    """`owner.name = make(original)` once; False when the method `owner` resolves is our wrapper already (its own
    or inherited from a patched parent: wrapping again would run EAFT's part twice)."""
    original = getattr(owner, name)
    if getattr(original, MARK, False):
        return False
    new = make(original)
    setattr(new, MARK, True)
    if not hasattr(new, "__wrapped__"):
        new.__wrapped__ = original
    setattr(owner, name, new)
    return True


# ---- argument fields


def setting_fields(spelling: Spelling, defaults: Optional[dict] = None) -> dict:
    """{key: (type, help, default)} for every user setting; default None ("not given") unless `defaults` says.
    `%` is doubled: argparse formats help texts (`--help` would fail on a bare `3% of`)."""
    out = {}
    for s in USER_SETTINGS:
        prefix = (f"{METHODS[s.method].title} ({spelling.for_method(s.method).enabled})" if s.group != "retention"
                  else "Retention monitor")
        help_text = f"{prefix}: {s.help} (default {s.default_text})".replace("%", "%%")
        out[s.key] = (s.field_type, help_text, (defaults or {}).get(s.key))
    return out


def add_setting_fields(cls, spelling: Spelling, *, extra: Optional[dict] = None, defaults: Optional[dict] = None,
                       upstream: Iterable[str] = (), framework: str = "", prepare=None) -> bool:
    """Our keys as fields of the dataclass `cls`, in place (see fields.add_fields); False when it (or a class it
    inherits from) already has them. `prepare`: see fields.add_fields.

    `upstream`: keys the framework may define itself (left as it defines them); any other of our keys already
    defined means a release we do not know, whose meaning we would shadow: RuntimeError."""
    if any(klass.__dict__.get(MARK) for klass in cls.__mro__):
        return False
    new = dict(extra or {})
    new.update(setting_fields(spelling, defaults))
    have = {f.name for f in dataclasses.fields(cls)}
    clash = sorted(have & set(new) - set(upstream))
    if clash:
        raise RuntimeError(f"{framework or cls.__name__} defines {clash} itself; eaft-plugins would shadow them. "
                           "Upgrade eaft-plugins, or set EAFT_PLUGINS_DISABLE=1")
    add_fields(cls, {k: v for k, v in new.items() if k not in have}, prepare)
    setattr(cls, MARK, True)
    return True


def given_keys(args, keys=KEYS) -> dict:
    """The settings among `keys` (default: eaft_*) given on a parsed arguments object (not None)."""
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def refuse_keys_without_eaft(keys, spelling: Spelling, state: str) -> None:
    """eaft_* keys while EAFT is off (`state` says how it is off) are an error, even at their default value."""
    refuse_keys_of_other_methods(keys, None, spelling, state)


def refuse_keys_of_other_methods(keys, active, spelling: Spelling, state: str) -> None:
    """Keys of a method other than `active` (None: no method on), e.g. flow_tau with --loss_type eaft, are an error
    even at their default value; `state` says what is on instead ("{method}" in it: the keys' method). The first
    method with such keys is named."""
    for method in METHODS:
        own = [k for k in keys if k in SETTINGS_BY_KEY and SETTINGS_BY_KEY[k].method == method]
        if own and method != active:
            raise ValueError(f"{', '.join(spelling.shown(k) for k in own)} set but {state.format(method=method)}: "
                             f"{METHODS[method].title} "
                             f"settings only apply with {spelling.for_method(method).enabled}; add it or drop them")


def given_method_keys(args) -> dict:
    """Every method's settings given on a parsed arguments object (eaft_*, sft_kl_*, flow_*, talr_*; not None)."""
    return given_keys(args, ALL_METHOD_KEYS)


def run_for(args, spelling: Spelling) -> EAFTRun:
    """The trainer's EAFTRun, from the LossConfig that the framework's argument patch put on `args`."""
    config = getattr(args, "eaft_config", None)
    if not isinstance(config, LossConfig):
        raise RuntimeError(f"{spelling.enabled} is set, but eaft-plugins did not parse the EAFT settings of these "
                           "arguments (its argument patch did not run): run `python -m eaft_plugins doctor`; never "
                           "falling back to default settings silently")
    return EAFTRun(config, spelling)


# ---- refused combinations

# concept -> (refused when (value, fused), message, the value that lifts it). In a message, {enabled} is how the
# method was turned on, {title} its name (EAFT, SFT-KL, FLOW, TALR), {shown} the framework's key as written there,
# {value} its value, {fix} the key set to the value that lifts the refusal, {fused} / {dense} <method>_fused set to
# true / false, {fused_or} "Set {fused} (...) or " where the method has a fused path, else "Set ".
REFUSALS = {
    "liger": (lambda v, fused: bool(v) and not fused,
              "{enabled} with {shown}: the dense {title} loss needs the full logits, which Liger's fused cross-entropy "
              "exists to avoid (its memory saving would be lost). {fused_or}{fix}", False),
    "label_smoothing": (lambda v, fused: (v or 0) > 0,
                        "{enabled} with {shown} {value}: {title} replaces the loss, so the smoothing would be dropped "
                        "silently; set {fix}", 0),
    "parallel": (lambda v, fused: (v or 1) > 1,
                 "{enabled} does not support {shown} {value}: the {title} loss and its statistics need each token's "
                 "full-vocabulary logits exactly once per data-parallel rank; set {fix}", 1),
    "replicas": (lambda v, fused: (v or 1) > 1,
                 "{enabled} does not support nn.DataParallel (several GPUs visible to one process, {shown} {value}): "
                 "launch with torchrun / accelerate launch (one process per GPU) or make one GPU visible with "
                 "CUDA_VISIBLE_DEVICES", 1),
    "channel_loss": (lambda v, fused: bool(v) and fused,
                     "{fused} with {shown}: the per-channel losses need per-token losses from the logits, which the "
                     "fused path never builds; set {dense} or {fix}", False),
    "other_loss": (lambda v, fused: bool(v),
                   "{enabled} and {shown} both replace the loss (the framework would silently run one); keep one: "
                   "{fix}", False),
    "packing": (lambda v, fused: bool(v),
                "{enabled} with {shown}: FLOW weighs each training example by its own starting loss, and a packed or "
                "padding-free row mixes examples; set {fix}", False),
}

Observed = Tuple[str, str, object]  # (concept of REFUSALS, the framework's key, its value)


def refusals(spelling: Spelling, observed: Iterable[Observed], fused: bool) -> list:
    """The messages of every refused combination among `observed`, in the framework's words."""
    out = []
    method = METHODS[spelling.method]
    fused_key = f"{method.name}_fused"
    fused_or = (f"Set {spelling.assign(fused_key, True)} (fused {method.title} from the hidden states and the LM "
                "head; Liger's other kernels stay) or " if method.fused else "Set ")
    for concept, key, value in observed:
        refused, message, lifted = REFUSALS[concept]
        if refused(value, fused):
            out.append(message.format(
                enabled=spelling.enabled, title=method.title, shown=spelling.shown(key), value=value,
                fix=spelling.assign(key, lifted), fused=spelling.assign(fused_key, True),
                dense=spelling.assign(fused_key, False), fused_or=fused_or))
    return out


def refuse(spelling: Spelling, observed: Iterable[Observed], fused: bool, extra: Iterable[str] = ()) -> None:
    """ValueError listing every refused combination (the framework's own `extra` problems too)."""
    problems = list(extra) + refusals(spelling, observed, fused)
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{spelling.enabled} cannot run as configured:\n- " + "\n- ".join(problems))


def parallelism_observed(config, owner: str) -> list:
    """Context / sequence / tensor parallel sizes of an accelerate ParallelismConfig, as REFUSALS observations."""
    if config is None:
        return []
    return [("parallel", f"{owner}.{size}", getattr(config, size, 1) or 1)
            for enabled, size in (("cp_enabled", "cp_size"), ("sp_enabled", "sp_size"), ("tp_enabled", "tp_size"))
            if getattr(config, enabled, False)]
