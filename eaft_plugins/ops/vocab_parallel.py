"""EAFT on logits sharded over the vocabulary (tensor parallelism), with plain torch.distributed.

Each rank of `group` holds logits [..., V_local] for vocabulary ids [start, start + V_local);
the shards tile [0, V) in rank order (uneven sizes allowed). Every rank holds the same rows and
the same global labels. Per supervised token the ranks exchange, one row-chunk at a time:

  * all_gather of each rank's top-min(K, V_local) logits (K values per rank): the global top-K
    is the top-K of the K*tp gathered values, and the global max is among them;
  * one SUM all_reduce of (sum exp(z - max), label logit) over the shards -> logsumexp and CE;
  * with topk=None (exact entropy) one more SUM all_reduce of sum_v entr(softmax_v) instead
    of the all_gather (after a MAX all_reduce).

So a token costs O(K * tp) values, never O(V). The weights then come from the core
(`finish_weights`) on identical inputs, so every rank gets the same weights and stats. The
backward needs no communication: d loss / d z_local = c_t * (softmax(z)_local - onehot_local),
with the global logsumexp saved from the forward.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from .entropy import finish_weights, topk_entropy
from .common import (EAFTOutput, loss_denominator, gather_rows, row_chunks, align_labels, check_finite, check_label_shapes,
                   compute_dtype, supervised_rows)
from ..options import EAFTOptions, OptionsLike, make_options

REDUCTIONS = ("mean", "none")


class ShardLayout(NamedTuple):
    """Vocabulary shards of a group, in group-rank order."""

    starts: List[int]
    sizes: List[int]
    rank: int

    @property
    def vocab_size(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def size(self) -> int:
        return self.sizes[self.rank]


def _distributed(group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def shard_layout(local_vocab: int, group=None, vocab_start: Optional[int] = None, device=None) -> ShardLayout:
    """Exchange (start, size) of every rank (2 ints each) and check that the shards tile [0, V).

    `device`: where the exchange tensor lives (the logits' device: NCCL cannot all-gather CPU tensors)."""
    if not _distributed(group):
        if vocab_start not in (None, 0):
            raise ValueError(f"vocab_start={vocab_start} on a single rank: the shard must start at 0")
        return ShardLayout([0], [local_vocab], 0)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    mine = torch.tensor([-1 if vocab_start is None else vocab_start, local_vocab], dtype=torch.long, device=device)
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine, group=group)
    sizes = [int(p[1]) for p in parts]
    if min(sizes) < 1:
        raise ValueError(f"every rank needs at least one vocabulary entry; shard sizes are {sizes}")
    offsets = [sum(sizes[:r]) for r in range(world)]
    given = [int(p[0]) for p in parts]
    starts = [offsets[r] if given[r] == -1 else given[r] for r in range(world)]
    if starts != offsets:
        raise ValueError(
            f"vocabulary shards must tile [0, V) in rank order; got starts {starts} for sizes {sizes} "
            f"(expected starts {offsets})"
        )
    return ShardLayout(starts, sizes, rank)


