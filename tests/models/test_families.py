"""Fused EAFT on tiny random-init models of many families, against the dense EAFT loss on each model's own logits.

Float64 on the CPU: the fused loss and every parameter's gradient equal `eaft_loss(model(...).logits, labels)`
(plus the family's `router_aux_loss_coef * aux_loss` for MoE models), to rounding, for the soft and hard gate,
LoRA on the decoder, and `keep_logits` evaluation. What is refused: tests/models/test_reader.py.
"""

import copy

import pytest
import torch

from eaft_plugins import eaft_loss
from eaft_plugins.ops.fused import LogitTransform, fused_linear_eaft_loss
from eaft_plugins.models import patch_model_for_fused_eaft, router_aux_coef

from tiny_models import FAMILIES, VOCAB, assert_same, batch, dense_loss, grads, one_thread, tiny  # noqa: F401 (fixture)

GATES = ("soft", "hard")


def gate_options(gate, model, ids, mask, labels):
    """Hard gate: h_min at the median normalised entropy (p_min 1), so it drops about half the tokens."""
    if gate == "soft":
        return {}
    from eaft_plugins.ops.entropy import topk_entropy
    from eaft_plugins.options import make_options

    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    z = logits[:, :-1][labels[:, 1:] != -100]
    h = topk_entropy(z, 20) / make_options().entropy_divisor(VOCAB)
    return dict(gate="hard", h_min=float(h.median()) + 1e-12, p_min=1.0)



@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fused_loss_and_every_gradient_equal_dense(family, gate):
    dense_model = tiny(family)
    fused_model = copy.deepcopy(dense_model)
    ids, mask, labels = batch()
    options = gate_options(gate, dense_model, ids, mask, labels)
    want = dense_loss(dense_model, ids, mask, labels, options)
    want.backward()
    handle = patch_model_for_fused_eaft(fused_model, options, chunk_size=5)
    assert (handle.plan.transform.kind, handle.plan.transform.value) == FAMILIES[family][3]
    out = fused_model(input_ids=ids, attention_mask=mask, labels=labels)
    stats = out.eaft_stats
    assert out.logits is None and stats.tokens == int((labels[:, 1:] != -100).sum())
    if gate == "hard":  # the gate drops some tokens and keeps others
        assert 0 < float(stats.weight_sum) < float(stats.tokens)
    out.loss.backward()
    assert_same(fused_model, dense_model, out.loss, want)


# Not GraniteMoe: in transformers 5.6 its decoder returns no router logits, so its aux_loss is a plain 0.
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_router_loss_is_added_exactly_as_the_family_forward_adds_it(family):
    """The reference's `coef * aux_loss` is what the family's own forward adds to its cross-entropy."""
    model = tiny(family)
    ids, mask, labels = batch()
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels)
        ce = torch.nn.functional.cross_entropy(own.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    assert own.aux_loss is not None and float(own.aux_loss) > 0
    assert router_aux_coef(model) == model.config.router_aux_loss_coef
    # transformers' loss function computes the cross-entropy in fp32
    torch.testing.assert_close(own.loss.double(), ce + router_aux_coef(model) * own.aux_loss, rtol=1e-6, atol=0)
    handle = patch_model_for_fused_eaft(model)
    with torch.no_grad():
        fused = model(input_ids=ids, attention_mask=mask, labels=labels)
        handle.add_aux_loss = False  # a framework that adds the router loss itself
        bare = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(fused.loss - bare.loss, router_aux_coef(model) * fused.aux_loss)


@pytest.mark.parametrize("family", ["gemma2", "qwen3_moe", "cohere", "glm4"])
def test_lora_on_the_decoder(family):
    peft = pytest.importorskip("peft", reason="SKIPPED: peft is not installed")
    config = peft.LoraConfig(target_modules="all-linear", r=2, init_lora_weights=False)
    dense_model = peft.get_peft_model(tiny(family), config)
    fused_model = copy.deepcopy(dense_model)
    ids, mask, labels = batch(seed=1)
    want = dense_loss(dense_model, ids, mask, labels, {})
    want.backward()
    handle = patch_model_for_fused_eaft(fused_model)
    assert handle.model is fused_model.get_base_model()
    out = fused_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert all(".lora_" in n for n in grads(fused_model))
    assert_same(fused_model, dense_model, out.loss, want)


@pytest.mark.parametrize("family", ["gemma2", "granite", "mixtral"])
def test_keep_logits_in_evaluation(family):
    model = tiny(family)
    ids, mask, labels = batch(seed=2)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        want = dense_loss(model, ids, mask, labels, {})
        patch_model_for_fused_eaft(model, keep_logits=True)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=0)  # the family's own (transformed) logits
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)  # with a gradient: no logits
    assert out.logits is None


