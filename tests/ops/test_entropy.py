"""Exact entropy (topk=None / "full") against float64, on adversarial logits, on the test device."""

import math

import pytest
import torch

from eaft_plugins import eaft_loss
from eaft_plugins.ops.dense import token_scores
from eaft_plugins.ops.entropy import exact_scores
from eaft_plugins.ops.fused import fused_linear_eaft_loss
from reference import IGNORE, reference_linear, reference_loss, to_device, tol

V = 300


def adversarial(case: str, b=2, t=7, seed=0) -> torch.Tensor:
    """fp32 logits [b, t, V] drawn on the CPU."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, V, generator=g)
    if case == "huge":  # large spread and offset: terms of sum p*z would cancel without the max shift
        return z * 20.0 + 3000.0
    if case == "masked":  # -inf vocabulary entries (never a label: see labels())
        z = z * 3.0
        z[..., 1::3] = -math.inf
        z[0, 2, 3:] = -math.inf  # a row with three finite entries
        return z
    if case == "one_hot":  # H ~ 0: one logit far above the rest
        z[..., 0] += 60.0
        return z
    if case == "uniform":  # H = ln V exactly
        return torch.full((b, t, V), 7.5)
    return z * 3.0


def labels(b=2, t=7, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, V // 3, (b, t), generator=g) * 3  # multiples of 3: finite in "masked"
    y[:, :2] = IGNORE
    y[0, 3] = 0  # row (0, 2) of "masked" predicts it: one of its three finite entries
    return y


def entropy64(z: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(torch.softmax(z.detach().cpu().double(), -1)).sum(-1)


CASES = ["plain", "huge", "masked", "one_hot", "uniform"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES)
def test_dense_exact_entropy_matches_float64(case, dtype):
    z, y = to_device(adversarial(case), labels(), dtype=dtype)
    x = z.clone().requires_grad_()
    out = eaft_loss(x, y, topk=None)
    out.loss.backward()
    want, grad, count = reference_loss(z, y, topk=None)
    assert int(out.stats.tokens) == count
    # Every logit is exact in fp32 (inputs are upcast exactly); what is left is fp32 rounding of
    # logsumexp at the logits' magnitude (3000 in "huge": 3000 * 2**-24 ~ 2e-4 absolute in CE and in log p).
    rel = 1e-4 if case == "huge" else 1e-5
    assert out.loss.item() == pytest.approx(want, rel=rel, abs=1e-6)
    torch.testing.assert_close(x.grad.cpu().double(), grad, **tol(dtype, 1e-4 if case != "huge" else 5e-4, 1e-6))
    scores = token_scores(z, y, topk="full")
    h = entropy64(z.reshape(-1, V)[scores.index]) / math.log(V)
    torch.testing.assert_close(scores.entropy.cpu().double(), h, rtol=1e-5, atol=1e-6)
    if case == "uniform":
        assert torch.all(scores.entropy == 1.0)
    if case == "one_hot":
        assert float(scores.entropy.max()) < 1e-20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_fused_exact_entropy_matches_float64(case, dtype):
    """Logits hidden @ W.T + bias with W = the case's logits (one-hot hidden states pick a row each);
    -inf entries come from the bias, as a masked vocabulary would."""
    z, y = adversarial(case), labels()
    bias = torch.where(torch.isinf(z[0, 0]), -math.inf, 0.0) if case == "masked" else None
    table = z.reshape(-1, V).nan_to_num(neginf=0.0)  # [rows, V]; -inf moved into the bias
    hidden = torch.eye(table.size(0)).reshape(*z.shape[:2], -1)
    if case == "masked":
        table[2, 3:] = 0.0  # masked only through the bias here: every row shares it
    hidden, weight, bias, y = to_device(hidden, table.T.contiguous(), bias, y, dtype=dtype)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight)]
    out = fused_linear_eaft_loss(*leaves, y, bias=bias, topk=None)
    out.loss.backward()
    want, d_hidden, d_weight, _, count = reference_linear(hidden, weight, bias, y, topk=None)
    assert int(out.stats.tokens) == count
    rel = 1e-4 if case == "huge" else 1e-5
    assert out.loss.item() == pytest.approx(want, rel=rel, abs=1e-6)
    grad_tol = tol(dtype, 1e-4 if case != "huge" else 5e-4, 1e-5)
    torch.testing.assert_close(leaves[1].grad.cpu().double(), d_weight, **grad_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_scores_edge_rows(dtype):
    """logsumexp as torch's (row blocks may sum in another order across threads: close, not bitwise);
    rows of all -inf or with a +inf have no entropy (NaN: check_finite names them), the rest are exact."""
    g = torch.Generator().manual_seed(0)
    for rows, vocab, scale in [(1, 7, 1.0), (5, 1000, 8.0), (3, 151936, 3.0), (70, 4099, 30.0)]:
        z = to_device(torch.randn(rows, vocab, generator=g) * scale, dtype=dtype)
        z[0, :] = -math.inf
        if rows > 2:
            z[1, 3] = math.inf
            z[2, ::2] = -math.inf
        lse, h = exact_scores(z)
        torch.testing.assert_close(lse, torch.logsumexp(z, -1), rtol=1e-6, atol=0)
        assert bool(h[0].isnan()) and (rows <= 2 or bool(h[1].isnan()))
        ok = slice(2, None) if rows > 2 else slice(1, None)
        torch.testing.assert_close(h[ok].cpu().double(), entropy64(z[ok]), rtol=1e-5, atol=1e-6)
