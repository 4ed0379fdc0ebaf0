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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


# ---- the user-facing schema: every framework's keys, flags and fields come from here -------------


@dataclass(frozen=True)
class Setting:
    """One user-facing EAFT setting. Frameworks spell it `eaft_<name>` (YAML key, flag, config field)."""

    name: str
    kind: str  # "topk", "float", "choice" or "bool"
    default: object
    help: str
    choices: tuple = ()
    trainer: bool = False  # a trainer setting (EAFTConfig), not an EAFTOptions field

    @property
    def key(self) -> str:
        return f"eaft_{self.name}"

    @property
    def field_type(self):
        """The type of the framework's key: Optional, since None means "not given" (the default applies)."""
        value_type = {"topk": str, "float": float, "choice": str, "bool": bool}[self.kind]
        return Optional[value_type]

    @property
    def default_text(self) -> str:
        if self.kind == "topk" and self.default is None:
            return "full"
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


def _settings() -> tuple:
    out = []
    for owner, trainer in ((EAFTOptions, False), (EAFTConfig, True)):
        for f in fields(owner):
            if "help" in f.metadata and not f.metadata.get("internal"):
                out.append(Setting(f.name, f.metadata["kind"], f.default, f.metadata["help"],
                                   tuple(f.metadata.get("choices", ())), trainer))
    return tuple(out)


SETTINGS = _settings()
SETTINGS_BY_NAME = {s.name: s for s in SETTINGS}
KEYS = tuple(s.key for s in SETTINGS)  # eaft_topk, eaft_alpha, ..., eaft_log_metrics, eaft_fused


@dataclass(frozen=True)
class Spelling:
    """How one framework writes a setting: in error messages (`shown`) and as a fix (`assign`)."""

    shown_format: str = "`{key}`"  # e.g. "--{key}", "LLaMA-Factory key `{key}`"
    assign_format: str = "{key}: {value}"  # e.g. "--{key} {value}", "{key}={value}"

    def shown(self, name: str) -> str:
        return self.shown_format.format(**self._names(name))

    def assign(self, name: str, value) -> str:
        return self.assign_format.format(value=value, **self._names(name))

    @staticmethod
    def _names(name: str) -> dict:  # {key}: eaft_h_min, {name}: h_min, {dashed}: h-min
        return {"key": f"eaft_{name}", "name": name, "dashed": name.replace("_", "-")}


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
        if setting.kind == "topk" and text.lstrip("-").isdigit():
            return int(text)
        if setting.kind == "float":
            try:
                return float(text)
            except ValueError:
                pass  # refused below with the allowed values
    if setting.kind == "float" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def config_from_keys(values, spelling: Spelling = Spelling()) -> EAFTConfig:
    """EAFTConfig from the settings a user wrote: {name: value} by setting name (`topk`, not `eaft_topk`);
    None means "not given". Strings are parsed; every error names the user's key and the allowed values."""
    unknown = sorted(set(values) - set(SETTINGS_BY_NAME))
    if unknown:
        raise ValueError(f"unknown EAFT setting(s) {[spelling.shown(n) for n in unknown]}; "
                         f"allowed: {[spelling.shown(s.name) for s in SETTINGS]}")
    options, trainer = {}, {}
    for name, raw in values.items():
        if raw is None:
            continue
        setting = SETTINGS_BY_NAME[name]
        value = _coerce(setting, raw, spelling.shown(name))
        if setting.trainer:
            trainer[name] = value
            continue
        try:
            check_option(name, value)
        except ValueError as exc:
            raise ValueError(f"{spelling.shown(name)} {raw!r} is invalid: {exc}") from None
        options[name] = value
    return EAFTConfig(EAFTOptions(**options), **trainer)