@pytest.mark.parametrize("transform", [LogitTransform("scale", 0.3), LogitTransform("divide", 2.5),
                                       LogitTransform("softcap", 1.5)])
@pytest.mark.parametrize("gate", ["soft", "shuffle"])  # shuffle: the two-pass path recomputes the logits
def test_op_transform_gradients(transform, gate):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[0, :2] = -100

    def fused(h, w, b):
        return fused_linear_eaft_loss(h, w, labels, bias=b, logit_transform=transform, chunk_size=3, gate=gate,
                                      topk=5, generator=torch.Generator().manual_seed(1)).loss

    def dense(h, w, b):
        return eaft_loss(transform(torch.nn.functional.linear(h, w, b)), labels, gate=gate, topk=5,
                         generator=torch.Generator().manual_seed(1)).loss

    torch.testing.assert_close(fused(hidden, weight, bias), dense(hidden, weight, bias), rtol=1e-12, atol=0)
    got = torch.autograd.grad(fused(hidden, weight, bias), (hidden, weight, bias))
    want = torch.autograd.grad(dense(hidden, weight, bias), (hidden, weight, bias))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_bad_transform_is_refused():
    with pytest.raises(ValueError, match=r"kind must be one of \('none', 'scale', 'divide', 'softcap'\), got 'clip'"):
        LogitTransform("clip", 1.0)
    with pytest.raises(ValueError, match="'softcap' needs a positive constant, got -1"):
        LogitTransform("softcap", -1.0)


def test_dense_path_adds_the_router_loss_the_trainer_would_drop():
    """HF Trainer with compute_loss_func never adds coef * aux_loss: EAFTRun.dense_loss does, from the outputs
    (LLaMA-Factory, with_eaft), unless the framework adds it itself (router_aux False: ms-swift, TRL)."""
    from eaft_plugins.options import EAFTConfig
    from eaft_plugins.run import EAFTRun

    model = tiny("qwen3_moe")
    ids, mask, labels = batch()
    run = EAFTRun(EAFTConfig())
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)  # no labels, as Trainer calls it before compute_loss_func
        got = run.dense_loss(out.logits, labels, training=True, step=0, outputs=out, model=model)
        want = dense_loss(model, ids, mask, labels, {})
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        run.router_aux = False
        bare = run.dense_loss(out.logits, labels, training=True, step=0, outputs=out, model=model)
        torch.testing.assert_close(got - bare, 0.25 * out.aux_loss)
        run.router_aux = True
        run.patch_fused(model)
        fused = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(fused.loss, want, rtol=1e-10, atol=1e-12)


def test_every_family_tested_here_is_verified_by_the_stored_sweep():
    """The docs table is built from the stored sweeps (tests/models/test_sweep.py keeps them current)."""
    import json

    import transformers

    from eaft_plugins.models.families import VERIFIED, record_path

    path = record_path(transformers.__version__)
    assert path.is_file(), (f"no stored sweep for transformers {transformers.__version__}: run "
                            f"`python -m eaft_plugins.models.families --write`")
    stored = json.loads(path.read_text())["families"]
    for _, model_cls, _, _ in FAMILIES.values():
        assert stored[model_cls]["status"] == VERIFIED, model_cls
