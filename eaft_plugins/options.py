"""Loss options: one validated, frozen record per method, shared by every op and integration.

EAFT (`EAFTOptions`) is the package's own loss; SFT-KL, FLOW and TALR (`SFTKLOptions`, `FLOWOptions`,
`TALROptions`) are the paper's math-table baselines (docs/loss.md). `METHODS` names them; every framework key of
every method (`<method>_<field>`, e.g. `eaft_topk`, `flow_tau`) comes from `USER_SETTINGS`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Union

ENTROPY_NORMS = ("ln_k", "upstream", "none")
GATES = ("soft", "hard", "shuffle")
WEIGHT_NORMS = ("none", "mean")
KL_DIRECTIONS = ("forward", "reverse")

# LLaMA-Factory 0.9.5 divides the top-20 entropy by this constant instead of ln(20).
UPSTREAM_ENTROPY_DIVISOR = 3.0


@dataclass(frozen=True)
class EAFTOptions:
    """Options of the EAFT loss. Defaults follow the paper (top-20 entropy / ln 20, alpha 1).

    Each user-facing field carries its help text in `metadata["help"]`: the framework keys, flags
    and config fields, `eaft-analyze`'s flags and the option tables in docs/ are generated from it
    (see `SETTINGS`). `weight_norm="mean"` and the statistics are explained in docs/loss.md.
    """

    topk: Optional[int] = field(default=20, metadata={
        "help": "entries of the top-K distribution whose entropy gates each token: an integer >= 2, or 'full' "
                "(exact entropy over the whole vocabulary)", "kind": "topk"})
    alpha: float = field(default=1.0, metadata={
        "help": "exponent on the normalised entropy: weight = Htilde ** alpha, >= 0", "kind": "float"})
    entropy_norm: str = field(default="ln_k", metadata={
        "help": "what the entropy is divided by: ln_k (ln K, or ln |V| for 'full'), upstream (3.0, like "
                "LLaMA-Factory 0.9.5) or none (raw nats, like Axolotl)", "kind": "choice", "choices": ENTROPY_NORMS})
    gate: str = field(default="soft", metadata={
        "help": "soft (weight = Htilde ** alpha), hard (weight 0 for confident conflicts, 1 otherwise: the "
                "paper's masked-SFT ablation) or shuffle (soft weights permuted across the micro-batch's tokens: "
                "a control)", "kind": "choice", "choices": GATES})
    h_min: float = field(default=0.15, metadata={
        "help": "a token is a confident conflict when Htilde < h_min and p(label) < p_min (hard gate, "
                "conflict_frac metric), >= 0", "kind": "float"})
    p_min: float = field(default=0.1, metadata={
        "help": "label-probability threshold of a confident conflict, in [0, 1]", "kind": "float"})
    weight_norm: str = field(default="none", metadata={
        "help": "none, or mean: divide the weights by the previous optimizer step's global mean weight "
                "(the same divisor in evaluation)", "kind": "choice", "choices": WEIGHT_NORMS})
    # Set by the framework or the op's caller, not a framework key ("internal").
    ignore_index: int = field(default=-100, metadata={
        "help": "label value of an unsupervised position", "kind": "int", "internal": True})
    chunk_size: Optional[int] = field(default=None, metadata={
        "help": "rows upcast to fp32 at a time, an integer >= 1; None picks ~16M fp32 elements per chunk",
        "kind": "int", "internal": True})

    def __post_init__(self) -> None:
        topk = self.topk
        if isinstance(topk, str):
            check_option("topk", topk)
            object.__setattr__(self, "topk", None)
        for f in fields(self):
            if f.name != "topk" or not isinstance(topk, str):
                check_option(f.name, getattr(self, f.name))

    def check_vocab(self, vocab_size: int) -> None:
        if self.topk is not None and self.topk > vocab_size:
            raise ValueError(f"topk={self.topk} is larger than the vocabulary ({vocab_size}); use topk <= {vocab_size}")

    def entropy_divisor(self, vocab_size: int) -> float:
        """What H is divided by to give Htilde."""
        if self.entropy_norm == "upstream":
            return UPSTREAM_ENTROPY_DIVISOR
        if self.entropy_norm == "none":
            return 1.0
        return math.log(self.topk if self.topk is not None else vocab_size)

    def rows_per_chunk(self, vocab_size: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        # ~16M fp32 elements (64 MB) of upcast logits per chunk.
        return max(1, (1 << 24) // max(1, vocab_size))

    def replace(self, **changes) -> "EAFTOptions":
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))


class _Checked:
    """Validation and helpers shared by the baselines' option records (each field checked by `check_option`)."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            check_option(f.name, value)
            if f.name == "tau" and isinstance(value, str):  # "median" is stored as None
                object.__setattr__(self, "tau", None)

    def rows_per_chunk(self, vocab_size: int) -> int:
        return EAFTOptions.rows_per_chunk(self, vocab_size)

    def replace(self, **changes):
        return replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in fields(cls))


