"""The dense EAFT core against the float64 per-token reference (tests/reference.py), on the test device."""

import math

import pytest
import torch
from hypothesis import given, settings
from torch.autograd.gradcheck import GradcheckError
from hypothesis import strategies as st

from eaft_plugins import EAFTOptions, eaft_loss
from eaft_plugins.ops.dense import token_scores
from reference import DEVICE, DTYPES, IGNORE, OPTION_CASES, reference_loss, to_device, tol


def reference(logits, labels, **kwargs):
    """(loss, count) of the shared float64 reference."""
    loss, _, count = reference_loss(logits, labels, **kwargs)
    return loss, count


def make_batch(b=2, t=9, v=40, masked=3, seed=0, dtype=torch.float32, scale=3.0):
    """Drawn on the CPU (the same values on every device), then cast and moved to DEVICE."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * scale
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :masked] = IGNORE
    return to_device(logits, labels, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("opts", OPTION_CASES)
def test_dense_matches_reference(opts, dtype):
    logits, labels = make_batch(dtype=dtype)
    x = logits.clone().requires_grad_()
    out = eaft_loss(x, labels, **opts)
    out.loss.backward()
    want, grad, count = reference_loss(logits, labels, **opts)
    # bf16 logits are upcast exactly: the loss is as close as in fp32, only the gradient is rounded.
    assert out.loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert int(out.stats.tokens) == count
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.cpu().double(), grad, **tol(dtype, 1e-4, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_num_items_in_batch_divides_the_sum(dtype):
    logits, labels = make_batch(dtype=dtype)
    out = eaft_loss(logits, labels, num_items_in_batch=torch.tensor(50))
    want, _ = reference(logits, labels, num_items=50)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unshifted_labels(dtype):
    logits, labels = make_batch(dtype=dtype)
    out = eaft_loss(logits, labels, shift=False)
    want, _ = reference(logits, labels, shift=False)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 7, 1000])
def test_chunked_equals_unchunked(chunk):
    logits, labels = make_batch(b=3, t=11, v=64)
    labels[1, 4:7] = IGNORE  # non-contiguous supervised rows
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    out_a = eaft_loss(a, labels, chunk_size=chunk)
    out_b = eaft_loss(b, labels, chunk_size=10**6)
    out_a.loss.backward()
    out_b.loss.backward()
    torch.testing.assert_close(out_a.loss, out_b.loss)
    torch.testing.assert_close(a.grad, b.grad)
    torch.testing.assert_close(out_a.stats.to_vector(), out_b.stats.to_vector())


def test_topk_equal_vocab_is_full_entropy_over_ln_v():
    logits, labels = make_batch(v=30)
    full = token_scores(logits, labels, topk=None)
    k_v = token_scores(logits, labels, topk=30)
    torch.testing.assert_close(full.entropy, k_v.entropy)
    row = logits.reshape(-1, 30)[full.index[0]].double()
    p = row.softmax(-1)
    exact = -(p * p.log()).sum() / math.log(30)
    assert full.entropy[0].item() == pytest.approx(exact.item(), rel=1e-5)


def test_gradient_is_weighted_ce_gradient_with_detached_weight():
    """The weight is a constant: grad = w_t (softmax - onehot) / N, checked by gradcheck in float64."""
    logits, labels = make_batch(b=2, t=6, v=12, masked=2, seed=3)
    z0 = logits.double()
    scores = token_scores(z0, labels, topk=5)
    n = scores.index.numel()

    # Frozen-weight loss: the same op with alpha=0 (weight 1) and the weights as token_scale.
    frozen = torch.zeros(labels.shape, dtype=torch.float64, device=DEVICE)
    pos = scores.index  # rows of the shifted labels; token_scale is shifted like labels
    shifted_pos = torch.stack([pos // labels.shape[1], pos % labels.shape[1] + 1])
    frozen[shifted_pos[0], shifted_pos[1]] = scores.weight

    def frozen_loss(z):
        return eaft_loss(z, labels, topk=5, alpha=0.0, token_scale=frozen).loss

    assert torch.autograd.gradcheck(frozen_loss, (z0.clone().requires_grad_(),), eps=1e-6, atol=1e-6)

    z = z0.clone().requires_grad_()
    eaft_loss(z, labels, topk=5).loss.backward()
    # Explicit formula.
    want = torch.zeros_like(z0).reshape(-1, 12)
    flat = z0.reshape(-1, 12)
    for i, row in enumerate(scores.index.tolist()):
        g = flat[row].softmax(-1)
        g[scores.labels[i]] -= 1
        want[row] = scores.weight[i] * g / n
    torch.testing.assert_close(z.grad.reshape(-1, 12), want)
    z2 = z0.clone().requires_grad_()
    frozen_loss(z2).backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_weight_is_not_differentiated():
    """The full numerical derivative (through the entropy) differs: the op really detaches it."""
    logits, labels = make_batch(b=1, t=5, v=8, masked=1, seed=5, scale=1.0)
    z = logits.double().requires_grad_()
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda x: eaft_loss(x, labels, topk=4).loss, (z,), eps=1e-6, atol=1e-7)


def test_gradient_accumulation_one_vs_four_micro_batches():
    logits, labels = make_batch(b=8, t=10, v=50, masked=2, seed=7)
    labels[5, :] = IGNORE  # one sample with nothing supervised
    total = int((labels[:, 1:] != IGNORE).sum())
    full = logits.clone().requires_grad_()
    out = eaft_loss(full, labels, num_items_in_batch=total)
    out.loss.backward()

    parts = logits.clone().requires_grad_()
    stats = None
    for sl in torch.split(torch.arange(8), 2):
        micro = eaft_loss(parts[sl], labels[sl], num_items_in_batch=total)
        micro.loss.backward()
        stats = micro.stats if stats is None else stats + micro.stats
    torch.testing.assert_close(parts.grad, full.grad)
    torch.testing.assert_close(stats.to_vector(), out.stats.to_vector())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(dtype):
    logits, labels = make_batch(dtype=dtype)
    x = logits.clone().requires_grad_()
    out = eaft_loss(x, labels)
    out.loss.backward()
    want, _ = reference(logits.float(), labels)  # same values, upcast exactly
    assert out.loss.dtype == torch.float32
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    ref = logits.float().requires_grad_()
    eaft_loss(ref, labels).loss.backward()
    torch.testing.assert_close(x.grad.float(), ref.grad, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("num_items", [None, 7])
def test_all_masked_micro_batch_is_zero_with_graph(num_items):
    logits, labels = make_batch()
    labels[:] = IGNORE
    x = logits.clone().requires_grad_()
    out = eaft_loss(x, labels, num_items_in_batch=num_items)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert torch.count_nonzero(x.grad) == 0 and torch.isfinite(x.grad).all()
    assert out.stats.means()["eaft/tokens"] == 0 and math.isfinite(out.stats.means()["eaft/weight"])


def test_stats_match_reference_quantities():
    logits, labels = make_batch(seed=11, scale=6.0)
    opts = EAFTOptions(h_min=0.5, p_min=0.3)
    out = eaft_loss(logits, labels, options=opts)
    sc = token_scores(logits, labels, options=opts)
    ce_ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 40).cpu().double(), labels[:, 1:].reshape(-1).cpu(), ignore_index=IGNORE
    )
    m = out.stats.means()
    assert m["eaft/ce"] == pytest.approx(ce_ref.item(), rel=1e-5)
    assert m["eaft/weight"] == pytest.approx(sc.weight.mean().item(), rel=1e-5)
    assert m["eaft/entropy"] == pytest.approx(sc.entropy.mean().item(), rel=1e-5)
    conflicts = sum(1 for h, c in zip(sc.entropy.tolist(), sc.ce.tolist()) if h < 0.5 and math.exp(-c) < 0.3)
    assert m["eaft/conflict_frac"] == pytest.approx(conflicts / sc.ce.numel())
    assert conflicts > 0  # the constructed batch exercises the count


def test_hard_gate_drops_only_confident_conflicts():
    logits, labels = make_batch(seed=2, scale=8.0)
    sc = token_scores(logits, labels, gate="hard", h_min=0.5, p_min=0.3)
    conflict = (sc.entropy < 0.5) & (torch.exp(-sc.ce) < 0.3)
    assert conflict.any() and (~conflict).any()
    torch.testing.assert_close(sc.weight, (~conflict).float())


def test_shuffle_gate_permutes_the_soft_weights():
    logits, labels = make_batch(b=4, t=12, seed=4)
    soft = token_scores(logits, labels).weight
    shuffled = token_scores(logits, labels, gate="shuffle", generator=torch.Generator().manual_seed(0)).weight
    torch.testing.assert_close(shuffled.sort().values, soft.sort().values)
    assert not torch.equal(shuffled, soft)


def test_weight_norm_mean_over_the_micro_batch():
    logits, labels = make_batch(b=3, seed=6)
    out = eaft_loss(logits, labels, weight_norm="mean")
    assert out.stats.means()["eaft/weight"] == pytest.approx(1.0, rel=1e-6)
    sc = token_scores(logits, labels)
    want = (sc.weight / sc.weight.mean() * sc.ce).sum() / sc.ce.numel()
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_weight_norm_with_given_mean_is_split_invariant():
    """With the trainer's estimate (mean_weight), 1 vs 4 micro-batches give the same gradient."""
    logits, labels = make_batch(b=8, t=10, v=30, seed=8)
    total = int((labels[:, 1:] != IGNORE).sum())
    mean_w = 0.37
    full = logits.clone().requires_grad_()
    eaft_loss(full, labels, weight_norm="mean", mean_weight=mean_w, num_items_in_batch=total).loss.backward()
    parts = logits.clone().requires_grad_()
    for sl in torch.split(torch.arange(8), 2):
        eaft_loss(parts[sl], labels[sl], weight_norm="mean", mean_weight=mean_w, num_items_in_batch=total).loss.backward()
    torch.testing.assert_close(parts.grad, full.grad)
    want, _ = reference(logits, labels, num_items=total)
    got = eaft_loss(logits, labels, weight_norm="mean", mean_weight=mean_w, num_items_in_batch=total).loss
    assert got.item() == pytest.approx(want / mean_w, rel=1e-5)


