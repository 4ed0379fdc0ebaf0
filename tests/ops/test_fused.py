"""The fused linear EAFT op against the dense core and the float64 reference (tests/reference.py), on the test device."""

import math

import pytest
import torch
import torch.nn.functional as F

from eaft_plugins import EAFTOptions, eaft_loss
from eaft_plugins.ops.fused import fused_linear_eaft_loss, needs_two_passes
from eaft_plugins.ops.dense import token_scores
from reference import DEVICE, DTYPES, IGNORE, OPTION_CASES, reference_linear, to_device, tol


def make_inputs(b=2, t=9, h=12, v=40, masked=3, seed=0, dtype=torch.float32, bias=True, scale=1.5):
    """Drawn on the CPU (the same values on every device), then cast and moved to DEVICE."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g) * scale
    weight = torch.randn(v, h, generator=g)
    b_ = torch.randn(v, generator=g) * 0.5 if bias else None
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :masked] = IGNORE
    labels[-1, t // 2 : t // 2 + 2] = IGNORE  # supervised rows are not one contiguous run
    return to_device(hidden, weight, b_, labels, dtype=dtype)


def run_fused(hidden, weight, bias, labels, **kw):
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    out = fused_linear_eaft_loss(leaves[0], leaves[1], labels, bias=leaves[2], **kw)
    out.loss.backward()
    return out, [x.grad if x is not None else None for x in leaves]


def run_dense(hidden, weight, bias, labels, **kw):
    leaves = [x.clone().requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    out = eaft_loss(F.linear(leaves[0], leaves[1], leaves[2]), labels, **kw)
    out.loss.backward()
    return out, [x.grad if x is not None else None for x in leaves]


def assert_same(a, b, rtol=1e-5, atol=1e-6):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a.loss, out_b.loss, rtol=rtol, atol=atol)
    torch.testing.assert_close(out_a.stats.to_vector(), out_b.stats.to_vector(), rtol=rtol, atol=atol)
    for ga, gb in zip(grads_a, grads_b):
        if ga is None or gb is None:
            assert ga is None and gb is None
        else:
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol)


FUSED_CASES = OPTION_CASES + [  # and the batch-level options the fused op takes itself
    {"num_items": 50},
    {"weight_norm": "mean"},
    {"weight_norm": "mean", "mean_weight": 0.37},
]


def _kw(case):
    kw = dict(case)
    if "num_items" in kw:
        kw["num_items_in_batch"] = kw.pop("num_items")
    return kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_equals_reference_and_dense(case, chunk, with_bias, dtype):
    hidden, weight, bias, labels = make_inputs(bias=with_bias, dtype=dtype)
    fused = run_fused(hidden, weight, bias, labels, chunk_size=chunk, **_kw(case))
    dense = run_dense(hidden, weight, bias, labels, **_kw(case))
    assert_same(fused, dense, **tol(dtype, 1e-5, 1e-6))
    loss, gh, gw, gb, count = reference_linear(hidden, weight, bias, labels, **case)
    out, (g_h, g_w, g_b) = fused
    # The reference rounds bf16 logits like the op's matmul, so only the op's own roundings remain.
    assert out.loss.item() == pytest.approx(loss, rel=1e-5 if dtype == torch.float32 else 1e-3, abs=1e-7)
    assert int(out.stats.tokens) == count
    torch.testing.assert_close(g_h.cpu().double(), gh, **tol(dtype, 1e-4, 1e-6))
    torch.testing.assert_close(g_w.cpu().double(), gw, **tol(dtype, 1e-4, 1e-6))
    if with_bias:
        torch.testing.assert_close(g_b.cpu().double(), gb, **tol(dtype, 1e-4, 1e-6))


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_token_scale_and_custom_ignore_index(chunk):
    hidden, weight, bias, labels = make_inputs(seed=3)
    scale = to_device(torch.rand(labels.shape, generator=torch.Generator().manual_seed(1)) * 2)
    labels7 = labels.masked_fill(labels == IGNORE, 7777)
    fused = run_fused(hidden, weight, bias, labels7, chunk_size=chunk, token_scale=scale, ignore_index=7777)
    dense = run_dense(hidden, weight, bias, labels7, token_scale=scale, ignore_index=7777)
    assert_same(fused, dense)
    loss, gh, *_ = reference_linear(hidden, weight, bias, labels, token_scale=scale)
    assert fused[0].loss.item() == pytest.approx(loss, rel=1e-5)
    torch.testing.assert_close(fused[1][0].cpu().double(), gh, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_shuffle_gate_matches_dense_with_the_same_generator(chunk):
    hidden, weight, bias, labels = make_inputs(b=3, t=10, seed=4)
    fused = run_fused(hidden, weight, bias, labels, chunk_size=chunk, gate="shuffle",
                      generator=torch.Generator().manual_seed(5))
    dense = run_dense(hidden, weight, bias, labels, gate="shuffle", generator=torch.Generator().manual_seed(5))
    assert_same(fused, dense)
    soft = run_fused(hidden, weight, bias, labels, chunk_size=chunk)
    assert fused[0].loss.item() != pytest.approx(soft[0].loss.item(), rel=1e-4)  # the permutation did something
    assert fused[0].stats.weight_sum.item() == pytest.approx(soft[0].stats.weight_sum.item(), rel=1e-6)


def test_two_passes_only_when_weights_need_every_token():
    assert not needs_two_passes(EAFTOptions())
    assert not needs_two_passes(EAFTOptions(gate="hard"))
    assert not needs_two_passes(EAFTOptions(weight_norm="mean"), mean_weight=0.5)
    assert needs_two_passes(EAFTOptions(weight_norm="mean"))
    assert needs_two_passes(EAFTOptions(gate="shuffle"))


def test_unshifted_flat_rows_and_stats():
    hidden, weight, bias, labels = make_inputs(b=1, t=13, seed=6)
    flat_h, flat_y = hidden.reshape(13, -1), labels.reshape(13)
    fused = run_fused(flat_h, weight, bias, flat_y, shift=False, chunk_size=3)
    dense = run_dense(flat_h, weight, bias, flat_y, shift=False)
    assert_same(fused, dense)
    shifted = run_fused(hidden, weight, bias, labels, chunk_size=3)
    assert fused[0].loss.item() != pytest.approx(shifted[0].loss.item())


def test_gradient_scales_with_the_incoming_gradient():
    hidden, weight, bias, labels = make_inputs(seed=7)
    base = run_fused(hidden, weight, bias, labels)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_eaft_loss(h, w, labels, bias=bias)
    (out.loss * 3.0 - 1.0).backward()
    torch.testing.assert_close(h.grad, 3.0 * base[1][0])
    torch.testing.assert_close(w.grad, 3.0 * base[1][1])


def test_float64_gradcheck_with_frozen_weights():
    """d loss / d (hidden, weight, bias) is the weighted-CE gradient: gradcheck with alpha=0 and weights as token_scale."""
    hidden, weight, bias, labels = make_inputs(b=1, t=6, h=4, v=9, masked=1, seed=8, dtype=torch.float64)
    sc = token_scores(F.linear(hidden, weight, bias), labels, topk=4)
    frozen = torch.zeros(labels.shape, dtype=torch.float64, device=DEVICE)
    frozen[0, sc.index + 1] = sc.weight

    def loss(h, w, b):
        return fused_linear_eaft_loss(h, w, labels, bias=b, topk=4, alpha=0.0, token_scale=frozen, chunk_size=2).loss

    args = tuple(x.clone().requires_grad_() for x in (hidden, weight, bias))
    assert torch.autograd.gradcheck(loss, args, eps=1e-6, atol=1e-6)
    got = run_fused(hidden, weight, bias, labels, topk=4, chunk_size=2)[1]
    want = run_fused(hidden, weight, bias, labels, topk=4, alpha=0.0, token_scale=frozen)[1]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_half_precision_inputs(dtype, with_bias):
    hidden, weight, bias, labels = make_inputs(b=2, t=16, h=32, v=64, dtype=dtype, bias=with_bias, seed=9)
    fused = run_fused(hidden, weight, bias, labels, chunk_size=5)
    dense = run_dense(hidden, weight, bias, labels)
    assert fused[0].loss.dtype == torch.float32
    assert all(g.dtype == dtype for g in fused[1] if g is not None)
    torch.testing.assert_close(fused[0].loss, dense[0].loss, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(fused[0].stats.to_vector(), dense[0].stats.to_vector(), rtol=2e-3, atol=2e-3)
    for a, b in zip(fused[1], dense[1]):
        if a is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-3)
    # Against the exact float64 reference on the same (rounded) inputs.
    loss, gh, gw, _, _ = reference_linear(hidden, weight, bias, labels)
    assert fused[0].loss.item() == pytest.approx(loss, rel=1e-2)
    torch.testing.assert_close(fused[1][1].cpu().double(), gw, rtol=5e-2, atol=5e-3)


def test_autocast_bf16_with_fp32_parameters():
    hidden, weight, bias, labels = make_inputs(b=2, t=16, h=32, v=64, seed=10)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        fused = run_fused(hidden, weight, bias, labels, chunk_size=6)
        dense = run_dense(hidden, weight, bias, labels)
    assert all(g.dtype == torch.float32 for g in fused[1])
    torch.testing.assert_close(fused[0].loss, dense[0].loss, rtol=1e-3, atol=1e-3)
    for a, b in zip(fused[1], dense[1]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-3)
    # The matmul really ran in bf16: the fp32 result differs by more than fp32 rounding.
    exact = run_fused(hidden, weight, bias, labels, chunk_size=6)
    assert abs(exact[0].loss.item() - fused[0].loss.item()) > 1e-6


@pytest.mark.parametrize("num_items", [None, 7])
@pytest.mark.parametrize("case", [{}, {"gate": "shuffle"}, {"weight_norm": "mean"}])
def test_all_masked_batch_is_zero_with_graph(num_items, case):
    hidden, weight, bias, labels = make_inputs()
    labels[:] = IGNORE
    out, grads = run_fused(hidden, weight, bias, labels, num_items_in_batch=num_items, **case)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    for g in grads:
        assert torch.count_nonzero(g) == 0 and torch.isfinite(g).all()
    means = out.stats.means()
    assert means["eaft/tokens"] == 0 and all(math.isfinite(x) for x in means.values())


def test_no_grad_forward_gives_the_same_loss_and_stats():
    hidden, weight, bias, labels = make_inputs(seed=12)
    with_grad = fused_linear_eaft_loss(hidden.requires_grad_(), weight, labels, bias=bias, chunk_size=3)
    with torch.no_grad():
        without = fused_linear_eaft_loss(hidden, weight, labels, bias=bias, chunk_size=3)
    assert not without.loss.requires_grad
    torch.testing.assert_close(with_grad.loss.detach(), without.loss)
    torch.testing.assert_close(with_grad.stats.to_vector(), without.stats.to_vector())


def test_retained_graph_backward_twice():
    hidden, weight, bias, labels = make_inputs(seed=13)
    h = hidden.clone().requires_grad_()
    out = fused_linear_eaft_loss(h, weight, labels)
    out.loss.backward(retain_graph=True)
    once = h.grad.clone()
    out.loss.backward(retain_graph=True)  # incoming gradient 1: the stored gradients are reused as they are
    torch.testing.assert_close(h.grad, 2 * once)
    scaled = fused_linear_eaft_loss(h, weight, labels).loss * 2.0
    scaled.backward(retain_graph=True)  # scaled in place: a second pass must fail loudly, not be wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        scaled.backward()


class _Largest(torch.utils._python_dispatch.TorchDispatchMode):
    """Largest tensor any op creates."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("case", [{}, {"weight_norm": "mean"}])