def _ignore_index():
    return field(default=-100, metadata={"help": "label value of an unsupervised position", "kind": "int",
                                         "internal": True})


def _chunk_size():
    return field(default=None, metadata={"help": "rows upcast to fp32 at a time, an integer >= 1; None picks ~16M "
                                                 "fp32 elements per chunk", "kind": "int", "internal": True})


@dataclass(frozen=True)
class SFTKLOptions(_Checked):
    """SFT-KL: cross-entropy plus beta times a per-token KL to the frozen starting model (docs/loss.md)."""

    beta: float = field(default=0.5, metadata={
        "help": "weight of the KL term: loss = CE + beta * KL at each supervised token, >= 0 (0.5: the EAFT paper's "
                "SFT-KL baseline)", "kind": "float"})
    direction: str = field(default="forward", metadata={
        "help": "forward: KL(p_start || p), the starting model's distribution first (LLaMA-Factory's ASFT term); "
                "reverse: KL(p || p_start)", "kind": "choice", "choices": KL_DIRECTIONS})
    ignore_index: int = _ignore_index()
    chunk_size: Optional[int] = _chunk_size()


@dataclass(frozen=True)
class FLOWOptions(_Checked):
    """FLOW (Sanyal et al., ICML 2025): each training example weighted by exp(-L_start / tau), L_start its mean
    token cross-entropy under the starting model, computed once before training (docs/loss.md)."""

    tau: Optional[float] = field(default=None, metadata={
        "help": "temperature of the example weights w = exp(-L_start / tau): `median` (the median of the training "
                "examples' starting losses, the official code's rule) or a positive number", "kind": "tau"})
    ignore_index: int = _ignore_index()
    chunk_size: Optional[int] = _chunk_size()


@dataclass(frozen=True)
class TALROptions(_Checked):
    """TALR (Lin et al., 2025): each token's cross-entropy weighted by max(p ** (1/tau), min_weight), detached,
    p the model's probability of the label (docs/loss.md)."""

    tau: Optional[float] = field(default=None, metadata={
        "help": "temperature of the token weights w = max(p ** (1/tau), min_weight): `median` (per micro-batch, the "
                "median over its sequences of their mean token cross-entropy) or a positive number", "kind": "tau"})
    min_weight: float = field(default=0.01, metadata={
        "help": "floor of a token's weight, in [0, 1]", "kind": "float"})
    ignore_index: int = _ignore_index()
    chunk_size: Optional[int] = _chunk_size()


OptionsLike = Union[EAFTOptions, dict, None]


def make_options(options: OptionsLike = None, **overrides) -> EAFTOptions:
    """Build options from an EAFTOptions, a dict, and/or keyword overrides (validated)."""
    return make_method_options(EAFTOptions, options, **overrides)


def make_method_options(cls, options=None, /, **overrides):
    """A method's option record (`cls`: EAFTOptions, SFTKLOptions, FLOWOptions, TALROptions) from a record, a dict
    and/or keyword overrides (validated)."""
    if options is None:
        base = {}
    elif isinstance(options, cls):
        if not overrides:
            return options
        base = {f: getattr(options, f) for f in cls.field_names()}
    elif isinstance(options, dict):
        base = dict(options)
    else:
        raise TypeError(f"options must be {cls.__name__}, dict or None, got {type(options).__name__}")
    base.update(overrides)
    unknown = sorted(set(base) - set(cls.field_names()))
    if unknown:
        name = cls.__name__[: -len("Options")]  # EAFT, SFTKL, FLOW, TALR
        raise ValueError(f"unknown {name} option(s) {unknown}; allowed: {list(cls.field_names())}")
    return cls(**base)