def test_token_scale_multiplies_each_token():
    logits, labels = make_batch()
    scale = torch.ones(labels.shape, device=DEVICE)
    scale[0, 5] = 3.0  # label position 5 is scored by logits at position 4
    base = token_scores(logits, labels)
    out = eaft_loss(logits, labels, token_scale=scale)
    w = base.weight.clone()
    w[base.index == 4] *= 3.0
    assert out.loss.item() == pytest.approx(((w * base.ce).sum() / base.ce.numel()).item(), rel=1e-5)


def test_upstream_norm_matches_llamafactory_095():
    trainer_utils = pytest.importorskip(
        "llamafactory.train.trainer_utils", reason="SKIPPED: llamafactory is not installed; cannot compare with 0.9.5"
    )
    if not hasattr(trainer_utils, "eaft_loss_func"):
        pytest.skip("SKIPPED: installed llamafactory has no eaft_loss_func (needs 0.9.5)")
    logits, labels = make_batch(v=64)
    theirs = trainer_utils.eaft_loss_func({"logits": logits}, labels)  # on the test device too
    ours = eaft_loss(logits, labels, entropy_norm="upstream").loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op's float32 outputs and any boolean-mask indexing."""

    def __init__(self):
        super().__init__()
        self.largest_fp32 = 0
        self.bool_index = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.index.Tensor and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])
        ):
            self.bool_index = True
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest_fp32 = max(self.largest_fp32, t.numel())
        return out


