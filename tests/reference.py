"""What the op tests share: the device switch, dtypes, tolerances and one float64 reference.

The device comes from `pytest --device cuda` (conftest.py sets EAFT_TEST_DEVICE) or from
EAFT_TEST_DEVICE itself; default cpu. Inputs are drawn on the CPU (the same values on every
device), cast, then moved; the reference always runs on the CPU in float64.
"""

import math
import os

import pytest
import torch

IGNORE = -100
DEVICE = torch.device(os.environ.get("EAFT_TEST_DEVICE") or "cpu")
ON_CPU = DEVICE.type == "cpu"
# CPU keeps its fp32 runs (half types have their own tests there); on a GPU bf16 is how models train.
DTYPES = [torch.float32] if ON_CPU else [torch.float32, torch.bfloat16]


# The loss options every op is checked on against the reference.
OPTION_CASES = [
    {},
    {"topk": 5},
    {"topk": None},
    {"alpha": 0.5},
    {"alpha": 2.0, "topk": 7},
    {"entropy_norm": "upstream"},
    {"entropy_norm": "none"},
    {"gate": "hard", "h_min": 0.6, "p_min": 0.2},
]


def cpu_only(reason: str):
    """Marks a test that cannot run on the test device; the reason is printed with -ra."""
    return pytest.mark.skipif(not ON_CPU, reason=f"CPU-ONLY, not run on {DEVICE}: {reason}")


def to_device(*tensors, dtype=None):
    """Each tensor on DEVICE, floating ones cast to `dtype` when given; None stays None."""
    out = []
    for t in tensors:
        if t is not None:
            t = t.to(DEVICE, dtype if dtype is not None and t.is_floating_point() else t.dtype)
        out.append(t)
    return out if len(out) != 1 else out[0]


def tol(dtype, rtol, atol=0.0):
    """The given (fp32) tolerance; looser for half types: one bf16 rounding is 2**-8 = 4e-3."""
    if dtype in (torch.bfloat16, torch.float16):
        return dict(rtol=max(rtol, 2e-2), atol=max(atol, 5e-3))
    return dict(rtol=rtol, atol=atol)


def reference_loss(logits, labels, *, topk=20, alpha=1.0, entropy_norm="ln_k", gate="soft", h_min=0.15, p_min=0.1,
                   num_items=None, shift=True, weight_norm="none", mean_weight=None, token_scale=None):
    """sum_t w_t * ce_t / N, one token at a time in float64 on the CPU.

    Returns (loss, d loss / d logits [same shape, float64], supervised token count); the
    weight is a constant in the gradient, as EAFT detaches it.
    """
    z = logits.detach().cpu().double()
    vocab = z.shape[-1]
    steps_len = labels.shape[-1]
    rows = z.reshape(-1, steps_len, vocab)
    ys = labels.cpu().reshape(-1, steps_len)
    scale = None if token_scale is None else token_scale.detach().cpu().double().reshape(-1, steps_len)
    toks = []  # (b, t, label, ce, h_norm, softmax)
    for b in range(ys.shape[0]):
        for t in range(steps_len - 1 if shift else steps_len):
            label = int(ys[b, t + 1 if shift else t])
            if label == IGNORE:
                continue
            row = rows[b, t]
            probs = torch.softmax(row, -1)
            ce = -math.log(probs[label].item())
            k = vocab if topk is None else topk
            vals = sorted(row.tolist(), reverse=True)[:k]
            exps = [math.exp(v - vals[0]) for v in vals]
            total = sum(exps)
            ent = -sum((e / total) * math.log(e / total) for e in exps if e > 0)
            h_norm = ent / {"ln_k": math.log(k), "upstream": 3.0, "none": 1.0}[entropy_norm]
            toks.append((b, t, label, ce, h_norm, probs))
    if gate == "hard":
        ws = [0.0 if (h < h_min and math.exp(-ce) < p_min) else 1.0 for (_, _, _, ce, h, _) in toks]
    else:
        ws = [h**alpha for (_, _, _, _, h, _) in toks]
    if weight_norm == "mean" and toks:
        denom = mean_weight if mean_weight is not None else sum(ws) / len(ws)
        ws = [w / denom for w in ws] if denom > 0 else ws
    n = num_items if num_items is not None else max(len(toks), 1)
    loss, grad = 0.0, torch.zeros_like(rows)
    for (b, t, label, ce, _, probs), w in zip(toks, ws):
        if scale is not None:
            w = w * float(scale[b, t + 1 if shift else t])
        loss += w * ce / n
        dz = probs.clone()
        dz[label] -= 1.0
        grad[b, t] = dz * (w / n)
    return loss, grad.reshape(z.shape), len(toks)


def reference_linear(hidden, weight, bias, labels, **kwargs):
    """reference_loss of hidden @ weight.T + bias: (loss, d hidden, d weight, d bias, count).

    For half-type inputs the float64 logits are rounded to that type first, as the op's
    (and the model's) matmul output is; the rest stays float64.
    """
    h, w = hidden.detach().cpu().double(), weight.detach().cpu().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().cpu().double()
    logits = h @ w.T + b
    mm_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if mm_dtype in (torch.bfloat16, torch.float16):
        logits = logits.to(mm_dtype).double()
    loss, dz, count = reference_loss(logits, labels, **kwargs)
    flat_dz, flat_h = dz.reshape(-1, w.shape[0]), h.reshape(-1, w.shape[1])
    return loss, (flat_dz @ w).reshape(h.shape), flat_dz.T @ flat_h, flat_dz.sum(0), count


