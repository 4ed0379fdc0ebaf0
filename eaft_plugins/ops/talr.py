"""TALR, token-adaptive loss reweighting (Lin et al., 2025, arXiv 2509.20758: "SFT Doesn't Always Hurt General
Capabilities"): each supervised token's cross-entropy weighted by w_t = max(p_t ** (1/tau), min_weight), detached,
p_t = exp(-ce_t) the model's current probability of the label. Hard tokens (low p_t) learn less.

tau: a number, or (default) each micro-batch's median over its sequences of their mean token cross-entropy.
The rule and the floor are as docs/loss.md states them, with what was assumed and why.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..options import TALROptions, make_method_options
from ..stats import MethodStats
from .common import EAFTOutput as LossOutput
from .flow import median
from .weighted import ce_scores, check_scores, coefficients, prepare, row_means, weighted_ce


def talr_weights(ce: torch.Tensor, row: torch.Tensor, opts: TALROptions):
    """(weights [N], tau) of supervised tokens with cross-entropy `ce` [N] in rows `row` [N] (no graph)."""
    with torch.no_grad():
        tau = opts.tau
        if tau is None:
            if ce.numel() == 0:
                return torch.empty_like(ce), None
            means = row_means(ce, row, int(row.max()) + 1)
            tau = median(means[~means.isnan()])  # rows without a supervised token have no mean
            tau = max(tau, torch.finfo(torch.float32).tiny)  # a batch fitted exactly: every weight tends to 1 or 0
        w = torch.exp(-ce / tau).clamp_min(opts.min_weight)
    return w, float(tau)


def talr_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    options=None,
    num_items_in_batch: Union[int, torch.Tensor, None] = None,
    shift: bool = True,
    token_scale: Optional[torch.Tensor] = None,
    **option_overrides,
) -> LossOutput:
    """sum_t w_t * ce_t / N over supervised tokens, w_t = max(exp(-ce_t / tau), min_weight) detached.

    logits [B, T, V], labels [B, T] (unshifted when shift=True); a sequence is a row of labels. N is
    `num_items_in_batch` when given, else the supervised tokens; `token_scale` multiplies each token's term.
    """
    opts = make_method_options(TALROptions, options, **option_overrides)
    flat, idx, y, token_scale = prepare(logits, labels, opts.ignore_index, shift, token_scale)
    chunk = opts.rows_per_chunk(flat.size(1))
    lse, ce = ce_scores(flat, idx, y, chunk)
    check_scores(lse, ce)
    w, tau = talr_weights(ce, idx // labels.shape[-1], opts)
    coef = coefficients(w, token_scale, idx, num_items_in_batch)
    return LossOutput(weighted_ce(flat, idx, y, lse, ce, coef, chunk), MethodStats.of(ce, weight=w, tau=tau))