def test_no_full_fp32_copy_and_no_boolean_indexing():
    logits, labels = make_batch(b=4, t=64, v=500, masked=5, dtype=torch.bfloat16)
    x = logits.clone().requires_grad_()
    mode = _Allocations()
    with mode:
        out = eaft_loss(x, labels, chunk_size=16)
        out.loss.backward()
    assert not mode.bool_index
    assert mode.largest_fp32 <= 16 * 500, mode.largest_fp32  # one chunk, never [tokens, vocab]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"topk": 1}, "topk must be an integer >= 2"),
        ({"topk": 0}, "topk must be an integer >= 2"),
        ({"topk": "many"}, "topk must be an integer >= 2 or 'full'"),
        ({"topk": 41}, r"topk=41 is larger than the vocabulary \(40\)"),
        ({"alpha": -0.5}, "alpha must be >= 0"),
        ({"alpha": float("nan")}, "alpha must be a finite number"),
        ({"entropy_norm": "log"}, r"entropy_norm must be one of \['ln_k', 'upstream', 'none'\]"),
        ({"gate": "soft2"}, r"gate must be one of \['soft', 'hard', 'shuffle'\]"),
        ({"weight_norm": "sum"}, r"weight_norm must be one of \['none', 'mean'\]"),
        ({"p_min": 1.5}, r"p_min must be in \[0.0, 1.0\]"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"topk_typo": 3}, "unknown EAFT option"),
    ],
)
def test_bad_options_raise(kwargs, match):
    logits, labels = make_batch()
    with pytest.raises(ValueError, match=match):
        eaft_loss(logits, labels, **kwargs)


