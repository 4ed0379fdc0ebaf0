"""Dense EAFT loss on materialised logits, upcast one row-chunk at a time."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch

from ..options import EAFTOptions, OptionsLike, make_options
from .common import EAFTOutput, check_finite, compute_dtype, gather_rows, row_chunks
from .entropy import chunk_scores, finish_weights, is_exact
from .weighted import chunk_buffer as _chunk_buffer, coefficients, prepare, weighted_ce


class TokenScores(NamedTuple):
    """Per supervised token (in flattened, shifted order): row index, label, CE, Htilde, weight."""

    index: torch.Tensor
    labels: torch.Tensor
    ce: torch.Tensor
    entropy: torch.Tensor
    weight: torch.Tensor


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
    coef = coefficients(w, token_scale, idx, num_items_in_batch)
    loss = weighted_ce(flat, idx, y, lse, ce, coef, opts.rows_per_chunk(flat.size(1)))
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
    opts.check_vocab(logits.size(-1))
    return prepare(logits, labels, opts.ignore_index, shift, token_scale)


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
            if z.data_ptr() == buf.data_ptr() or is_exact(opts, flat.size(1)):
                scratch = z  # our own copy (logsumexp may overwrite it), or not written at all
            else:  # a view of the caller's logits
                work = _chunk_buffer(flat, n, rows) if work is None else work
                scratch = work[: stop - start]
            lse_c, z_y, h_c = chunk_scores(z, y[start:stop], opts, work=scratch)
            lse[start:stop], ce[start:stop], h_norm[start:stop] = lse_c, lse_c - z_y, h_c
    return lse, ce, h_norm