def test_never_allocates_tokens_by_vocab(case):
    hidden, weight, bias, labels = make_inputs(b=4, t=64, h=16, v=500, masked=2, dtype=torch.bfloat16)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    mode = _Largest()
    with mode:
        fused_linear_eaft_loss(h, w, labels, chunk_size=16, **case).loss.backward()
    n_sup = int((labels[:, 1:] != IGNORE).sum())
    assert n_sup * 500 > 10 * 16 * 500
    assert mode.largest <= max(16 * 500, 500 * 16, h.numel()), mode.largest  # a chunk of logits, or a gradient


def test_weight_only_or_hidden_only_gradients():
    hidden, weight, bias, labels = make_inputs(seed=14)
    dense = run_dense(hidden, weight, bias, labels)
    h = hidden.clone().requires_grad_()
    fused_linear_eaft_loss(h, weight, labels, bias=bias, chunk_size=4).loss.backward()  # frozen LM head (LoRA)
    torch.testing.assert_close(h.grad, dense[1][0])
    w = weight.clone().requires_grad_()
    fused_linear_eaft_loss(hidden, w, labels, bias=bias, chunk_size=4).loss.backward()
    torch.testing.assert_close(w.grad, dense[1][1])


BAD_OPTIONS = [
    {"topk": 1},
    {"topk": "many"},
    {"topk": 41},
    {"alpha": -0.5},
    {"alpha": float("nan")},
    {"entropy_norm": "log"},
    {"gate": "soft2"},
    {"weight_norm": "sum"},
    {"p_min": 1.5},
    {"chunk_size": 0},
    {"topk_typo": 3},
]