def test_shape_mismatch_raises():
    logits, labels = make_batch()
    with pytest.raises(ValueError, match="does not match logits shape"):
        eaft_loss(logits, labels[:, :-1])


@pytest.mark.parametrize("bad_label", [40, 1000, -5])
def test_labels_out_of_range_raise(bad_label):
    logits, labels = make_batch()
    labels[1, 6] = bad_label
    with pytest.raises(ValueError, match=r"labels must be in \[0, 40\) or ignore_index=-100; 1 label"):
        eaft_loss(logits, labels)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_raise_with_count(value):
    logits, labels = make_batch()
    logits[0, 4, 3] = value  # position 4 predicts label 5: supervised
    logits[1, 7, 0] = value
    with pytest.raises(ValueError, match="NaN or inf at 2 of"):
        eaft_loss(logits, labels)


def test_minus_inf_label_logit_is_named_as_such():
    logits, labels = make_batch()
    logits[0, 4, labels[0, 5]] = float("-inf")  # position 4 predicts label 5: probability 0
    with pytest.raises(ValueError, match=r"the label's logit is -inf at 1 of \d+ supervised tokens"):
        eaft_loss(logits, labels)
    logits[1, 7, 0] = float("nan")  # plus a real NaN: the general message
    with pytest.raises(ValueError, match="NaN or inf at 2 of"):
        eaft_loss(logits, labels)


def test_topk_full_string_means_exact_entropy():
    assert EAFTOptions(topk="full").topk is None


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(2, 8),
    v=st.integers(2, 30),
    topk=st.integers(2, 30),
    alpha=st.floats(0.0, 3.0),
    seed=st.integers(0, 10_000),
    chunk=st.integers(1, 9),
)
def test_property_dense_equals_reference(b, t, v, topk, alpha, seed, chunk):
    topk = min(topk, v)
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * 4
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = IGNORE
    logits, labels = to_device(logits, labels)
    out = eaft_loss(logits, labels, topk=topk, alpha=alpha, chunk_size=chunk)
    want, count = reference(logits, labels, topk=topk, alpha=alpha)
    assert out.loss.item() == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert int(out.stats.tokens) == count
