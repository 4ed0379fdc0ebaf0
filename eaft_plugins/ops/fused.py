"""Fused linear EAFT: the loss from last hidden states and the LM head, never building [tokens, vocab].

For each chunk of supervised tokens (rows of `hidden` whose shifted label is not ignore_index)
the op computes the chunk's logits with the LM head, takes logsumexp / label logit / top-K
entropy from them with the core (`entropy.chunk_scores`), and drops them. Unsupervised rows
are never multiplied by the LM head at all.

Gradients are computed in the forward pass, chunk by chunk (like Liger's fused linear CE):
the EAFT weight is detached and the loss is a sum, so d loss / d logits_t =
c_t * (softmax(z_t) - onehot(y_t)) with c_t = w_t * token_scale_t / N known as soon as the
chunk's weights are. This needs 3 matmuls per chunk (logits, d hidden, d weight) against 4
for recomputing the logits in backward, at the price of holding d weight [V, H] (the size
of the gradient autograd would produce anyway) from forward to backward. The backward only
multiplies the stored gradients by the incoming scalar.

Weights are chunk-local for gate "soft"/"hard" with weight_norm "none" (or "mean" with a
given `mean_weight`): one pass. gate="shuffle" and weight_norm="mean" without `mean_weight`
need every token's entropy before any weight is known: pass 1 computes the logits of each
chunk for lse / CE / Htilde only ([N] vectors are kept), the core turns them into weights,
pass 2 recomputes each chunk's logits for the gradients (4 matmuls per chunk instead of 3).

`logit_transform` (a `LogitTransform`: kind "scale", "divide" or "softcap" and its constant) is
applied to each chunk's logits before they are scored, the way the model family's forward applies it
to its logits (Cohere's logit_scale, Granite's logits_scaling, Gemma's final_logit_softcapping); its
derivative is chained into the hand-computed gradient (soft-cap: d z = d z' * (1 - (z'/c)^2)).

Under torch.autocast the matmuls run in the autocast dtype (like the model's lm_head would);
scores are always computed in fp32 (float64 stays float64). With bf16 weights the weight
gradient is accumulated in bf16 across chunks (as Liger does); with fp32 weights (mixed
precision with fp32 master weights) it is accumulated in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import math

import torch

from .entropy import chunk_scores, finish_weights, is_exact
from .common import (EAFTOutput, loss_denominator, row_chunks, align_labels, ce_grad_rows, check_finite, check_label_shapes,
                   compute_dtype, supervised_rows)
from ..options import METHODS, EAFTOptions, OptionsLike, make_method_options, make_options
from ..stats import EAFTStats, MethodStats

@dataclass(frozen=True)
class LogitTransform:
    """What a model family's forward does to `lm_head(h)`: z' = c*z ("scale"), z/c ("divide"),
    c*tanh(z/c) ("softcap"), or nothing ("none"). Applied in the same order of operations as the
    families' own code, so float64 results match it bit for bit."""

    kind: str = "none"
    value: float = 1.0

    KINDS = ("none", "scale", "divide", "softcap")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ValueError(f"logit transform kind must be one of {self.KINDS}, got {self.kind!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"logit transform {self.kind!r} needs a finite number, got {self.value!r}")
        if self.kind in ("divide", "softcap") and self.value <= 0 or self.kind == "scale" and self.value == 0:
            raise ValueError(f"logit transform {self.kind!r} needs a {'positive' if self.kind != 'scale' else 'non-zero'} "
                             f"constant, got {self.value!r}")

    def __str__(self) -> str:
        return {"none": "none", "scale": f"z * {self.value:g}", "divide": f"z / {self.value:g}",
                "softcap": f"{self.value:g} * tanh(z / {self.value:g})"}[self.kind]

    def apply_(self, z: torch.Tensor) -> torch.Tensor:
        """z' in place."""
        if self.kind == "scale":
            z.mul_(self.value)
        elif self.kind == "divide":
            z.div_(self.value)
        elif self.kind == "softcap":
            z.div_(self.value).tanh_().mul_(self.value)
        return z

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """z' out of place (autograd-safe), e.g. for the dense reference."""
        if self.kind == "scale":
            return z * self.value
        if self.kind == "divide":
            return z / self.value
        if self.kind == "softcap":
            return torch.tanh(z / self.value) * self.value
        return z

    def slope(self, z_out: torch.Tensor, work: torch.Tensor) -> Optional[torch.Tensor]:
        """dz'/dz from the transformed logits where it varies per entry (soft-cap: 1 - (z'/c)^2), in `work`."""
        if self.kind != "softcap":
            return None
        t = torch.div(z_out, self.value, out=work)
        return t.mul_(t).neg_().add_(1.0)

    def chain_(self, g: torch.Tensor, slope: Optional[torch.Tensor]) -> torch.Tensor:
        """d loss/dz from d loss/dz' (in place)."""
        if self.kind == "scale":
            g.mul_(self.value)
        elif self.kind == "divide":
            g.div_(self.value)
        elif self.kind == "softcap":
            g.mul_(slope)
        return g


NO_TRANSFORM = LogitTransform()


# Rows of the weight gradient formed at a time when it must be cast before accumulation
# (bf16 products into fp32 master-weight gradients): bounds that temporary to V_BLOCK x H.
V_BLOCK = 8192


def fused_linear_eaft_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    options: OptionsLike = None,
    num_items_in_batch: Union[int, torch.Tensor, None] = None,
    shift: bool = True,
    mean_weight: Union[float, torch.Tensor, None] = None,
    token_scale: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    logit_transform: Optional[LogitTransform] = None,
    method: str = "eaft",
    sample_weights: Optional[torch.Tensor] = None,
    **option_overrides,
) -> EAFTOutput:
    """EAFT loss of `hidden @ weight.T + bias` (then `logit_transform`) without materialising the logits.

    hidden [..., H] (e.g. [B, T, H] last hidden states), weight [V, H] (the LM head), bias [V]
    or None, labels [...] (unshifted when shift=True). Same options, results, stats and errors
    as `eaft_loss(logit_transform(F.linear(hidden, weight, bias)), labels, ...)`. chunk_size: supervised tokens
    per chunk (default: options.chunk_size, else ~16M fp32 logits per chunk).

    `method` "flow" or "talr" (options: FLOWOptions / TALROptions) gives `flow_loss` / `talr_loss` of the same logits
    instead (FLOW: `sample_weights` [B], one per row of labels [B, T]); their stats are MethodStats.
    """
    if method != "eaft" and not METHODS[method].fused:
        raise ValueError(f"{METHODS[method].title} has no fused path ({METHODS[method].fused_why_not})")
    opts = (make_options(options, **option_overrides) if method == "eaft"
            else make_method_options(METHODS[method].options, options, **option_overrides))
    if weight.dim() != 2:
        raise ValueError(f"weight must be the LM head matrix [vocab, hidden], got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if hidden.size(-1) != width:
        raise ValueError(f"hidden states' last dimension {hidden.size(-1)} does not match weight shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be ({vocab},)")
    if method == "eaft":
        opts.check_vocab(vocab)
    check_label_shapes(hidden, "hidden states", "hidden", labels, token_scale)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    labels, token_scale = align_labels(labels, token_scale, opts, shift, hidden.device)
    flat = hidden.reshape(-1, width)
    idx, y = supervised_rows(labels.reshape(-1), vocab, opts.ignore_index)
    scale = None if token_scale is None else token_scale.reshape(-1).to(hidden.device)[idx]
    if logit_transform is not None and not isinstance(logit_transform, LogitTransform):
        raise ValueError(f"logit_transform must be a LogitTransform or None, got {type(logit_transform).__name__}")
    rows = chunk_size or opts.rows_per_chunk(vocab)
    weigher = (_EAFTWeights(opts, mean_weight, generator) if method == "eaft"
               else _MethodWeights(method, opts, idx, labels, sample_weights))
    loss, stats = _FusedLinearEAFT.apply(
        flat, weight, bias, idx, y, scale, num_items_in_batch, weigher, rows, _matmul_dtype(hidden, weight),
        torch.is_grad_enabled(), logit_transform or NO_TRANSFORM,
    )
    return EAFTOutput(loss, weigher.stats_kind.from_vector(stats))


fused_linear_loss = fused_linear_eaft_loss  # the name for any method


class _EAFTWeights:
    """EAFT's weights in the fused op: from each token's normalised entropy (finish_weights)."""

    stats_kind = EAFTStats

    def __init__(self, opts: EAFTOptions, mean_weight, generator):
        self.opts, self.mean_weight, self.generator = opts, mean_weight, generator
        self.score_options = opts
        self.two_passes = needs_two_passes(opts, mean_weight)

    def chunk(self, h_norm, ce, start, stop):
        return finish_weights(h_norm, ce, self.opts, self.mean_weight)[0]

    def all(self, h_norm, ce):
        """(weights, stats) of every token (two passes)."""
        return finish_weights(h_norm, ce, self.opts, self.mean_weight, self.generator)

    def stats(self, h_norm, ce):
        return finish_weights(h_norm, ce, self.opts, self.mean_weight)[1]


# What FLOW and TALR score a chunk with: the exact entropy's single pass gives the logsumexp and leaves z intact
# (the entropy itself is not used).
_CE_ONLY = EAFTOptions(topk=None, entropy_norm="none")


class _MethodWeights:
    """FLOW's and TALR's weights in the fused op, from the same functions as their dense ops (ops/flow.py,
    ops/talr.py). TALR with tau "median" needs every token's cross-entropy first: two passes."""

    stats_kind = MethodStats

    def __init__(self, method: str, opts, idx, labels, sample_weights):
        from .flow import token_weights

        self.method, self.opts = method, opts
        self.rows = idx // labels.shape[-1]  # each supervised token's row of labels [B, T]
        self.flow = token_weights(sample_weights, idx, labels) if method == "flow" else None
        self.two_passes = method == "talr" and opts.tau is None

    score_options = _CE_ONLY

    def _talr(self, ce, rows):
        from .talr import talr_weights

        return talr_weights(ce, rows, self.opts)

    def chunk(self, h_norm, ce, start, stop):
        if self.flow is not None:
            return self.flow[start:stop].to(ce.dtype)
        return self._talr(ce, self.rows[start:stop])[0]

    def all(self, h_norm, ce):
        return self.chunk(h_norm, ce, 0, ce.numel()), self.stats(h_norm, ce)

    def stats(self, h_norm, ce):
        if self.flow is not None:
            return MethodStats.of(ce, weight=self.flow.to(ce.dtype))
        w, tau = self._talr(ce, self.rows)
        return MethodStats.of(ce, weight=w, tau=tau)


def needs_two_passes(opts: EAFTOptions, mean_weight=None) -> bool:
    """Whether a token's weight depends on other chunks' tokens (so weights precede gradients)."""
    return opts.gate == "shuffle" or (opts.weight_norm == "mean" and mean_weight is None)


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and hidden.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _FusedLinearEAFT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, flat, weight, bias, idx, y, scale, num_items, weigher, rows, mm_dtype, grad_on, transform):
        want = [grad_on and need for need in ctx.needs_input_grad]  # no gradient work under no_grad (eval)
        with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
            run = _Chunks(flat, weight, bias, idx, y, rows, mm_dtype, want[0], want[1], want[2] and bias is not None,
                          transform)
            denom = loss_denominator(num_items, idx.numel(), flat.device)
            n = idx.numel()
            lse = flat.new_empty(n, dtype=compute_dtype(mm_dtype))
            ce, h_norm, coef = torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(lse)

            def coefficients(w, start, stop):
                if scale is not None:
                    w = w * scale[start:stop].to(w.dtype)
                return w / denom

            opts = weigher.score_options
            if weigher.two_passes:
                for start, stop, first in run.chunks():
                    _score(run, run.logits(start, stop, first), y[start:stop], opts, lse, ce, h_norm, start, stop, False)
                check_finite(lse, ce, h_norm)
                w, stats = weigher.all(h_norm, ce)
                coef.copy_(coefficients(w, 0, n))
                if run.grads:
                    for start, stop, first in run.chunks():
                        run.backprop(run.logits(start, stop, first), lse[start:stop], coef[start:stop], start, stop, first)
            else:
                for start, stop, first in run.chunks():
                    z = run.logits(start, stop, first)
                    _score(run, z, y[start:stop], opts, lse, ce, h_norm, start, stop, run.grads)
                    w = weigher.chunk(h_norm[start:stop], ce[start:stop], start, stop)
                    coef[start:stop] = coefficients(w, start, stop)
                    if run.grads:
                        run.backprop(z, lse[start:stop], coef[start:stop], start, stop, first)
                check_finite(lse, ce, h_norm)
                stats = weigher.stats(h_norm, ce)  # stats of the whole call
            value = (coef * ce).sum()
        grads = run.finished()
        ctx.present = [g is not None for g in grads]
        ctx.save_for_backward(*[g for g in grads if g is not None])
        stats_vec = stats.to_vector()
        ctx.mark_non_differentiable(stats_vec)
        return value, stats_vec

    @staticmethod
    def backward(ctx, grad_out, _grad_stats):
        # The gradients were computed in forward for an incoming gradient of 1. They are handed
        # over as they are: the graph has released them by the time autograd stores .grad, so
        # the first .grad is the tensor itself, no copy. Otherwise they are scaled in place: a
        # second backward over a retained graph then fails autograd's in-place check rather
        # than return wrong numbers (with grad_out == 1, e.g. gradcheck, it just works).
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if present else None for present in ctx.present]
        if not bool(grad_out == 1):
            for g in grads:
                if g is not None:
                    g.mul_(grad_out.to(g.dtype))
        return (*grads, None, None, None, None, None, None, None, None, None)


