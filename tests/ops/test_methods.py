"""SFT-KL, FLOW and TALR (the EAFT paper's math-table baselines): the dense ops and the fused path against float64
references written from the papers' formulas (tests/reference.py), on the test device."""

import math

import pytest
import torch
import torch.nn.functional as F

from eaft_plugins.ops.flow import flow_loss, flow_weights, sequence_losses
from eaft_plugins.ops.fused import fused_linear_loss
from eaft_plugins.ops.sft_kl import sft_kl_loss
from eaft_plugins.ops.talr import talr_loss
from eaft_plugins.options import FLOWOptions, TALROptions, config_from_keys
from reference import (DEVICE, DTYPES, IGNORE, reference_flow, reference_sft_kl, reference_talr, to_device, tol)


def make_batch(b=3, t=9, v=40, masked=3, seed=0, dtype=torch.float32, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g) * scale
    ref = logits + torch.randn(b, t, v, generator=g)  # a starting model near the model
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :masked] = IGNORE
    labels[-1, t // 2: t // 2 + 2] = IGNORE  # supervised rows are not one contiguous run
    return to_device(logits, ref, labels, dtype=dtype)


START_LOSSES = torch.tensor([2.5, 0.7, 4.0], dtype=torch.float64)  # FLOW: the three rows' starting losses


def grad_of(op, logits, *args, **kw):
    x = logits.clone().requires_grad_()
    out = op(x, *args, **kw)
    out.loss.backward()
    return out, x.grad


def check(out, grad, want, want_grad, dtype):
    assert out.loss.item() == pytest.approx(want, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(grad.cpu().double(), want_grad, **tol(dtype, 1e-4, 1e-7))


# ---- SFT-KL: CE + beta * KL(start || model) (forward) or KL(model || start) (reverse)

SFT_KL_CASES = [{}, {"direction": "reverse"}, {"beta": 0.0}, {"beta": 2.0, "direction": "reverse"},
                {"beta": 0.1, "num_items": 50}, {"direction": "reverse", "num_items": 7}]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SFT_KL_CASES)
def test_sft_kl_matches_reference(case, dtype):
    logits, ref, labels = make_batch(dtype=dtype)
    kw = {k: v for k, v in case.items() if k != "num_items"}
    out, grad = grad_of(sft_kl_loss, logits, labels, ref, num_items_in_batch=case.get("num_items"), **kw)
    want, want_grad = reference_sft_kl(logits, labels, ref, **case)
    check(out, grad, want, want_grad, dtype)
    want_kl = reference_sft_kl(logits, labels, ref, beta=1.0, direction=case.get("direction", "forward"))[0] - \
        reference_sft_kl(logits, labels, ref, beta=0.0)[0]
    assert out.stats.means("sft_kl/")["sft_kl/kl"] == pytest.approx(want_kl, rel=1e-5)


def test_sft_kl_is_ce_when_the_model_is_the_starting_model():
    logits, _, labels = make_batch()
    out = sft_kl_loss(logits, labels, logits.clone(), beta=3.0)
    assert float(out.stats.kl_sum) == pytest.approx(0.0, abs=1e-5)
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits[:, :-1].reshape(-1, 40), labels[:, 1:].reshape(-1),
                                                            ignore_index=IGNORE).item(), rel=1e-6)


# ---- FLOW: w_i = exp(-L_i / tau) per example, tau the median starting loss unless given


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [{}, {"tau": 0.5}, {"tau": 3.0, "num_items": 50}])
def test_flow_matches_reference(case, dtype):
    logits, _, labels = make_batch(dtype=dtype)
    weights, tau = flow_weights(START_LOSSES, case.get("tau"))
    out, grad = grad_of(flow_loss, logits, labels, weights, num_items_in_batch=case.get("num_items"))
    want, want_grad, want_weights = reference_flow(logits, labels, START_LOSSES, **case)
    assert weights.tolist() == pytest.approx(want_weights, rel=1e-12)
    assert tau == (2.5 if "tau" not in case else case["tau"])  # the median of 2.5, 0.7, 4.0
    check(out, grad, want, want_grad, dtype)


def test_flow_median_of_an_even_count_is_the_mean_of_the_middle_two():
    _, tau = flow_weights(torch.tensor([1.0, 4.0, 2.0, 3.0]))
    assert tau == 2.5


