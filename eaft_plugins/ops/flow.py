"""FLOW (Sanyal et al., ICML 2025, arXiv 2502.02797): cross-entropy with one weight per training example.

Before training, each example i gets its starting loss L_i (its mean token cross-entropy under the model about to be
fine-tuned) and the weight w_i = exp(-L_i / tau), tau the median of the L_i (official code, language/
create_weighted_dataset.py and get_dataset_temperature.py). Training then minimises sum_i w_i sum_t ce_it / N.
`flow_weights` does the first part from the losses `sequence_losses` measures; `flow_loss` the second.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ..options import FLOWOptions, make_method_options
from ..stats import MethodStats
from .common import EAFTOutput as LossOutput
from .weighted import ce_scores, check_scores, coefficients, prepare, row_means, weighted_ce


def median(values: torch.Tensor) -> float:
    """The median as numpy and statistics books take it: the mean of the two middle values for an even count."""
    ordered = values.double().sort().values
    n = ordered.numel()
    if n == 0:
        raise ValueError("the median of no value")
    return float(ordered[(n - 1) // 2] + ordered[n // 2]) / 2


def flow_weights(start_losses: torch.Tensor, tau: Optional[float] = None):
    """(w_i = exp(-L_i / tau), tau) from the examples' starting losses [n]; tau None: their median."""
    losses = start_losses.double()
    if tau is None:
        tau = median(losses)
        if not tau > 0:
            raise ValueError(f"FLOW's temperature is the median starting loss, here {tau}: the starting model already "
                             "fits at least half of the examples exactly; give a positive tau")
    return torch.exp(-losses / tau), float(tau)


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = -100,
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """Each row's mean token cross-entropy [B] (NaN for a row with no supervised token), without a graph."""
    rows = labels.shape[0] if labels.dim() > 1 else 1
    opts = FLOWOptions(ignore_index=ignore_index, chunk_size=chunk_size)
    flat, idx, y, _ = prepare(logits.detach(), labels, ignore_index, shift, None)
    _, ce = ce_scores(flat, idx, y, opts.rows_per_chunk(flat.size(1)))
    return row_means(ce, idx // labels.reshape(rows, -1).shape[1], rows)  # NaN: a row that teaches nothing


def token_weights(sample_weights, idx: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each supervised token's example weight: `sample_weights` [B] (one per row of labels [B, T]) at the rows of the
    flat supervised indices `idx`; checked finite and >= 0."""
    if sample_weights is None:
        raise ValueError("FLOW needs sample_weights: one weight per row of labels")
    rows = labels.shape[0] if labels.dim() > 1 else 1
    weights = torch.as_tensor(sample_weights).reshape(-1)
    if weights.numel() != rows:
        raise ValueError(f"sample_weights has {weights.numel()} entries for {rows} rows of labels {tuple(labels.shape)}")
    weights = weights.to(idx.device, torch.float64 if weights.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("FLOW sample weights must be finite and >= 0")
    return weights[idx // labels.reshape(rows, -1).shape[1]]


def flow_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    sample_weights: torch.Tensor,
    *,
    options=None,
    num_items_in_batch: Union[int, torch.Tensor, None] = None,
    shift: bool = True,
    token_scale: Optional[torch.Tensor] = None,
    **option_overrides,
) -> LossOutput:
    """sum_i w_i sum_t ce_it / N over supervised tokens; `sample_weights` [B]: one weight per row of labels [B, T].

    N is `num_items_in_batch` when given, else the supervised tokens. `token_scale` (shaped like labels) multiplies
    each token's term, e.g. ms-swift's loss_scale. The weights are constants: d loss / d z_t = w_i (p_t - onehot) / N.
    """
    opts = make_method_options(FLOWOptions, options, **option_overrides)
    flat, idx, y, token_scale = prepare(logits, labels, opts.ignore_index, shift, token_scale)
    w = token_weights(sample_weights, idx, labels)
    chunk = opts.rows_per_chunk(flat.size(1))
    lse, ce = ce_scores(flat, idx, y, chunk)
    check_scores(lse, ce)
    w = w.to(ce.dtype)
    coef = coefficients(w, token_scale, idx, num_items_in_batch)
    return LossOutput(weighted_ce(flat, idx, y, lse, ce, coef, chunk), MethodStats.of(ce, weight=w))
