"""EAFT options: one validated, frozen record shared by every op and integration."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Union

ENTROPY_NORMS = ("ln_k", "upstream", "none")
GATES = ("soft", "hard", "shuffle")
WEIGHT_NORMS = ("none", "mean")

# LLaMA-Factory 0.9.5 divides the top-20 entropy by this constant instead of ln(20).
UPSTREAM_ENTROPY_DIVISOR = 3.0


@dataclass(frozen=True)
class EAFTOptions:
    """Options of the EAFT loss. Defaults follow the paper (top-20 entropy / ln 20, alpha 1).

    topk: entries of the top-K distribution; None means exact full-vocabulary entropy.
    alpha: exponent on the normalised entropy (weight = Htilde ** alpha).
    entropy_norm: "ln_k" (divide by ln K, or ln |V| when topk is None), "upstream"
        (divide by 3.0 like LLaMA-Factory 0.9.5), "none" (raw nats, like Axolotl).
    gate: "soft" (weight = Htilde ** alpha), "hard" (weight 0 for confident conflicts,
        1 otherwise: the paper's masked-SFT ablation), "shuffle" (soft weights randomly
        permuted across the supervised tokens of the micro-batch: a control with the same
        weight distribution and no relation to entropy).
    h_min, p_min: a token is a "confident conflict" when Htilde < h_min and p(label) < p_min.
        Used by the hard gate and by the conflict_frac statistic.
    weight_norm: "none", or "mean" to divide the weights by their mean (see docs/loss.md).
    ignore_index: label value that marks an unsupervised position.
    chunk_size: rows upcast to fp32 at a time; None picks a size from the vocabulary.
    """

    topk: Optional[int] = 20
    alpha: float = 1.0
    entropy_norm: str = "ln_k"
    gate: str = "soft"
    h_min: float = 0.15
    p_min: float = 0.1
    weight_norm: str = "none"
    ignore_index: int = -100
    chunk_size: Optional[int] = None

    def __post_init__(self) -> None:
        topk = self.topk
        if isinstance(topk, str):
            if topk.strip().lower() not in ("full", "none"):
                raise ValueError(f"topk must be an integer >= 2 or 'full' (exact entropy), got {topk!r}")
            object.__setattr__(self, "topk", None)
        elif topk is not None:
            if isinstance(topk, bool) or not isinstance(topk, int) or topk < 2:
                raise ValueError(f"topk must be an integer >= 2 or 'full' (exact entropy), got {topk!r}")
        _check_number("alpha", self.alpha, low=0.0)
        _check_choice("entropy_norm", self.entropy_norm, ENTROPY_NORMS)
        _check_choice("gate", self.gate, GATES)
        _check_choice("weight_norm", self.weight_norm, WEIGHT_NORMS)
        _check_number("h_min", self.h_min, low=0.0)
        _check_number("p_min", self.p_min, low=0.0, high=1.0)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise ValueError(f"ignore_index must be an integer, got {self.ignore_index!r}")
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be a positive integer or None, got {self.chunk_size!r}")

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


def _check_choice(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_number(name: str, value, low: float, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
