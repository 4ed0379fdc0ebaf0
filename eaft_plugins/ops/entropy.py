"""Per-token EAFT scores and weights. Every op (dense, fused, vocab-parallel) calls these."""

from __future__ import annotations

import math

from typing import Optional, Tuple, Union

import torch

from ..options import EAFTOptions
from ..stats import EAFTStats


def entropy_of_logits(values: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax over the last dim. `entr` keeps -inf entries at 0, not NaN."""
    p = torch.softmax(values.to(torch.promote_types(values.dtype, torch.float32)), dim=-1)
    return torch.special.entr(p).sum(-1)


def topk_entropy(z: torch.Tensor, k: Optional[int]) -> torch.Tensor:
    """Entropy of the softmax over the K largest logits of each row (all of them if k is None)."""
    if k is None or k >= z.size(-1):
        return exact_scores(z)[1]
    return entropy_of_logits(torch.topk(z, k, dim=-1, sorted=False).values)


# Elements per block of exact_scores' pass: on the CPU two 1 MB fp32 blocks stay in cache, so the
# exponentials never go to memory; on a GPU larger blocks keep each kernel big.
CPU_BLOCK = 1 << 18
DEVICE_BLOCK = 1 << 22


def exact_scores(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(logsumexp, exact entropy in nats) of each row of z [C, V], from one pass of exponentials.

    With d = z - max and e = exp(d): logsumexp = max + ln sum e and H = ln sum e - sum(e * d) / sum e.
    Every e * d is <= 0, so the sum does not cancel, however large the logits. The logsumexp takes
    torch.logsumexp's steps (bitwise equal, tested). z is only read.
    """
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    m = torch.amax(z, dim=-1, keepdim=True)
    m_flat = m.squeeze(-1)
    m_flat.masked_fill_(m_flat.abs() == math.inf, 0)  # rows of all -inf (or an inf) stay finite here
    rows, vocab = z.shape
    block = max(1, min(rows, (CPU_BLOCK if z.device.type == "cpu" else DEVICE_BLOCK) // max(vocab, 1)))
    d_buf, e_buf = z.new_empty((block, vocab)), z.new_empty((block, vocab))
    total, dot = z.new_empty(rows), z.new_empty(rows)
    lowest = torch.finfo(z.dtype).min
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        d = torch.sub(z[r0:r1], m[r0:r1], out=d_buf[: r1 - r0]).clamp_min_(lowest)  # -inf logit: e * d = 0, not NaN
        e = torch.exp(d, out=e_buf[: r1 - r0])
        torch.sum(e, dim=-1, out=total[r0:r1])
        torch.sum(e.mul_(d), dim=-1, out=dot[r0:r1])
    log_total = total.log()
    return log_total + m_flat, log_total - dot / total


def is_exact(opts: EAFTOptions, vocab: int) -> bool:
    """Whether chunk_scores takes the exact entropy: it then needs no scratch and leaves z intact."""
    return opts.topk is None or opts.topk >= vocab


def chunk_scores(
    z: torch.Tensor, y: torch.Tensor, opts: EAFTOptions, work: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For fp32 logit rows z [C, V] and labels y [C]: (logsumexp, label logit, normalised entropy).

    work: optional [C, V] scratch for the top-K path's logsumexp temporary (it may be z itself,
    which is then overwritten): reusing one buffer across chunks spares a fresh [C, V] allocation
    per chunk. The exact entropy (topk None or >= V) needs no scratch and leaves z intact.
    """
    z_y = z.gather(1, y.unsqueeze(1)).squeeze(1)
    divisor = opts.entropy_divisor(z.size(-1))
    if is_exact(opts, z.size(-1)):
        lse, h = exact_scores(z)
        return lse, z_y, h / divisor
    h_norm = topk_entropy(z, opts.topk) / divisor
    lse = torch.logsumexp(z, dim=-1) if work is None else _logsumexp_into(z, work)
    return lse, z_y, h_norm


def _logsumexp_into(z: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(z, -1) with the same steps as torch's own kernel (bitwise equal, tested),
    its [C, V] temporary written into `work`."""
    m = torch.amax(z, dim=-1, keepdim=True)
    m_flat = m.squeeze(-1)
    m_flat.masked_fill_(m_flat.abs() == math.inf, 0)  # rows of all -inf (or an inf) stay finite here
    total = torch.sum(torch.sub(z, m, out=work).exp_(), dim=-1)
    return total.log_().add_(m_flat)


def raw_weights(h_norm: torch.Tensor, ce: torch.Tensor, opts: EAFTOptions, generator=None) -> torch.Tensor:
    """Gate of each supervised token (before weight_norm), from Htilde and its cross-entropy."""
    if opts.gate == "hard":
        return (~conflict_mask(h_norm, ce, opts)).to(h_norm.dtype)
    w = h_norm.clamp_min(0.0).pow(opts.alpha)
    if opts.gate == "shuffle" and w.numel() > 1:
        perm = torch.randperm(w.numel(), generator=generator, device="cpu").to(w.device)
        w = w[perm]
    return w


def conflict_mask(h_norm: torch.Tensor, ce: torch.Tensor, opts: EAFTOptions) -> torch.Tensor:
    """Confident conflicts: low normalised entropy and low probability of the label."""
    return (h_norm < opts.h_min) & (torch.exp(-ce) < opts.p_min)


def finish_weights(
    h_norm: torch.Tensor,
    ce: torch.Tensor,
    opts: EAFTOptions,
    mean_weight: Union[float, torch.Tensor, None] = None,
    generator=None,
) -> Tuple[torch.Tensor, EAFTStats]:
    """Detached per-token weights of a micro-batch's supervised tokens, and its stats.

    weight_norm="mean" divides by `mean_weight` when given (the trainer's estimate over the
    global batch) and by this micro-batch's own mean weight otherwise.
    """
    with torch.no_grad():
        w = raw = raw_weights(h_norm, ce, opts, generator)
        if opts.weight_norm == "mean":
            denom = w.mean() if mean_weight is None else torch.as_tensor(mean_weight, dtype=w.dtype, device=w.device)
            w = torch.where(denom > 0, w / denom.clamp_min(torch.finfo(w.dtype).tiny), w) if w.numel() else w
        stats = EAFTStats(
            ce_sum=ce.double().sum(),
            weight_sum=w.double().sum(),
            entropy_sum=h_norm.double().sum(),
            conflict_count=conflict_mask(h_norm, ce, opts).double().sum(),
            tokens=torch.tensor(float(ce.numel()), dtype=torch.float64, device=ce.device),
            raw_weight_sum=raw.double().sum(),
        )
    return w, stats
