"""Dense EAFT loss on materialised logits, upcast one row-chunk at a time."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F

from .entropy import chunk_scores, finish_weights
from .options import EAFTOptions, OptionsLike, make_options
from .stats import EAFTStats


class EAFTOutput(NamedTuple):
    loss: torch.Tensor  # fp32 scalar, attached to the logits' graph (also when nothing is supervised)
    stats: EAFTStats


class TokenScores(NamedTuple):
    """Per supervised token (in flattened, shifted order): row index, label, CE, Htilde, weight."""

    index: torch.Tensor
    labels: torch.Tensor
    ce: torch.Tensor
    entropy: torch.Tensor
    weight: torch.Tensor


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Causal shift: position i is scored against label i+1; the last position is unsupervised."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def eaft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    options: OptionsLike = None,
    num_items_in_batch: Union[int, torch.Tensor, None] = None,
    shift: bool = True,
    mean_weight: Union[float, torch.Tensor, None] = None,
    token_scale: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    **option_overrides,
) -> EAFTOutput:
    """EAFT loss: sum_t w_t * CE_t / N over supervised tokens, w_t = (H_topK / ln K) ** alpha, detached.

    logits [..., V] (fp32/bf16/fp16) and labels [...] (unshifted when shift=True). N is
    `num_items_in_batch` when given, else the number of supervised tokens. `token_scale`
    (same shape as labels, shifted with them) multiplies each token's loss, e.g. ms-swift's
    loss_scale. Options: see EAFTOptions (keywords or `options=`).
    """
    opts = make_options(options, **option_overrides)
    flat, idx, y, token_scale = _prepare(logits, labels, opts, shift, token_scale)
    lse, ce, h_norm = _scores(flat, idx, y, opts)
    check_finite(lse, ce, h_norm)
    w, stats = finish_weights(h_norm, ce, opts, mean_weight, generator)
    if token_scale is not None:
        w = w * token_scale.reshape(-1).to(w.device, w.dtype)[idx]
    coef = w / _denominator(num_items_in_batch, idx.numel(), w.device)
    value = (coef * ce).sum()
    loss = _WeightedCE.apply(flat, idx, y, lse, coef, value, opts.rows_per_chunk(flat.size(1)))
    return EAFTOutput(loss, stats)


def token_scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    options: OptionsLike = None,
    shift: bool = True,
    mean_weight: Union[float, torch.Tensor, None] = None,
    generator: Optional[torch.Generator] = None,
    **option_overrides,
) -> TokenScores:
    """The per-token quantities behind eaft_loss (no graph), for analysis and tests."""
    opts = make_options(options, **option_overrides)
    flat, idx, y, _ = _prepare(logits, labels, opts, shift, None)
    lse, ce, h_norm = _scores(flat, idx, y, opts)
    check_finite(lse, ce, h_norm)
    w, _ = finish_weights(h_norm, ce, opts, mean_weight, generator)
    return TokenScores(idx, y, ce, h_norm, w)


def _prepare(logits, labels, opts: EAFTOptions, shift: bool, token_scale):
    vocab = logits.size(-1)
    opts.check_vocab(vocab)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)} "
            "without its last (vocabulary) dimension"
        )
    if token_scale is not None and token_scale.shape != labels.shape:
        raise ValueError(f"token_scale shape {tuple(token_scale.shape)} must equal labels shape {tuple(labels.shape)}")
    labels = labels.to(logits.device)
    if shift:
        labels = shift_labels(labels, opts.ignore_index)
        if token_scale is not None:
            token_scale = F.pad(token_scale[..., 1:], (0, 1), value=0)
    flat = logits.reshape(-1, vocab)  # a view for contiguous logits
    idx, y = supervised_rows(labels.reshape(-1), vocab, opts.ignore_index)
    return flat, idx, y, token_scale


def supervised_rows(labels_flat: torch.Tensor, vocab: int, ignore_index: int):
    """Indices of supervised rows and their labels; labels outside [0, vocab) raise."""
    idx = (labels_flat != ignore_index).nonzero().squeeze(1)
    y = labels_flat[idx].long()
    if y.numel():
        bad = (y < 0) | (y >= vocab)
        if bool(bad.any()):
            raise ValueError(
                f"labels must be in [0, {vocab}) or ignore_index={ignore_index}; "
                f"{int(bad.sum())} label(s) are not, e.g. {int(y[bad][0])}"
            )
    return idx, y


def check_finite(lse: torch.Tensor, ce: torch.Tensor, h_norm: torch.Tensor) -> None:
    bad = ~(torch.isfinite(lse) & torch.isfinite(ce) & torch.isfinite(h_norm))
    if bad.numel() and bool(bad.any()):
        raise ValueError(f"logits contain NaN or inf at {int(bad.sum())} of {bad.numel()} supervised tokens")


def _denominator(num_items_in_batch, n_supervised: int, device) -> torch.Tensor:
    if num_items_in_batch is None:
        return torch.tensor(float(max(n_supervised, 1)), device=device)
    n = torch.as_tensor(num_items_in_batch, device=device).float()
    return n.clamp_min(1.0)


def _row_chunks(idx: torch.Tensor, rows: int):
    """Yield (start, stop) over idx, and whether that piece is one contiguous run of rows."""
    idx_cpu = idx.cpu()
    for start in range(0, idx.numel(), rows):
        stop = min(start + rows, idx.numel())
        first, last = int(idx_cpu[start]), int(idx_cpu[stop - 1])
        yield start, stop, (first if last - first + 1 == stop - start else None)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types; float64 stays float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _gather(flat: torch.Tensor, idx: torch.Tensor, start: int, stop: int, first: Optional[int]) -> torch.Tensor:
    if first is not None:  # a contiguous run: a view, no copy for fp32 logits
        rows = flat.narrow(0, first, stop - start)
    else:
        rows = flat.index_select(0, idx[start:stop])
    return rows.to(compute_dtype(flat.dtype))


def _scores(flat: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, opts: EAFTOptions):
    n = idx.numel()
    lse = flat.new_empty(n, dtype=compute_dtype(flat.dtype))
    ce = torch.empty_like(lse)
    h_norm = torch.empty_like(lse)
    with torch.no_grad():
        for start, stop, first in _row_chunks(idx, opts.rows_per_chunk(flat.size(1))):
            z = _gather(flat, idx, start, stop, first)
            lse_c, z_y, h_c = chunk_scores(z, y[start:stop], opts)
            lse[start:stop], ce[start:stop], h_norm[start:stop] = lse_c, lse_c - z_y, h_c
    return lse, ce, h_norm


class _WeightedCE(torch.autograd.Function):
    """Returns the precomputed loss; backward is coef_t * (softmax(z_t) - onehot(y_t)), row-chunked."""

    @staticmethod
    def forward(ctx, flat, idx, y, lse, coef, value, rows):
        ctx.save_for_backward(flat, idx, y, lse, coef)
        ctx.rows = rows
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        flat, idx, y, lse, coef = ctx.saved_tensors
        grad = torch.zeros_like(flat)
        scale = coef * grad_out.to(coef.dtype)
        for start, stop, first in _row_chunks(idx, ctx.rows):
            g = torch.exp(_gather(flat, idx, start, stop, first) - lse[start:stop, None])
            g[torch.arange(stop - start, device=g.device), y[start:stop]] -= 1.0
            g.mul_(scale[start:stop, None])
            if first is not None:
                grad.narrow(0, first, stop - start).copy_(g)
            else:
                grad.index_copy_(0, idx[start:stop], g.to(grad.dtype))
        return grad, None, None, None, None, None, None
