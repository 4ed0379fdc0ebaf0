"""Cross-entropy weighted per token on materialised logits: the shared core of the dense ops.

EAFT, FLOW and TALR all compute `sum_t c_t * ce_t` with a detached coefficient c_t per supervised token (the weight
times token_scale over N); they differ only in where c_t comes from. This module has what they share: the label
preparation, the chunked cross-entropy scores, and the autograd function whose backward is
c_t * (softmax(z_t) - onehot(y_t)), one row-chunk at a time (docs/loss.md, "Memory and precision").
"""

from __future__ import annotations

import torch

from .common import (align_labels, check_label_shapes, compute_dtype, gather_rows, loss_denominator, row_chunks,
                     supervised_rows, ce_grad_rows)


def prepare(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, shift: bool, token_scale):
    """(flat [rows, V] view, supervised row indices, their labels, token_scale aligned with the labels)."""
    vocab = logits.size(-1)
    check_label_shapes(logits, "logits", "vocabulary", labels, token_scale)
    labels, token_scale = align_labels(labels, token_scale, _Ignore(ignore_index), shift, logits.device)
    flat = logits.reshape(-1, vocab)  # a view for contiguous logits
    idx, y = supervised_rows(labels.reshape(-1), vocab, ignore_index)
    return flat, idx, y, token_scale


class _Ignore:
    """What align_labels reads of an options record."""

    def __init__(self, ignore_index: int):
        self.ignore_index = ignore_index


def chunk_buffer(flat: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    return flat.new_empty((min(rows, n), flat.size(1)), dtype=compute_dtype(flat.dtype))


def ce_scores(flat: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, rows: int):
    """(logsumexp, cross-entropy) of each supervised row, in the compute dtype, without a graph."""
    n = idx.numel()
    lse = flat.new_empty(n, dtype=compute_dtype(flat.dtype))
    ce = torch.empty_like(lse)
    if n == 0:
        return lse, ce
    with torch.no_grad():
        for start, stop, first in row_chunks(idx, rows):
            z = gather_rows(flat, idx, start, stop, first)
            lse_c = torch.logsumexp(z, dim=-1)
            lse[start:stop] = lse_c
            ce[start:stop] = lse_c - z.gather(1, y[start:stop].unsqueeze(1)).squeeze(1)
    return lse, ce


def coefficients(weight: torch.Tensor, token_scale, idx: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """c_t = weight_t * token_scale_t / N for each supervised token (token_scale None: 1; N: num_items_in_batch, else
    the supervised tokens)."""
    if token_scale is not None:
        weight = weight * token_scale.reshape(-1).to(weight.device, weight.dtype)[idx]
    return weight / loss_denominator(num_items_in_batch, idx.numel(), weight.device)


def row_means(values: torch.Tensor, row: torch.Tensor, rows: int) -> torch.Tensor:
    """The mean of `values` [N] within each of `rows` rows (`row` [N]: each value's row), in float64; NaN for a row
    with no value."""
    total = torch.zeros(rows, dtype=torch.float64, device=values.device).index_add_(0, row, values.double())
    count = torch.zeros(rows, dtype=torch.float64, device=values.device).index_add_(
        0, row, torch.ones_like(values, dtype=torch.float64))
    return total / count


def check_scores(lse: torch.Tensor, ce: torch.Tensor) -> None:
    from .common import check_finite

    check_finite(lse, ce, torch.zeros_like(ce))


def weighted_ce(flat, idx, y, lse, ce, coef, rows: int) -> torch.Tensor:
    """sum_t coef_t * ce_t, attached to `flat`'s graph (also when nothing is supervised); coef is detached."""
    value = (coef * ce).sum()
    return WeightedCE.apply(flat, idx, y, lse, coef, value, rows)


def _unsupervised_rows(idx: torch.Tensor, rows: int) -> torch.Tensor:
    keep = torch.ones(rows, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return keep.nonzero().squeeze(1)


class WeightedCE(torch.autograd.Function):
    """Returns the precomputed loss; backward is coef_t * (softmax(z_t) - onehot(y_t)), row-chunked."""

    @staticmethod
    def forward(ctx, flat, idx, y, lse, coef, value, rows):
        ctx.save_for_backward(flat, idx, y, lse, coef)
        ctx.rows = rows
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        flat, idx, y, lse, coef = ctx.saved_tensors
        # empty, not zeros: supervised rows are written once below, only the others are zeroed
        # (touching a [tokens, vocab] buffer twice costs as much as the softmax itself on CPU).
        grad = torch.empty_like(flat)
        grad.index_fill_(0, _unsupervised_rows(idx, flat.size(0)), 0)
        scale = coef * grad_out.to(coef.dtype)
        in_place = grad.dtype == compute_dtype(flat.dtype)
        buf = None
        for start, stop, first in row_chunks(idx, ctx.rows):
            if first is not None and in_place:  # write straight into the gradient rows
                z = gather_rows(flat, idx, start, stop, first)  # a view
                ce_grad_rows(z, lse[start:stop], y[start:stop], scale[start:stop], out=grad.narrow(0, first, stop - start))
                continue
            buf = chunk_buffer(flat, idx.numel(), ctx.rows) if buf is None else buf
            z = gather_rows(flat, idx, start, stop, first, out=buf)  # our copy
            g = ce_grad_rows(z, lse[start:stop], y[start:stop], scale[start:stop], out=z)
            if first is not None:
                grad.narrow(0, first, stop - start).copy_(g)
            else:
                grad.index_copy_(0, idx[start:stop], g.to(grad.dtype))
        return grad, None, None, None, None, None, None