def test_flow_starting_losses_are_each_rows_mean_ce():
    logits, _, labels = make_batch()
    got = sequence_losses(logits, labels)
    for b in range(labels.shape[0]):
        keep = labels[b, 1:] != IGNORE
        want = F.cross_entropy(logits[b, :-1][keep].double(), labels[b, 1:][keep])
        assert got[b].item() == pytest.approx(want.item(), rel=1e-6)
    labels[1] = IGNORE
    assert math.isnan(sequence_losses(logits, labels)[1].item())  # a row that teaches nothing has no loss


def test_flow_refuses_bad_sample_weights():
    logits, _, labels = make_batch()
    with pytest.raises(ValueError, match="3 rows"):
        flow_loss(logits, labels, torch.ones(2))
    with pytest.raises(ValueError, match="finite and >= 0"):
        flow_loss(logits, labels, torch.tensor([1.0, -1.0, 1.0]))


# ---- TALR: w_t = max(p_t ** (1 / tau), min_weight), detached


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [{}, {"tau": 0.5}, {"tau": 2.0, "min_weight": 0.3}, {"min_weight": 0.0},
                                  {"tau": 1.0, "num_items": 50}])
def test_talr_matches_reference(case, dtype):
    logits, _, labels = make_batch(dtype=dtype)
    kw = {k: v for k, v in case.items() if k != "num_items"}
    out, grad = grad_of(talr_loss, logits, labels, num_items_in_batch=case.get("num_items"), **kw)
    want, want_grad, tau = reference_talr(logits, labels, **case)
    check(out, grad, want, want_grad, dtype)
    assert out.stats.means("talr/")["talr/tau"] == pytest.approx(tau, rel=1e-6)  # fp32 CEs


def test_talr_floor_binds():
    logits, _, labels = make_batch()
    out = talr_loss(logits, labels, tau=0.2, min_weight=0.25)  # every p ** 5 is below 0.25 here: all floored
    assert float(out.stats.weight_sum) == pytest.approx(0.25 * float(out.stats.tokens))
    low = talr_loss(logits, labels, tau=0.2, min_weight=0.0)
    assert 0 < float(low.stats.weight_sum) < float(out.stats.weight_sum)


# ---- what every method shares: token_scale, unshifted labels, chunking, ignore_index, an all-masked batch

METHODS = {
    "sft_kl": lambda z, ref, y, **kw: sft_kl_loss(z, y, ref, direction="reverse", **kw),
    "flow": lambda z, ref, y, **kw: flow_loss(z, y, flow_weights(START_LOSSES)[0], **kw),
    "talr": lambda z, ref, y, **kw: talr_loss(z, y, **kw),
}
REFERENCES = {
    "sft_kl": lambda z, ref, y, **kw: reference_sft_kl(z, y, ref, direction="reverse", **kw)[:2],
    "flow": lambda z, ref, y, **kw: reference_flow(z, y, START_LOSSES, **kw)[:2],
    "talr": lambda z, ref, y, **kw: reference_talr(z, y, **kw)[:2],
}


@pytest.mark.parametrize("method", METHODS)
def test_token_scale_and_unshifted_labels(method):
    logits, ref, labels = make_batch()
    scale = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE) * 2
    for shift in (True, False):
        x = logits.clone().requires_grad_()
        out = METHODS[method](x, ref, labels, token_scale=scale, shift=shift)
        out.loss.backward()
        want, want_grad = REFERENCES[method](logits, ref, labels, token_scale=scale, shift=shift)
        check(out, x.grad, want, want_grad, torch.float32)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_equals_unchunked(method, chunk):
    logits, ref, labels = make_batch()
    a, grad_a = grad_of(lambda z: METHODS[method](z, ref, labels, chunk_size=chunk), logits)
    b, grad_b = grad_of(lambda z: METHODS[method](z, ref, labels, chunk_size=10**6), logits)
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(grad_a, grad_b)
    torch.testing.assert_close(a.stats.to_vector(), b.stats.to_vector())


@pytest.mark.parametrize("method", METHODS)
def test_custom_ignore_index(method):
    logits, ref, labels = make_batch()
    other = labels.masked_fill(labels == IGNORE, 7777)
    a = METHODS[method](logits, ref, labels)
    b = METHODS[method](logits, ref, other, ignore_index=7777)
    torch.testing.assert_close(a.loss, b.loss)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_items", [None, 7])