def _score(run, z, y, opts, lse, ce, h_norm, start, stop, keep_z):
    lse_c, z_y, h_c = run.scores(z, y, opts, keep_z)
    lse[start:stop], ce[start:stop], h_norm[start:stop] = lse_c, lse_c - z_y, h_c


class _Chunks:
    """Logits and gradient accumulation for row-chunks of the supervised tokens.

    Three [C, V] buffers are allocated once and reused by every chunk (fresh pages cost about
    as much as a pass over them): the matmul output (later the low-precision gradient), its
    fp32 copy (later the fp32 gradient), and logsumexp's scratch.
    """

    def __init__(self, flat, weight, bias, idx, y, rows, mm_dtype, grad_hidden, grad_weight, grad_bias, transform):
        self.flat, self.weight, self.bias, self.idx, self.y = flat, weight, bias, idx, y
        self.transform = transform
        self.rows = min(rows, max(idx.numel(), 1))
        self.mm_dtype, self.dtype = mm_dtype, compute_dtype(mm_dtype)
        # Cast once (autocast would cache the same copy); a no-op when dtypes already agree.
        self.w = weight.to(mm_dtype)
        self.b = None if bias is None else bias.to(mm_dtype)
        self.gh = torch.zeros_like(flat) if grad_hidden else None
        self.gw = torch.zeros_like(weight) if grad_weight else None
        self.gb = torch.zeros_like(bias, dtype=compute_dtype(bias.dtype)) if grad_bias else None
        self.grads = grad_hidden or grad_weight or grad_bias
        self._h = None
        self._out = self._z = self._work = None

    def _buffer(self, name, dtype):
        if getattr(self, name) is None:
            setattr(self, name, self.flat.new_empty((self.rows, self.w.size(0)), dtype=dtype))
        return getattr(self, name)

    def chunks(self):
        if self.idx.numel():
            yield from row_chunks(self.idx, self.rows)

    def logits(self, start, stop, first):
        """fp32 logits of the chunk after the logit transform (a buffer reused by the next chunk)."""
        if first is not None:
            h = self.flat.narrow(0, first, stop - start)
        else:
            h = self.flat.index_select(0, self.idx[start:stop])
        self._h = h.to(self.mm_dtype)
        out = self._buffer("_out", self.mm_dtype)[: stop - start]
        if self.b is None:
            torch.mm(self._h, self.w.t(), out=out)
        else:
            torch.addmm(self.b, self._h, self.w.t(), out=out)
        if self.mm_dtype != self.dtype:
            out = self._buffer("_z", self.dtype)[: stop - start].copy_(out)
        return self.transform.apply_(out)

    def scores(self, z, y, opts, keep_z):
        """chunk_scores; z is left intact only when keep_z (it is needed for the gradient)."""
        work = self._buffer("_work", self.dtype)[: z.size(0)] if keep_z and not is_exact(opts, z.size(1)) else z
        return chunk_scores(z, y, opts, work=work)

    def backprop(self, z, lse, coef, start, stop, first):
        """z: this chunk's fp32 (transformed) logits (overwritten). Adds the chunk's gradients."""
        slope = self.transform.slope(z, self._buffer("_work", self.dtype)[: z.size(0)])
        g32 = self.transform.chain_(ce_grad_rows(z, lse, self.y[start:stop], coef, out=z), slope)
        g = g32 if self.mm_dtype == self.dtype else self._out[: stop - start].copy_(g32)
        if self.gb is not None:
            self.gb.add_(g32.sum(0))
        if self.gh is not None:
            gh = torch.mm(g, self.w).to(self.gh.dtype)
            if first is not None:
                self.gh.narrow(0, first, stop - start).copy_(gh)
            else:
                self.gh.index_copy_(0, self.idx[start:stop], gh)
        if self.gw is not None:
            if self.gw.dtype == g.dtype:
                self.gw.addmm_(g.t(), self._h)
            else:  # e.g. bf16 products into an fp32 master weight's gradient: cast block by block
                for v0 in range(0, self.gw.size(0), V_BLOCK):
                    v1 = min(v0 + V_BLOCK, self.gw.size(0))
                    self.gw[v0:v1] += (g[:, v0:v1].t() @ self._h).to(self.gw.dtype)

    def finished(self):
        gb = None if self.gb is None else self.gb.to(self.bias.dtype)
        return self.gh, self.gw, gb
