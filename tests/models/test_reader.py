"""What the reader of a family's forward refuses, and with which message; what it accepts runs exactly.

Refused at patch time with a ValueError that quotes the statement, never an error inside a training step.
"""

import copy

import pytest
import torch

from eaft_plugins.models import describe_model, patch_model_for_fused_eaft
from tiny_models import COMMON, VOCAB, assert_same, batch, dense_loss, one_thread, tiny  # noqa: F401 (fixture)


def _llama_subclass(name, body="", head="self.lm_head(hidden_states)", before=""):
    """A LlamaForCausalLM whose forward runs `before`, calls `logits = {head}`, then `body` (source written to
    a module file)."""
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
{before}
        logits = {head}
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


# Mamba, Mamba2, FalconMamba, xLSTM and HunYuan v4 call their head on `hidden.to(self.lm_head.weight.dtype)`:
# the fused forward swaps the head for a stub while the family's forward runs, so the stub must answer that read.
@pytest.mark.parametrize("name, head", [
    ("WeightDtypeLM", "self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()"),
    ("KeywordDtypeLM", "self.lm_head(hidden_states[:, -hidden_states.shape[1]:].to(dtype=self.lm_head.weight.dtype))"),
])
def test_a_forward_that_reads_its_head_weight_fuses_exactly(name, head):
    import transformers

    cls = _llama_subclass(name, head=head)
    torch.manual_seed(0)
    dense_model = cls(transformers.LlamaConfig(**COMMON)).double()
    fused_model = copy.deepcopy(dense_model)
    ids, mask, labels = batch()
    want = dense_loss(dense_model, ids, mask, labels, {})
    want.backward()
    patch_model_for_fused_eaft(fused_model, chunk_size=5)
    out = fused_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_same(fused_model, dense_model, out.loss, want)


@pytest.mark.parametrize("name, before, match", [
    ("IsLinearLM", "        hidden_states = hidden_states * (2.0 if isinstance(self.lm_head, torch.nn.Linear) else 1.0)",
     r"reads its LM head `self.lm_head` other than .*: `isinstance\(self.lm_head, torch.nn.Linear\)`"),
    ("HeadBufferLM", "        hidden_states = hidden_states.to(self.lm_head.weight.dtype) * self.lm_head.training",
     r"reads its LM head `self.lm_head` other than .*: `self.lm_head.training`"),
])
def test_other_reads_of_the_head_are_refused_when_patching(name, before, match):
    """The stub answers the head's weight, bias and sizes; anything else the forward reads of its head would
    differ from the real head (or fail inside a step), so it is refused before training starts."""
    import transformers

    model = _llama_subclass(name, before=before)(transformers.LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match=match):
        patch_model_for_fused_eaft(model)


# In transformers 5.6 Mamba and FalconMamba compute their own loss (refused); Mamba2 fuses. From 5.19 all three
# call self.loss_function on `self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()`.
@pytest.mark.parametrize("family, config", [
    ("Mamba", dict(state_size=4)),
    ("Mamba2", dict(state_size=4, num_heads=4, head_dim=8, n_groups=1, expand=2, chunk_size=4)),
    ("FalconMamba", dict(state_size=4)),
])
def test_state_space_families_fuse_exactly_or_are_refused_when_patching(family, config):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, f"{family}Config")(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, **config)
    dense_model = getattr(transformers, f"{family}ForCausalLM")(cfg).double()
    fused_model = copy.deepcopy(dense_model)
    try:
        patch_model_for_fused_eaft(fused_model, chunk_size=5)
    except ValueError as exc:  # a loss of its own (transformers 5.6), never a failure inside the step below
        assert "its loss is not only the causal LM loss" in str(exc) and family != "Mamba2", exc
        return
    ids, mask, labels = batch()
    want = dense_loss(dense_model, ids, mask, labels, {})
    want.backward()
    out = fused_model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert_same(fused_model, dense_model, out.loss, want)


def test_a_head_with_a_forward_of_its_own_is_refused_when_patching():
    """Dory (transformers 5.24) scales its logits inside its LM head, an nn.Linear subclass: the fused op, which
    computes hidden @ weight.T + bias, would skip that (the family sweep found it: a different loss)."""
    import transformers

    class ScaledHead(torch.nn.Linear):
        def forward(self, hidden):
            return super().forward(hidden) * 2.0

    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON))
    model.lm_head = ScaledHead(COMMON["hidden_size"], VOCAB, bias=False)
    with pytest.raises(ValueError, match="ScaledHead has a forward of its own, which the fused op"):
        patch_model_for_fused_eaft(model)


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