# ---- the math table's other losses (SFT-KL, FLOW, TALR), each written from its paper's formula: a loop over the
# supervised tokens in float64 on the CPU; gradients by autograd through that formula, the weights plain floats.


def _tokens(labels, shift, token_scale):
    """[(row, position, label, scale)] of the supervised tokens, in order; position t predicts labels[t + shift]."""
    ys = labels.cpu().reshape(-1, labels.shape[-1])
    scale = None if token_scale is None else token_scale.detach().cpu().double().reshape(ys.shape)
    out = []
    for b in range(ys.shape[0]):
        for t in range(ys.shape[1] - 1 if shift else ys.shape[1]):
            s = t + 1 if shift else t
            if int(ys[b, s]) != IGNORE:
                out.append((b, t, int(ys[b, s]), 1.0 if scale is None else float(scale[b, s])))
    return out


def _leaf(logits):
    z = logits.detach().cpu().double().reshape(-1, logits.shape[-2], logits.shape[-1]).clone().requires_grad_()
    return z


def _finish(z, total, logits):
    """(loss, d loss / d logits shaped like logits) from a float64 graph `total` on the leaf z."""
    total = torch.as_tensor(total, dtype=torch.float64) if not torch.is_tensor(total) else total
    if total.requires_grad:
        total.backward()
    grad = z.grad if z.grad is not None else torch.zeros_like(z)
    return float(total.detach()), grad.reshape(logits.shape)


def reference_sft_kl(logits, labels, ref_logits, *, beta=0.5, direction="forward", num_items=None, shift=True,
                     token_scale=None):
    """SFT-KL: sum_t s_t * (-log p_t(y_t) + beta * KL_t) / N; forward KL_t = KL(q_t || p_t) = sum_v q log(q / p),
    reverse KL_t = KL(p_t || q_t); p the model's softmax, q the starting model's (no gradient)."""
    z = _leaf(logits)
    r = ref_logits.detach().cpu().double().reshape(z.shape)
    toks = _tokens(labels, shift, token_scale)
    n = num_items if num_items is not None else max(len(toks), 1)
    total = torch.zeros((), dtype=torch.float64)
    for b, t, y, s in toks:
        logp, logq = torch.log_softmax(z[b, t], -1), torch.log_softmax(r[b, t], -1)
        if direction == "forward":
            kl = (logq.exp() * (logq - logp)).sum()
        else:
            kl = (logp.exp() * (logp - logq)).sum()
        total = total + s * (-logp[y] + beta * kl) / n
    return _finish(z, total, logits)


def reference_flow(logits, labels, start_losses, *, tau=None, num_items=None, shift=True, token_scale=None):
    """FLOW (Sanyal et al. 2025, eq. 4-5): w_i = exp(-L_i / tau), tau the median of the examples' starting losses
    L_i when not given; loss = sum_i w_i sum_t s_t * ce_it / N. Returns (loss, grad, weights)."""
    losses = [float(x) for x in start_losses]
    if tau is None:
        ordered = sorted(losses)
        m = len(ordered)
        tau = (ordered[(m - 1) // 2] + ordered[m // 2]) / 2
    weights = [math.exp(-x / tau) for x in losses]
    z = _leaf(logits)
    toks = _tokens(labels, shift, token_scale)
    n = num_items if num_items is not None else max(len(toks), 1)
    total = torch.zeros((), dtype=torch.float64)
    for b, t, y, s in toks:
        total = total + weights[b] * s * -torch.log_softmax(z[b, t], -1)[y] / n
    loss, grad = _finish(z, total, logits)
    return loss, grad, weights


def reference_talr(logits, labels, *, tau=None, min_weight=0.01, num_items=None, shift=True, token_scale=None):
    """TALR (Lin et al. 2025): w_t = max(p_t(y_t) ** (1 / tau), min_weight), a constant; loss = sum_t s_t w_t ce_t / N.
    tau None: the median over the batch's sequences of their mean token cross-entropy. Returns (loss, grad, tau)."""
    z = _leaf(logits)
    toks = _tokens(labels, shift, token_scale)
    ces = [-float(torch.log_softmax(z[b, t].detach(), -1)[y]) for b, t, y, _ in toks]
    if tau is None and toks:
        per_row = {}
        for (b, _, _, _), ce in zip(toks, ces):
            per_row.setdefault(b, []).append(ce)
        means = sorted(sum(v) / len(v) for v in per_row.values())
        tau = (means[(len(means) - 1) // 2] + means[len(means) // 2]) / 2
    n = num_items if num_items is not None else max(len(toks), 1)
    total = torch.zeros((), dtype=torch.float64)
    for (b, t, y, s), ce in zip(toks, ces):
        w = max(math.exp(-ce) ** (1.0 / tau), min_weight)
        total = total + s * w * -torch.log_softmax(z[b, t], -1)[y] / n
    loss, grad = _finish(z, total, logits)
    return loss, grad, tau
