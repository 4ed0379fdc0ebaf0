"""SFT-KL: cross-entropy plus beta times a per-token KL divergence to the frozen starting model.

At each supervised token t, with p_t = softmax(z_t) the model's next-token distribution and q_t = softmax(r_t) the
starting model's (reference logits r, no gradient):

    loss = sum_t s_t * (ce_t + beta * KL_t) / N
    forward  (default): KL_t = KL(q_t || p_t) = sum_v q (log q - log p),   d KL_t / d z_t = p_t - q_t
    reverse:            KL_t = KL(p_t || q_t) = sum_v p (log p - log q),   d KL_t / d z_t = p_t * (log p_t - log q_t - KL_t)

s_t is token_scale (1 by default), N is num_items_in_batch or the supervised token count. Row-chunked like the
dense EAFT op: no fp32 copy of the whole logits, backward recomputes both softmaxes from the saved logsumexps.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..options import SFTKLOptions, make_method_options
from ..stats import MethodStats
from .common import EAFTOutput as LossOutput, compute_dtype, gather_rows, row_chunks
from .weighted import check_scores, coefficients, prepare, _unsupervised_rows


def sft_kl_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logits: torch.Tensor,
    *,
    options=None,
    num_items_in_batch: Union[int, torch.Tensor, None] = None,
    shift: bool = True,
    token_scale: Optional[torch.Tensor] = None,
    **option_overrides,
) -> LossOutput:
    """CE + beta * KL to the starting model (direction: options.direction), summed over supervised tokens / N.

    logits and ref_logits [..., V] of the same shape (ref_logits: the starting model on the same inputs, detached);
    labels [...] (unshifted when shift=True).
    """
    opts = make_method_options(SFTKLOptions, options, **option_overrides)
    if ref_logits.shape != logits.shape:
        raise ValueError(f"the starting model's logits {tuple(ref_logits.shape)} do not match the model's "
                         f"{tuple(logits.shape)}: SFT-KL needs the same inputs and the same vocabulary")
    flat, idx, y, token_scale = prepare(logits, labels, opts.ignore_index, shift, token_scale)
    ref = ref_logits.detach().reshape(-1, flat.size(1)).to(flat.device)
    rows = opts.rows_per_chunk(flat.size(1))
    lse, lse_ref, ce, kl = _scores(flat, ref, idx, y, opts.direction, rows)
    check_scores(lse, ce)
    if not bool(torch.isfinite(kl).all()):
        raise ValueError(f"the KL to the starting model is not finite at {int((~torch.isfinite(kl)).sum())} supervised "
                         "token(s): the starting model gives probability 0 (a -inf logit) where the model does not "
                         "(reverse KL), or its logits hold NaN")
    coef = coefficients(torch.ones_like(ce), token_scale, idx, num_items_in_batch)
    value = (coef * (ce + opts.beta * kl)).sum()
    loss = _SFTKL.apply(flat, ref, idx, y, lse, lse_ref, kl, coef, value, opts.beta, opts.direction, rows)
    return LossOutput(loss, MethodStats.of(ce, kl=kl))


def _log_softmax_rows(z: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return z - lse[:, None]


def _chunk_kl(logp: torch.Tensor, logq: torch.Tensor, direction: str) -> torch.Tensor:
    """KL of each row; an entry with probability 0 in the first distribution adds 0 (not NaN)."""
    first, second = (logq, logp) if direction == "forward" else (logp, logq)
    prob = first.exp()
    terms = torch.where(prob > 0, prob * (first - second), torch.zeros((), dtype=prob.dtype, device=prob.device))
    return terms.sum(-1)


def _scores(flat, ref, idx, y, direction: str, rows: int):
    n = idx.numel()
    dtype = compute_dtype(flat.dtype)
    lse, lse_ref, ce, kl = (flat.new_empty(n, dtype=dtype) for _ in range(4))
    with torch.no_grad():
        for start, stop, first in row_chunks(idx, rows) if n else ():
            z = gather_rows(flat, idx, start, stop, first)
            r = gather_rows(ref, idx, start, stop, first).to(dtype)
            lse[start:stop] = torch.logsumexp(z, -1)
            lse_ref[start:stop] = torch.logsumexp(r, -1)
            ce[start:stop] = lse[start:stop] - z.gather(1, y[start:stop].unsqueeze(1)).squeeze(1)
            kl[start:stop] = _chunk_kl(_log_softmax_rows(z, lse[start:stop]), _log_softmax_rows(r, lse_ref[start:stop]),
                                       direction)
    return lse, lse_ref, ce, kl


class _SFTKL(torch.autograd.Function):
    """Returns the precomputed loss; backward: coef_t * (p - onehot + beta * dKL/dz), row-chunked."""

    @staticmethod
    def forward(ctx, flat, ref, idx, y, lse, lse_ref, kl, coef, value, beta, direction, rows):
        ctx.save_for_backward(flat, ref, idx, y, lse, lse_ref, kl, coef)
        ctx.beta, ctx.direction, ctx.rows = beta, direction, rows
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        flat, ref, idx, y, lse, lse_ref, kl, coef = ctx.saved_tensors
        grad = torch.empty_like(flat)
        grad.index_fill_(0, _unsupervised_rows(idx, flat.size(0)), 0)
        scale = coef * grad_out.to(coef.dtype)
        dtype = compute_dtype(flat.dtype)
        for start, stop, first in row_chunks(idx, ctx.rows) if idx.numel() else ():
            z = gather_rows(flat, idx, start, stop, first).to(dtype)
            r = gather_rows(ref, idx, start, stop, first).to(dtype)
            logp = _log_softmax_rows(z, lse[start:stop])
            logq = _log_softmax_rows(r, lse_ref[start:stop])
            p = logp.exp()
            if ctx.direction == "forward":
                g = p * (1.0 + ctx.beta) - logq.exp() * ctx.beta
            else:
                zero = torch.zeros((), dtype=p.dtype, device=p.device)
                g = p + ctx.beta * torch.where(p > 0, p * (logp - logq - kl[start:stop, None]), zero)
            g[torch.arange(g.size(0), device=g.device), y[start:stop]] -= 1.0
            g.mul_(scale[start:stop, None])
            if first is not None:
                grad.narrow(0, first, stop - start).copy_(g)
            else:
                grad.index_copy_(0, idx[start:stop], g.to(grad.dtype))
        return grad, None, None, None, None, None, None, None, None, None, None, None