def check_option(name: str, value) -> None:
    """Validate one EAFTOptions field; the message starts with the field name and gives the allowed values."""
    if name == "topk":
        if isinstance(value, str):
            if value.strip().lower() not in ("full", "none"):
                raise ValueError(f"topk must be an integer >= 2 or 'full' (exact entropy), got {value!r}")
        elif value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
            raise ValueError(f"topk must be an integer >= 2 or 'full' (exact entropy), got {value!r}")
    elif name in ("alpha", "h_min"):
        _check_number(name, value, low=0.0)
    elif name == "p_min":
        _check_number(name, value, low=0.0, high=1.0)
    elif name in _CHOICES:
        if value not in _CHOICES[name]:
            raise ValueError(f"{name} must be one of {list(_CHOICES[name])}, got {value!r}")
    elif name == "beta":
        _check_number(name, value, low=0.0)
    elif name == "min_weight":
        _check_number(name, value, low=0.0, high=1.0)
    elif name == "tau":
        if isinstance(value, str):
            if value.strip().lower() != "median":
                raise ValueError(f"tau must be a positive number or 'median', got {value!r}")
        elif value is not None:
            _check_number(name, value, low=0.0)
            if value == 0:
                raise ValueError(f"tau must be a positive number or 'median', got {value!r}")
    elif name == "ignore_index":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"ignore_index must be an integer, got {value!r}")
    elif name == "chunk_size":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {value!r}")


_CHOICES = {"entropy_norm": ENTROPY_NORMS, "gate": GATES, "weight_norm": WEIGHT_NORMS, "direction": KL_DIRECTIONS}


