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
    coef = w / loss_denominator(num_items_in_batch, idx.numel(), w.device)
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
    check_label_shapes(logits, "logits", "vocabulary", labels, token_scale)
    labels, token_scale = align_labels(labels, token_scale, opts, shift, logits.device)
    flat = logits.reshape(-1, vocab)  # a view for contiguous logits
    idx, y = supervised_rows(labels.reshape(-1), vocab, opts.ignore_index)
    return flat, idx, y, token_scale


def check_label_shapes(inputs: torch.Tensor, name: str, last_dim: str, labels: torch.Tensor, token_scale) -> None:
    """labels must be shaped like `inputs` without its last dimension, token_scale like labels."""
    if inputs.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match {name} shape {tuple(inputs.shape)} "
            f"without its last ({last_dim}) dimension"
        )
    if token_scale is not None and token_scale.shape != labels.shape:
        raise ValueError(f"token_scale shape {tuple(token_scale.shape)} must equal labels shape {tuple(labels.shape)}")


def align_labels(labels: torch.Tensor, token_scale, opts: EAFTOptions, shift: bool, device):
    """Labels on `device`, shifted for a causal LM when `shift` (token_scale moves with them)."""
    labels = labels.to(device)
    if shift:
        labels = shift_labels(labels, opts.ignore_index)
        if token_scale is not None:
            token_scale = F.pad(token_scale[..., 1:], (0, 1), value=0)
    return labels, token_scale


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
        n_bad = int(bad.sum())
        # Finite logits whose label logit is -inf: CE is +inf because the label has probability 0.
        label_only = torch.isfinite(lse) & torch.isposinf(ce) & torch.isfinite(h_norm)
        if int(label_only.sum()) == n_bad:
            raise ValueError(
                f"the label's logit is -inf at {n_bad} of {bad.numel()} supervised tokens, so their cross-entropy "
                "is infinite (the model gives those labels probability 0: a masked or biased-out vocabulary entry?)")
        raise ValueError(f"logits contain NaN or inf at {n_bad} of {bad.numel()} supervised tokens")


# Chunk helpers shared by the dense, fused and vocab-parallel ops.


def loss_denominator(num_items_in_batch, n_supervised: int, device) -> torch.Tensor:
    """N of sum_t w_t ce_t / N: num_items_in_batch when given, else the supervised tokens (at least 1)."""
    if num_items_in_batch is None:
        return torch.tensor(float(max(n_supervised, 1)), device=device)
    n = torch.as_tensor(num_items_in_batch, device=device).float()
    return n.clamp_min(1.0)


def row_chunks(idx: torch.Tensor, rows: int):
    """Yield (start, stop) over idx, and whether that piece is one contiguous run of rows."""
    idx_cpu = idx.cpu()
    for start in range(0, idx.numel(), rows):
        stop = min(start + rows, idx.numel())
        first, last = int(idx_cpu[start]), int(idx_cpu[stop - 1])
        yield start, stop, (first if last - first + 1 == stop - start else None)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half types; float64 stays float64 (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def gather_rows(
    flat: torch.Tensor, idx: torch.Tensor, start: int, stop: int, first: Optional[int], out: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Rows idx[start:stop] of flat in the compute dtype; `out` ([>= rows, V], compute dtype) is
    reused for copies, so chunks after the first allocate nothing (fresh pages cost as much as a pass)."""
    if first is not None:  # a contiguous run: a view, no copy for fp32 logits
        rows = flat.narrow(0, first, stop - start)
        if out is None or rows.dtype == out.dtype:
            return rows.to(compute_dtype(flat.dtype))
    elif out is not None and flat.dtype == out.dtype:
        return torch.index_select(flat, 0, idx[start:stop], out=out[: stop - start])
    else:
        rows = flat.index_select(0, idx[start:stop])
    if out is None:
        return rows.to(compute_dtype(flat.dtype))
    return out[: stop - start].copy_(rows)


def _chunk_buffer(flat: torch.Tensor, n: int, rows: int) -> torch.Tensor:
    return flat.new_empty((min(rows, n), flat.size(1)), dtype=compute_dtype(flat.dtype))


def _scores(flat: torch.Tensor, idx: torch.Tensor, y: torch.Tensor, opts: EAFTOptions):
    n = idx.numel()
    lse = flat.new_empty(n, dtype=compute_dtype(flat.dtype))
    ce = torch.empty_like(lse)
    h_norm = torch.empty_like(lse)
    if n == 0:
        return lse, ce, h_norm
    rows = opts.rows_per_chunk(flat.size(1))
    buf, work = _chunk_buffer(flat, n, rows), None
    with torch.no_grad():
        for start, stop, first in row_chunks(idx, rows):
            z = gather_rows(flat, idx, start, stop, first, out=buf)
            if z.data_ptr() == buf.data_ptr():
                scratch = z  # our own copy: logsumexp may overwrite it
            else:  # a view of the caller's logits
                work = _chunk_buffer(flat, n, rows) if work is None else work
                scratch = work[: stop - start]
            lse_c, z_y, h_c = chunk_scores(z, y[start:stop], opts, work=scratch)
            lse[start:stop], ce[start:stop], h_norm[start:stop] = lse_c, lse_c - z_y, h_c
    return lse, ce, h_norm


def ce_grad_rows(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, out=None) -> torch.Tensor:
    """d(sum_t scale_t * ce_t)/dz for rows z [C, V]: scale_t * (softmax(z_t) - onehot(y_t)).

    Written into `out` (which may be z itself) so a chunk needs no extra [C, V] temporaries.
    """
    g = torch.sub(z, lse[:, None], out=out) if out is not None else z - lse[:, None]
    g.exp_()
    g[torch.arange(g.size(0), device=g.device), y] -= 1.0
    return g.mul_(scale[:, None])


def _unsupervised_rows(idx: torch.Tensor, rows: int) -> torch.Tensor:
    keep = torch.ones(rows, dtype=torch.bool, device=idx.device)
    keep[idx] = False
    return keep.nonzero().squeeze(1)


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
            buf = _chunk_buffer(flat, idx.numel(), ctx.rows) if buf is None else buf
            z = gather_rows(flat, idx, start, stop, first, out=buf)  # our copy
            g = ce_grad_rows(z, lse[start:stop], y[start:stop], scale[start:stop], out=z)
            if first is not None:
                grad.narrow(0, first, stop - start).copy_(g)
            else:
                grad.index_copy_(0, idx[start:stop], g.to(grad.dtype))
        return grad, None, None, None, None, None, None