def _error(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("kwargs", BAD_OPTIONS)
def test_bad_options_raise_like_dense(kwargs):
    hidden, weight, bias, labels = make_inputs()
    logits = F.linear(hidden, weight, bias)
    want = _error(lambda: eaft_loss(logits, labels, **kwargs))
    assert _error(lambda: fused_linear_eaft_loss(hidden, weight, labels, bias=bias, **kwargs)) == want


@pytest.mark.parametrize("bad_label", [40, 1000, -5])
def test_labels_out_of_range_raise_like_dense(bad_label):
    hidden, weight, bias, labels = make_inputs()
    labels[1, 6] = bad_label
    want = _error(lambda: eaft_loss(F.linear(hidden, weight, bias), labels))
    assert "labels must be in [0, 40)" in want
    assert _error(lambda: fused_linear_eaft_loss(hidden, weight, labels, bias=bias)) == want


@pytest.mark.parametrize("case", [{}, {"gate": "shuffle"}])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_hidden_raise_like_dense(value, case):
    hidden, weight, bias, labels = make_inputs()
    hidden[0, 4, 3] = value  # position 4 predicts label 5: supervised
    hidden[1, 7, 0] = value
    want = _error(lambda: eaft_loss(F.linear(hidden, weight, bias), labels, **case))
    assert "NaN or inf at 2 of" in want
    assert _error(lambda: fused_linear_eaft_loss(hidden, weight, labels, bias=bias, chunk_size=3, **case)) == want


def test_shape_errors():
    hidden, weight, bias, labels = make_inputs()
    with pytest.raises(ValueError, match="does not match hidden states shape"):
        fused_linear_eaft_loss(hidden, weight, labels[:, :-1])
    with pytest.raises(ValueError, match="does not match weight shape"):
        fused_linear_eaft_loss(hidden, weight[:, :-1], labels)
    with pytest.raises(ValueError, match=r"bias shape \(39,\) must be \(40,\)"):
        fused_linear_eaft_loss(hidden, weight, labels, bias=bias[:-1])
    with pytest.raises(ValueError, match="token_scale shape"):
        fused_linear_eaft_loss(hidden, weight, labels, token_scale=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        fused_linear_eaft_loss(hidden, weight, labels, chunk_size=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsumexp_into_is_bitwise_torch_logsumexp(dtype):
    """The chunk scratch path of entropy.chunk_scores must give exactly torch.logsumexp."""
    from eaft_plugins.ops.entropy import _logsumexp_into

    g = torch.Generator().manual_seed(0)
    for rows, vocab, scale in [(1, 7, 1.0), (5, 1000, 8.0), (33, 151936, 3.0), (110, 4099, 30.0)]:
        z = to_device(torch.randn(rows, vocab, generator=g) * scale, dtype=dtype)
        z[0, :] = -math.inf  # an all -inf row
        if rows > 2:
            z[1, 3] = math.inf
        want = torch.logsumexp(z, -1)
        got = _logsumexp_into(z.clone(), torch.empty_like(z))
        assert torch.equal(got.nan_to_num(), want.nan_to_num()) and torch.equal(got.isnan(), want.isnan())
        in_place = z.clone()
        assert torch.equal(_logsumexp_into(in_place, in_place).nan_to_num(), want.nan_to_num())