def _check_number(name: str, value, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float (YAML and Python ints have no bound)
        return False


# ---- the user-facing schema: every framework's keys, flags and fields come from here -------------


@dataclass(frozen=True)
class Setting:
    """One user-facing setting, under the same key in every framework (YAML key, flag, config field)."""

    name: str  # the field of its record: topk, fused, probe
    key: str  # eaft_topk, eaft_fused, retention_probe
    kind: str  # "topk", "float", "choice", "bool", "probe" or "steps"
    default: object
    help: str
    choices: tuple = ()
    group: str = "loss"  # loss (the method's options), trainer (its LossConfig) or retention (RetentionConfig: any loss)
    method: str = "eaft"  # whose setting (retention keys: "")

    @property
    def trainer(self) -> bool:
        return self.group != "loss"

    @property
    def field_type(self):
        """The type of the framework's key: Optional, since None means "not given" (the default applies)."""
        value_type = {"topk": str, "tau": str, "float": float, "choice": str, "bool": bool, "probe": str,
                      "steps": int}[self.kind]
        return Optional[value_type]

    @property
    def default_text(self) -> str:
        if self.kind == "topk" and self.default is None:
            return "full"
        if self.kind == "tau" and self.default is None:
            return "median"
        if self.default is None:
            return {"probe": "off", "steps": "auto"}.get(self.kind, "None")
        return str(self.default).lower() if self.kind == "bool" else str(self.default)


@dataclass(frozen=True)
class LossConfig:
    """What a trainer needs: one method's loss options plus its two trainer settings (`<method>_log_metrics`,
    `<method>_fused`)."""

    options: object = None
    log_metrics: bool = True
    fused: bool = False
    method: str = "eaft"  # a name of METHODS

    @property
    def title(self) -> str:
        return METHODS[self.method].title


@dataclass(frozen=True)
class EAFTConfig(LossConfig):
    """What an EAFT trainer needs: the loss options plus the two trainer settings."""

    options: EAFTOptions = EAFTOptions()
    log_metrics: bool = field(default=True, metadata={
        "help": "log eaft/ce, eaft/weight, eaft/entropy, eaft/conflict_frac (and eval_eaft/*)", "kind": "bool"})
    fused: bool = field(default=False, metadata={
        "help": "compute the loss inside the model's forward from the last hidden states and the LM head, never "
                "building the [tokens, vocab] logits (see docs/performance.md for the supported models)",
        "kind": "bool"})


@dataclass(frozen=True)
class Method:
    """One loss of the paper's math table that this package implements."""

    name: str  # loss_type (ms-swift, TRL), use_<name>_loss (LLaMA-Factory), the prefix of its keys and metrics
    title: str  # as the papers write it
    options: type  # its option record
    metrics: tuple  # what <name>/... logs: per-token means over the supervised tokens (talr/tau: per micro-batch)
    fused: bool  # whether `<name>_fused: true` can run (docs/performance.md)
    fused_why_not: str = ""


METHODS = {m.name: m for m in (
    Method("eaft", "EAFT", EAFTOptions, ("ce", "weight", "entropy", "conflict_frac"), True),
    Method("sft_kl", "SFT-KL", SFTKLOptions, ("ce", "kl"), False,
           "its KL term needs the full [tokens, vocab] distributions of the model and of the starting model"),
    Method("flow", "FLOW", FLOWOptions, ("ce", "weight"), True),
    Method("talr", "TALR", TALROptions, ("ce", "weight", "tau"), True),
)}


@dataclass(frozen=True)
class RetentionConfig:
    """The retention monitor's keys (eaft_plugins.retention validates them). Any loss: not EAFT settings, so the
    "eaft_* key without EAFT" rules never see them."""

    probe: Optional[str] = field(default=None, metadata={
        "help": "retention monitor (any loss, SFT or EAFT): `builtin` (12 prompts, texts and multiple-choice items "
                "from public datasets), `builtin-large` (64 of each, for an end-of-run reading) or a JSONL file of "
                "{\"text\"} / {\"prompt\"} / {\"question\", \"choices\", \"answer\"} rows, optionally + `:exact` "
                "(exact KL); logs retention/kl_base, text_nll, mc_prob, mc_acc, ... with standard errors, draws "
                "retention.png (docs/retention.md)",
        "kind": "probe", "key": "retention_probe"})
    steps: Optional[int] = field(default=None, metadata={
        "help": "optimizer steps between two retention probes (default: the logging interval, else the eval "
                "interval, else once per epoch, lengthened to a multiple of it if a probe would take more than 3% "
                "of the training time; printed at the first interval); needs retention_probe",
        "kind": "steps", "key": "retention_steps"})


def _settings(owners, method: str = "eaft") -> tuple:
    out = []
    for owner, group in owners:
        for f in fields(owner):
            if "help" in f.metadata and not f.metadata.get("internal"):
                out.append(Setting(f.name, f.metadata.get("key", f"{method}_{f.name}"), f.metadata["kind"], f.default,
                                   f.metadata["help"], tuple(f.metadata.get("choices", ())), group,
                                   method if group != "retention" else ""))
    return tuple(out)


def _trainer_settings(m: Method) -> tuple:
    """`<method>_log_metrics` and `<method>_fused` of a baseline, in the words of EAFT's own two."""
    logged = ", ".join(f"{m.name}/{metric}" for metric in m.metrics)
    fused = (EAFTConfig.__dataclass_fields__["fused"].metadata["help"] if m.fused else
             f"no fused path for {m.title} ({m.fused_why_not}): only false")
    return (Setting("log_metrics", f"{m.name}_log_metrics", "bool", True, f"log {logged} (and eval_{m.name}/*)",
                    group="trainer", method=m.name),
            Setting("fused", f"{m.name}_fused", "bool", False, fused, group="trainer", method=m.name))


SETTINGS = _settings(((EAFTOptions, "loss"), (EAFTConfig, "trainer")))  # the EAFT settings
METHOD_SETTINGS = {name: SETTINGS if name == "eaft" else _settings(((m.options, "loss"),), name) + _trainer_settings(m)
                   for name, m in METHODS.items()}
RETENTION_SETTINGS = _settings(((RetentionConfig, "retention"),))
USER_SETTINGS = tuple(s for group in METHOD_SETTINGS.values() for s in group) + RETENTION_SETTINGS  # every key a
# framework gains
SETTINGS_BY_KEY = {s.key: s for s in USER_SETTINGS}
KEYS = tuple(s.key for s in SETTINGS)  # eaft_topk, eaft_alpha, ..., eaft_log_metrics, eaft_fused
METHOD_KEYS = {name: tuple(s.key for s in group) for name, group in METHOD_SETTINGS.items()}  # flow: flow_tau, ...
ALL_METHOD_KEYS = tuple(k for keys in METHOD_KEYS.values() for k in keys)


@dataclass(frozen=True)
class Spelling:
    """How one framework writes a key in error messages (`shown`), writes a fix (`assign`), and how EAFT is
    turned on there (`enabled`). Any key: ours (eaft_topk, retention_probe) or the framework's own.
    `method_format` writes how another method is turned on (`for_method`)."""

    shown_format: str = "`{key}`"  # e.g. "--{key}", "LLaMA-Factory key `{key}`"
    assign_format: str = "{key}: {value}"  # e.g. "--{key} {value}", "{key}={value}"
    enabled: str = "EAFT"  # e.g. "`use_eaft_loss: true`", "--loss_type eaft"
    python_values: bool = False  # True / False (a Python keyword argument) rather than true / false
    # e.g. "`use_{method}_loss: true`", "--loss_type {method}" (not compared: it writes other methods' switches)
    method_format: str = field(default="{title}", compare=False)
    method: str = "eaft"  # the method `enabled` turns on

    def for_method(self, method: str) -> "Spelling":
        """The same spelling, `enabled` saying how `method` is turned on (EAFT: this spelling itself)."""
        if method == "eaft":
            return self
        return replace(self, enabled=self.method_format.format(method=method, title=METHODS[method].title),
                       method=method)

    def shown(self, key: str) -> str:
        return self.shown_format.format(**self._names(key))

    def assign(self, key: str, value) -> str:
        if isinstance(value, bool) and not self.python_values:
            value = str(value).lower()
        return self.assign_format.format(value=value, **self._names(key))

    @staticmethod
    def _names(key: str) -> dict:  # {key}: eaft_h_min, {name}: h_min, {dashed}: h-min
        prefix = next((f"{m}_" for m in METHODS if key.startswith(f"{m}_")), "")
        name = key[len(prefix):]
        return {"key": key, "name": name, "dashed": name.replace("_", "-")}


BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}


