"""Row, label and chunk helpers shared by the dense, fused and vocab-parallel ops."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from ..options import EAFTOptions
from ..stats import EAFTStats


class EAFTOutput(NamedTuple):
    loss: torch.Tensor  # fp32 scalar, attached to the logits' graph (also when nothing is supervised)
    stats: EAFTStats


def shift_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Causal shift: position i is scored against label i+1; the last position is unsupervised."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


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


def ce_grad_rows(z: torch.Tensor, lse: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, out=None) -> torch.Tensor:
    """d(sum_t scale_t * ce_t)/dz for rows z [C, V]: scale_t * (softmax(z_t) - onehot(y_t)).

    Written into `out` (which may be z itself) so a chunk needs no extra [C, V] temporaries.
    """
    g = torch.sub(z, lse[:, None], out=out) if out is not None else z - lse[:, None]
    g.exp_()
    g[torch.arange(g.size(0), device=g.device), y] -= 1.0
    return g.mul_(scale[:, None])
