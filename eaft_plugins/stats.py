"""Loss statistics kept as sums and counts, so they add up across micro-batches and ranks: EAFT's (`EAFTStats`)
and the baselines' (`MethodStats`: SFT-KL, FLOW, TALR)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch

_FIELDS = ("ce_sum", "weight_sum", "entropy_sum", "conflict_count", "tokens", "raw_weight_sum")


class _Sums:
    """Detached float64 sums, one field each (FIELDS), kept as a vector to add and reduce."""

    FIELDS: tuple = ()

    @classmethod
    def zeros(cls, device=None):
        return cls(*(torch.zeros((), dtype=torch.float64, device=device) for _ in cls.FIELDS))

    @classmethod
    def from_vector(cls, vec: torch.Tensor):
        return cls(*vec.unbind(0))

    def to_vector(self) -> torch.Tensor:
        return torch.stack([getattr(self, f) for f in self.FIELDS])

    def __add__(self, other):
        return type(self).from_vector(self.to_vector() + other.to_vector().to(self.ce_sum.device))

    def all_reduce(self, group=None):
        """Sum over ranks. Every rank of the group must call this (a rank with no tokens too)."""
        import torch.distributed as dist

        vec = self.to_vector().clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vec, op=dist.ReduceOp.SUM, group=group)
        return type(self).from_vector(vec)


@dataclass
class EAFTStats(_Sums):
    """Detached float64 sums over supervised tokens.

    ce_sum: plain (unweighted) cross-entropy; weight_sum: EAFT weights as applied
    (after gate and weight_norm); entropy_sum: normalised entropy Htilde;
    conflict_count: tokens with Htilde < h_min and p(label) < p_min; tokens: count;
    raw_weight_sum: the gate's weights before weight_norm (what weight_norm="mean" divides by).
    """

    ce_sum: torch.Tensor
    weight_sum: torch.Tensor
    entropy_sum: torch.Tensor
    conflict_count: torch.Tensor
    tokens: torch.Tensor
    raw_weight_sum: torch.Tensor

    FIELDS = _FIELDS

    def means(self, prefix: str = "eaft/") -> Dict[str, float]:
        """Per-token means for logging; zeros when no token was supervised."""
        n = float(self.tokens)
        div = n if n > 0 else 1.0
        return {
            f"{prefix}ce": float(self.ce_sum) / div,
            f"{prefix}weight": float(self.weight_sum) / div,
            f"{prefix}entropy": float(self.entropy_sum) / div,
            f"{prefix}conflict_frac": float(self.conflict_count) / div,
            f"{prefix}tokens": n,
        }

    @property
    def raw_mean_weight(self) -> Optional[float]:
        """Mean gate weight before weight_norm: the divisor weight_norm="mean" uses next step."""
        n, s = float(self.tokens), float(self.raw_weight_sum)
        return s / n if n > 0 and s > 0 else None


_METHOD_FIELDS = ("ce_sum", "weight_sum", "kl_sum", "tau_sum", "tokens", "batches")


@dataclass
class MethodStats(_Sums):
    """Detached float64 sums of a baseline's loss over supervised tokens: plain cross-entropy, the weight as applied
    (FLOW, TALR), the KL to the starting model (SFT-KL); tau_sum adds TALR's temperature once per micro-batch with
    a supervised token (batches counts those). Same interface as EAFTStats."""

    ce_sum: torch.Tensor
    weight_sum: torch.Tensor
    kl_sum: torch.Tensor
    tau_sum: torch.Tensor
    tokens: torch.Tensor
    batches: torch.Tensor

    FIELDS = _METHOD_FIELDS

    @classmethod
    def of(cls, ce: torch.Tensor, weight=None, kl=None, tau=None) -> "MethodStats":
        """From one call's per-token cross-entropy [N] (weights [N], KL [N] and tau when the method has them)."""
        zero = torch.zeros((), dtype=torch.float64, device=ce.device)
        n = ce.numel()
        return cls(ce.double().sum(), zero if weight is None else weight.double().sum(),
                   zero if kl is None else kl.double().sum(),
                   zero if tau is None or n == 0 else torch.as_tensor(float(tau), dtype=torch.float64, device=ce.device),
                   torch.tensor(float(n), dtype=torch.float64, device=ce.device),
                   torch.tensor(float(tau is not None and n > 0), dtype=torch.float64, device=ce.device))

    def means(self, prefix: str) -> Dict[str, float]:
        """Per-token means (tau: per micro-batch) for logging; zeros when nothing was counted."""
        n, b = float(self.tokens), float(self.batches)
        return {f"{prefix}ce": float(self.ce_sum) / (n or 1.0), f"{prefix}weight": float(self.weight_sum) / (n or 1.0),
                f"{prefix}kl": float(self.kl_sum) / (n or 1.0), f"{prefix}tau": float(self.tau_sum) / (b or 1.0),
                f"{prefix}tokens": n}


class StatsAccumulator:
    """Adds up stats (EAFTStats, or MethodStats) between log points; `pop` reduces over ranks and resets."""

    def __init__(self, kind=None) -> None:
        self._total = None
        self._kind = kind or EAFTStats

    def add(self, stats: EAFTStats) -> None:
        self._total = stats if self._total is None else self._total + stats

    @property
    def empty(self) -> bool:
        return self._total is None

    def pop(self, group=None, device=None, reduce: bool = True) -> EAFTStats:
        total = self._total if self._total is not None else self._kind.zeros(device)
        if device is not None:
            total = type(total).from_vector(total.to_vector().to(device))
        self._total = None
        return total.all_reduce(group) if reduce else total