def test_all_masked_batch_is_zero_with_graph(method, num_items):
    logits, ref, labels = make_batch()
    labels[:] = IGNORE
    out, grad = grad_of(lambda z: METHODS[method](z, ref, labels, num_items_in_batch=num_items), logits)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    assert torch.count_nonzero(grad) == 0 and torch.isfinite(grad).all()
    means = out.stats.means(f"{method}/")
    assert means[f"{method}/tokens"] == 0 and all(math.isfinite(v) for v in means.values())


# ---- the fused path (FLOW, TALR): the same loss, statistics and gradients without the logits; SFT-KL refused


def make_linear(b=3, t=9, h=12, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden, weight, bias = torch.randn(b, t, h, generator=g) * 1.5, torch.randn(v, h, generator=g), torch.randn(v, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :3] = IGNORE
    labels[-1, 4:6] = IGNORE
    return to_device(hidden, weight, bias, labels)


FUSED_CASES = [("flow", {}), ("flow", {"tau": 0.5, "num_items_in_batch": 50}),
               ("talr", {}), ("talr", {"tau": 0.7, "min_weight": 0.2}), ("talr", {"num_items_in_batch": 9})]


def _dense(method, logits, labels, kw):
    if method == "flow":
        return flow_loss(logits, labels, flow_weights(START_LOSSES, kw.pop("tau", None))[0], **kw)
    return talr_loss(logits, labels, **kw)


def _fused(method, hidden, weight, bias, labels, kw):
    extra = {"sample_weights": flow_weights(START_LOSSES, kw.pop("tau", None))[0]} if method == "flow" else {}
    return fused_linear_loss(hidden, weight, labels, bias=bias, method=method, **extra, **kw)


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("method, case", FUSED_CASES)
def test_fused_equals_dense(method, case, chunk):
    hidden, weight, bias, labels = make_linear()
    leaves_d = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    leaves_f = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    dense = _dense(method, F.linear(*leaves_d), labels, dict(case))
    fused = _fused(method, *leaves_f, labels, dict(case, chunk_size=chunk))
    dense.loss.backward()
    fused.loss.backward()
    torch.testing.assert_close(fused.loss, dense.loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fused.stats.to_vector(), dense.stats.to_vector(), rtol=1e-5, atol=1e-7)
    for a, b in zip(leaves_f, leaves_d):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["flow", "talr"])
def test_fused_all_masked_batch_is_zero_with_graph(method):
    hidden, weight, bias, labels = make_linear()
    labels[:] = IGNORE
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = _fused(method, *leaves, labels, {})
    out.loss.backward()
    assert out.loss.item() == 0.0 and all(torch.count_nonzero(x.grad) == 0 for x in leaves)


def tiny_llama(vocab=96):
    import transformers

    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)).to(DEVICE)


@pytest.mark.parametrize("method, options", [("flow", FLOWOptions()), ("talr", TALROptions(tau=0.8))])
def test_patched_model_equals_the_dense_op_on_its_own_logits(method, options):
    import copy

    from eaft_plugins.models import patch_model_for_fused_eaft

    model = tiny_llama()
    fused_model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (3, 16), generator=g).to(DEVICE)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    weights = flow_weights(START_LOSSES)[0]
    kw = {"options": options, "num_items_in_batch": 30}
    want = flow_loss(model(input_ids=ids).logits, labels, weights, **kw) if method == "flow" else \
        talr_loss(model(input_ids=ids).logits, labels, **kw)
    want.loss.backward()
    handle = patch_model_for_fused_eaft(fused_model, options, chunk_size=7, method=method)
    handle.sample_weights = weights if method == "flow" else None
    out = fused_model(input_ids=ids, labels=labels, num_items_in_batch=30)
    out.loss.backward()
    assert out.logits is None and handle.last_stats is out.eaft_stats
    assert out.loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    torch.testing.assert_close(out.eaft_stats.to_vector(), want.stats.to_vector(), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(fused_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sft_kl_has_no_fused_path():
    from eaft_plugins.models import patch_model_for_fused_eaft

    with pytest.raises(ValueError, match=r"`sft_kl_fused` True is invalid: SFT-KL has no fused path \(its KL term needs "
                                         r"the full \[tokens, vocab\] distributions.*set sft_kl_fused: false"):
        config_from_keys({"sft_kl_fused": True}, method="sft_kl")
    with pytest.raises(ValueError, match="SFT-KL has no fused path"):
        patch_model_for_fused_eaft(tiny_llama(), method="sft_kl")
    hidden, weight, bias, labels = make_linear()
    with pytest.raises(ValueError, match="SFT-KL has no fused path"):
        fused_linear_loss(hidden, weight, labels, method="sft_kl")
