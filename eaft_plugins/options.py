"""EAFT options: one validated, frozen record shared by every op and integration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Optional, Union

ENTROPY_NORMS = ("ln_k", "upstream", "none")
GATES = ("soft", "hard", "shuffle")
WEIGHT_NORMS = ("none", "mean")

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


OptionsLike = Union[EAFTOptions, dict, None]


def make_options(options: OptionsLike = None, **overrides) -> EAFTOptions:
    """Build options from an EAFTOptions, a dict, and/or keyword overrides (validated)."""
    if options is None:
        base = {}
    elif isinstance(options, EAFTOptions):
        if not overrides:
            return options
        base = {f: getattr(options, f) for f in EAFTOptions.field_names()}
    elif isinstance(options, dict):
        base = dict(options)
    else:
        raise TypeError(f"options must be EAFTOptions, dict or None, got {type(options).__name__}")
    base.update(overrides)
    unknown = sorted(set(base) - set(EAFTOptions.field_names()))
    if unknown:
        raise ValueError(f"unknown EAFT option(s) {unknown}; allowed: {list(EAFTOptions.field_names())}")
    return EAFTOptions(**base)


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
    elif name == "ignore_index":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"ignore_index must be an integer, got {value!r}")
    elif name == "chunk_size":
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"chunk_size must be a positive integer or None, got {value!r}")


_CHOICES = {"entropy_norm": ENTROPY_NORMS, "gate": GATES, "weight_norm": WEIGHT_NORMS}


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
    group: str = "loss"  # loss (EAFTOptions), trainer (EAFTConfig) or retention (RetentionConfig: any loss)

    @property
    def trainer(self) -> bool:
        return self.group != "loss"

    @property
    def field_type(self):
        """The type of the framework's key: Optional, since None means "not given" (the default applies)."""
        value_type = {"topk": str, "float": float, "choice": str, "bool": bool, "probe": str, "steps": int}[self.kind]
        return Optional[value_type]

    @property
    def default_text(self) -> str:
        if self.kind == "topk" and self.default is None:
            return "full"
        if self.default is None:
            return {"probe": "off", "steps": "auto"}.get(self.kind, "None")
        return str(self.default).lower() if self.kind == "bool" else str(self.default)


@dataclass(frozen=True)
class EAFTConfig:
    """What a trainer needs: the loss options plus the two trainer settings."""

    options: EAFTOptions = EAFTOptions()
    log_metrics: bool = field(default=True, metadata={
        "help": "log eaft/ce, eaft/weight, eaft/entropy, eaft/conflict_frac (and eval_eaft/*)", "kind": "bool"})
    fused: bool = field(default=False, metadata={
        "help": "compute the loss inside the model's forward from the last hidden states and the LM head, never "
                "building the [tokens, vocab] logits (see docs/performance.md for the supported models)",
        "kind": "bool"})


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


def _settings(owners) -> tuple:
    out = []
    for owner, group in owners:
        for f in fields(owner):
            if "help" in f.metadata and not f.metadata.get("internal"):
                out.append(Setting(f.name, f.metadata.get("key", f"eaft_{f.name}"), f.metadata["kind"], f.default,
                                   f.metadata["help"], tuple(f.metadata.get("choices", ())), group))
    return tuple(out)


SETTINGS = _settings(((EAFTOptions, "loss"), (EAFTConfig, "trainer")))  # the EAFT settings
RETENTION_SETTINGS = _settings(((RetentionConfig, "retention"),))
USER_SETTINGS = SETTINGS + RETENTION_SETTINGS  # every key a framework gains
SETTINGS_BY_KEY = {s.key: s for s in USER_SETTINGS}
KEYS = tuple(s.key for s in SETTINGS)  # eaft_topk, eaft_alpha, ..., eaft_log_metrics, eaft_fused


@dataclass(frozen=True)
class Spelling:
    """How one framework writes a key in error messages (`shown`), writes a fix (`assign`), and how EAFT is
    turned on there (`enabled`). Any key: ours (eaft_topk, retention_probe) or the framework's own."""

    shown_format: str = "`{key}`"  # e.g. "--{key}", "LLaMA-Factory key `{key}`"
    assign_format: str = "{key}: {value}"  # e.g. "--{key} {value}", "{key}={value}"
    enabled: str = "EAFT"  # e.g. "`use_eaft_loss: true`", "--loss_type eaft"
    python_values: bool = False  # True / False (a Python keyword argument) rather than true / false

    def shown(self, key: str) -> str:
        return self.shown_format.format(**self._names(key))

    def assign(self, key: str, value) -> str:
        if isinstance(value, bool) and not self.python_values:
            value = str(value).lower()
        return self.assign_format.format(value=value, **self._names(key))

    @staticmethod
    def _names(key: str) -> dict:  # {key}: eaft_h_min, {name}: h_min, {dashed}: h-min
        name = key[len("eaft_"):] if key.startswith("eaft_") else key
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
        if setting.kind == "float":
            try:
                return float(text)
            except ValueError:
                pass  # refused below with the allowed values
    if setting.kind == "float" and isinstance(value, int) and not isinstance(value, bool) and _finite(value):
        return float(value)
    return value  # an int too large for a float stays one: refused below as not finite


def config_from_keys(values, spelling: Spelling = Spelling()) -> EAFTConfig:
    """EAFTConfig from the EAFT settings a user wrote, {key: value} (`eaft_topk`); None means "not given".
    Strings are parsed; every error names the user's key and the allowed values."""
    unknown = sorted(set(values) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown EAFT setting(s) {[spelling.shown(k) for k in unknown]}; "
                         f"allowed: {[spelling.shown(k) for k in KEYS]}")
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
    return EAFTConfig(EAFTOptions(**options), **trainer)