def vocab_parallel_eaft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    group=None,
    vocab_start: Optional[int] = None,
    options: OptionsLike = None,
    num_items_in_batch: Union[int, torch.Tensor, None] = None,
    reduction: str = "mean",
    shift: bool = True,
    mean_weight: Union[float, torch.Tensor, None] = None,
    token_scale: Optional[torch.Tensor] = None,
    generator: Optional[torch.Generator] = None,
    **option_overrides,
) -> EAFTOutput:
    """EAFT loss of vocabulary-sharded logits; equals `eaft_loss` on the concatenated logits.

    logits [..., V_local] (this rank's shard, fp32/bf16/fp16), labels [...] global ids, unshifted
    when shift=True (the default of every op); Megatron shifts them in its data loader, so its
    wiring passes shift=False. vocab_start: this
    rank's first id (default: the sum of the lower ranks' shard sizes). reduction="mean" gives
    sum_t w_t ce_t / N (N = num_items_in_batch or the number of supervised tokens);
    reduction="none" gives the per-token w_t * ce_t (* token_scale), shaped like labels, 0 at
    unsupervised positions. Stats are those of the whole vocabulary, the same on every rank of
    the group: reduce them over data-parallel ranks only. Every rank of the group must call
    this with the same labels.
    """
    opts = make_options(options, **option_overrides)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {reduction!r}")
    check_label_shapes(logits, "logits", "vocabulary", labels, token_scale)
    layout = shard_layout(logits.size(-1), group, vocab_start, device=logits.device)
    opts.check_vocab(layout.vocab_size)
    labels, token_scale = align_labels(labels, token_scale, opts, shift, logits.device)
    flat = logits.reshape(-1, logits.size(-1))
    idx, y = supervised_rows(labels.reshape(-1), layout.vocab_size, opts.ignore_index)
    rows = opts.rows_per_chunk(max(layout.sizes))  # the same on every rank: the chunks are collective steps
    lse, ce, h_norm = _sharded_scores(flat, idx, y, opts, layout, group, rows)
    check_finite(lse, ce, h_norm)
    w, stats = finish_weights(h_norm, ce, opts, mean_weight, generator)
    if opts.gate == "shuffle" and _distributed(group):
        dist.broadcast(w, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    if token_scale is not None:
        w = w * token_scale.reshape(-1).to(w.device, w.dtype)[idx]
    if reduction == "mean":
        coef = w / loss_denominator(num_items_in_batch, idx.numel(), w.device)
        value = (coef * ce).sum()
    else:
        coef = w
        value = flat.new_zeros(flat.size(0), dtype=ce.dtype).index_copy_(0, idx, coef * ce)
    loss = _ShardedWeightedCE.apply(flat, idx, y - layout.start, lse, coef, value, rows)
    if reduction == "none":
        loss = loss.view(labels.shape)
    return EAFTOutput(loss, stats)


def _sharded_scores(flat, idx, y, opts: EAFTOptions, layout: ShardLayout, group, rows: int):
    """Global (logsumexp, CE, normalised entropy) of the supervised rows, from the local shard."""
    n = idx.numel()
    dtype = compute_dtype(flat.dtype)
    lse = flat.new_empty(n, dtype=dtype)
    ce = torch.empty_like(lse)
    h_norm = torch.empty_like(lse)
    divisor = opts.entropy_divisor(layout.vocab_size)  # ln K, or ln of the GLOBAL vocabulary
    with torch.no_grad():
        for start, stop, first in row_chunks(idx, rows):
            z = gather_rows(flat, idx, start, stop, first)
            local_y = y[start:stop] - layout.start
            mine = (local_y >= 0) & (local_y < layout.size)
            z_y = z.gather(1, local_y.clamp(0, layout.size - 1).unsqueeze(1)).squeeze(1)
            z_y = torch.where(mine, z_y, torch.zeros_like(z_y))  # the owning shard adds the label logit
            if opts.topk is not None:
                top = _gathered_topk(z, opts.topk, group)  # [C, K * tp]
                m = top.max(-1).values
                h = topk_entropy(top, opts.topk)
            else:
                m = z.max(-1).values
                _all_reduce(m, dist.ReduceOp.MAX, group)
            m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # NaN/inf surface in check_finite
            sums = torch.stack([torch.exp(z - m_safe[:, None]).sum(-1), z_y], dim=1)
            _all_reduce(sums, dist.ReduceOp.SUM, group)
            lse_c = m_safe + torch.log(sums[:, 0])
            if opts.topk is None:
                # Exact entropy -sum p log p, summed over the shards (entr keeps -inf logits at 0).
                h = torch.special.entr(torch.exp(z - lse_c[:, None])).sum(-1)
                _all_reduce(h, dist.ReduceOp.SUM, group)
            lse[start:stop], ce[start:stop], h_norm[start:stop] = lse_c, lse_c - sums[:, 1], h / divisor
    return lse, ce, h_norm


def _gathered_topk(z: torch.Tensor, k: int, group) -> torch.Tensor:
    """Each rank's top-min(k, V_local) values, padded with -inf to k, gathered: [C, k * tp]."""
    k_local = min(k, z.size(1))
    top = torch.topk(z, k_local, dim=-1, sorted=False).values
    if k_local < k:
        top = torch.cat([top, top.new_full((top.size(0), k - k_local), float("-inf"))], dim=1)
    if not _distributed(group):
        return top
    parts = [torch.empty_like(top) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, top.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _all_reduce(t: torch.Tensor, op, group) -> None:
    if _distributed(group):
        dist.all_reduce(t, op=op, group=group)


class _ShardedWeightedCE(torch.autograd.Function):
    """Returns the precomputed loss; backward is c_t * (softmax(z_t)_local - onehot_local(y_t)).

    The softmax uses the global logsumexp saved from the forward, so no communication is needed;
    labels outside this shard contribute no one-hot term here.
    """

    @staticmethod
    def forward(ctx, flat, idx, local_y, lse, coef, value, rows):
        ctx.save_for_backward(flat, idx, local_y, lse, coef)
        ctx.rows = rows
        ctx.per_token = value.dim() > 0
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad_out):
        flat, idx, local_y, lse, coef = ctx.saved_tensors
        grad = torch.zeros_like(flat)
        if ctx.per_token:
            scale = coef * grad_out.reshape(-1)[idx].to(coef.dtype)
        else:
            scale = coef * grad_out.to(coef.dtype)
        size = flat.size(1)
        for start, stop, first in row_chunks(idx, ctx.rows):
            g = torch.exp(gather_rows(flat, idx, start, stop, first) - lse[start:stop, None])
            ly = local_y[start:stop]
            mine = ((ly >= 0) & (ly < size)).nonzero().squeeze(1)
            g[mine, ly[mine]] -= 1.0
            g.mul_(scale[start:stop, None])
            if first is not None:
                grad.narrow(0, first, stop - start).copy_(g)
            else:
                grad.index_copy_(0, idx[start:stop], g.to(grad.dtype))
        return grad, None, None, None, None, None, None