def parse_bool(value, shown: str) -> bool:
    """A bool, or "true"/"false"/"1"/"0" in any case (YAML may quote them); anything else is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOL_WORDS:
        return BOOL_WORDS[value.strip().lower()]
    raise ValueError(f"{shown} {value!r} is invalid: must be true or false (also \"true\"/\"false\"/\"1\"/\"0\")")


def _coerce(setting: Setting, value, shown: str):
    if setting.kind == "bool":
        return parse_bool(value, shown)
    if isinstance(value, str):
        text = value.strip()
        if setting.kind == "topk":
            try:
                return int(text)  # what int() reads ("12", "+12"); not "--5" or "²", which int() refuses
            except ValueError:
                pass  # "full", or refused below with the allowed values
        if setting.kind in ("float", "tau"):
            try:
                return float(text)
            except ValueError:
                pass  # refused below with the allowed values
    if setting.kind in ("float", "tau") and isinstance(value, int) and not isinstance(value, bool) and _finite(value):
        return float(value)
    return value  # an int too large for a float stays one: refused below as not finite


def config_from_keys(values, spelling: Spelling = Spelling(), method: str = "eaft") -> LossConfig:
    """The LossConfig of `method` (an EAFTConfig for EAFT) from the settings a user wrote, {key: value}
    (`eaft_topk`, `flow_tau`); None means "not given". Strings are parsed; every error names the user's key and
    the allowed values."""
    m = METHODS[method]
    keys = METHOD_KEYS[method]
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ValueError(f"unknown {m.title} setting(s) {[spelling.shown(k) for k in unknown]}; "
                         f"allowed: {[spelling.shown(k) for k in keys]}")
    options, trainer = {}, {}
    for key, raw in values.items():
        if raw is None:
            continue
        setting = SETTINGS_BY_KEY[key]
        value = _coerce(setting, raw, spelling.shown(key))
        if setting.trainer:
            trainer[setting.name] = value
            continue
        try:
            check_option(setting.name, value)
        except ValueError as exc:
            raise ValueError(f"{spelling.shown(key)} {raw!r} is invalid: {exc}") from None
        options[setting.name] = value
    if method == "eaft":
        return EAFTConfig(EAFTOptions(**options), **trainer)
    if trainer.get("fused") and not m.fused:
        raise ValueError(f"{spelling.shown(f'{method}_fused')} {values[f'{method}_fused']!r} is invalid: {m.title} has "
                         f"no fused path ({m.fused_why_not}); set {spelling.assign(f'{method}_fused', False)}")
    return LossConfig(m.options(**options), method=method, **trainer)
