"""Fused EAFT on tiny random-init models of many families, against the dense EAFT loss on each model's own logits.

Float64 on the CPU: the fused loss and every parameter's gradient equal `eaft_loss(model(...).logits, labels)`
(plus the family's `router_aux_loss_coef * aux_loss` for MoE models), to rounding, for the soft and hard gate,
LoRA on the decoder, and `keep_logits` evaluation. Also what is refused, and with which message.
"""

import copy

import pytest
import torch

from eaft_plugins import eaft_loss
from eaft_plugins.ops.fused import LogitTransform, fused_linear_eaft_loss
from eaft_plugins.models import describe_model, patch_model_for_fused_eaft, router_aux_coef

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0)
MOE = dict(experts_implementation="eager", output_router_logits=True, router_aux_loss_coef=0.25, num_experts_per_tok=2)
# family -> (config class, model class, config overrides, the transform the forward applies)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, ("none", 1.0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, ("none", 1.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, ("none", 1.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, ("none", 1.0)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, num_experts=4, moe_intermediate_size=16),
                  ("none", 1.0)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(MOE, num_local_experts=4), ("none", 1.0)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(final_logit_softcapping=2.0), ("softcap", 2.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(final_logit_softcapping=3.0), ("softcap", 3.0)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", {}, ("none", 1.0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, ("none", 1.0)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.5), ("scale", 0.5)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0), ("divide", 4.0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, ("none", 1.0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",  # a tied head; dropout off, as the other families have it
             dict(n_inner=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), ("none", 1.0)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}, ("none", 1.0)),  # head named embed_out
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(MOE, num_local_experts=4, logits_scaling=2.0),
                   ("divide", 2.0)),
}
GATES = ("soft", "hard")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls: thread start-up costs far more than the work (50x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family):
    import transformers

    config_cls, model_cls, extra, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).double()
    with torch.no_grad():  # logits of a few units, so the soft-cap bends and the gates see varied entropies
        model.get_output_embeddings().weight.normal_(0, 0.6)
    return model


def batch(b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[-1, t - 3:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[-1, t - 3:] = 0
    return ids, mask, labels


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def dense_loss(model, ids, mask, labels, options):
    """EAFT on the unpatched model's own logits, plus the router loss the family's forward adds."""
    out = model(input_ids=ids, attention_mask=mask)
    loss = eaft_loss(out.logits, labels, **options).loss
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + model.config.router_aux_loss_coef * out.aux_loss
    return loss


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


def assert_same(fused_model, dense_model, fused_loss, want):
    torch.testing.assert_close(fused_loss, want, rtol=1e-10, atol=1e-12)
    got, ref = grads(fused_model), grads(dense_model)
    assert got.keys() == ref.keys() and len(got) > 4
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-8, atol=1e-12, msg=lambda m: f"{name}: {m}")


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


# ---- refused, with the reason


def _llama_subclass(name, body):
    """A LlamaForCausalLM whose forward ends with `body` after the head (source written to a module file)."""
    import importlib.util
    import pathlib
    import sys
    import tempfile

    source = f'''
import torch
from transformers import LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast


class {name}(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, labels=None, logits_to_keep=0, **kwargs):
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states)
{body}
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
'''
    path = pathlib.Path(tempfile.mkdtemp()) / f"{name.lower()}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # inspect finds a class's source through its module
    spec.loader.exec_module(module)
    return getattr(module, name)


@pytest.mark.parametrize("name, body, match", [
    ("ClampLM", "        logits = logits.clamp(-5, 5)", r"applies something to the logits .*: `logits.clamp\(-5, 5\)`"),
    ("ZLossLM", "        z_loss = logits.logsumexp(-1).pow(2).mean()", r"a value depends on the logits or labels: `logits.logsumexp"),
    ("CapThenScaleLM", "        logits = torch.tanh(logits / 2.0) * 2.0\n        logits = logits * 3.0",
     r"logit transform \[\('div', 2.0\), \('tanh', None\), \('mul', 2.0\), \('mul', 3.0\)\]"),
])
def test_unknown_logit_code_is_refused_naming_it(name, body, match):
    import transformers

    cls = _llama_subclass(name, body)
    model = cls(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match=match):
        patch_model_for_fused_eaft(model)
    assert "forward" not in model.__dict__  # nothing patched


def test_a_loss_term_beyond_cross_entropy_is_refused():
    """Bamba's z-loss: allowed while its coefficient is 0 (the `if` is read for this model), refused otherwise."""
    import transformers

    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
               attn_layer_indices=[0])
    with torch.device("meta"):
        plain = transformers.BambaForCausalLM(transformers.BambaConfig(**cfg))
        zloss = transformers.BambaForCausalLM(transformers.BambaConfig(**cfg, z_loss_coefficient=1e-4))
    assert describe_model(plain).transform.kind == "none"
    with pytest.raises(ValueError, match=r"its loss is not only the causal LM loss .*z_loss"):
        describe_model(zloss)


def test_denied_families_are_refused_with_the_reason():
    import transformers

    bart = transformers.BartForCausalLM(transformers.BartConfig(vocab_size=VOCAB, d_model=16, decoder_layers=1,
                                                                encoder_layers=1, decoder_attention_heads=2,
                                                                encoder_attention_heads=2, decoder_ffn_dim=16,
                                                                encoder_ffn_dim=16))
    with pytest.raises(ValueError, match="fused EAFT does not support BartForCausalLM: the decoder of an encoder-decoder"):
        patch_model_for_fused_eaft(bart)


def test_the_family_forward_is_read_from_source_not_from_a_later_class_patch(monkeypatch):
    """Liger-style class patches replace `forward`; the fused path keeps running the family's own code."""
    import transformers

    model = tiny("gemma2")
    ids, mask, labels = batch()
    with torch.no_grad():
        want = dense_loss(model, ids, mask, labels, {})
    monkeypatch.setattr(transformers.Gemma2ForCausalLM, "forward", lambda self, *a, **k: 1 / 0)
    patch_model_for_fused_eaft(model)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)


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


def test_the_supported_families_table_in_the_docs_is_what_the_discovery_finds():
    import pathlib
    import re

    import transformers

    if transformers.__version__ != "5.6.0":
        pytest.skip(f"SKIPPED: docs/performance.md's table is generated with transformers 5.6.0, this is "
                    f"{transformers.__version__}")
    from eaft_plugins.models.families import families_table

    page = pathlib.Path(__file__).resolve().parents[2] / "docs" / "performance.md"
    shown = re.search(r"<!-- families table -->\n(.*?)\n<!-- end of families table -->", page.read_text(), re.S)
    assert shown is not None, "docs/performance.md lost its families table markers"
    assert shown.group(1) == families_table(), (
        'regenerate: python -c "from eaft_plugins.models.families import families_table; print(families_table())"')
    rows = {line.split("`")[1]: line for line in shown.group(1).splitlines()[2:]}
    for _, model_cls, _, _ in FAMILIES.values():  # every family tested above is a "supported" row
        assert rows[model_cls].endswith("| supported |"), model_cls
