"""Tiny random-init float64 models of many families and the dense EAFT reference on their own logits
(shared by tests/models/test_families.py and test_reader.py)."""

import pytest
import torch

from eaft_plugins import eaft_loss

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



def assert_same(fused_model, dense_model, fused_loss, want):
    """Equal to float64 rounding; to fp32 rounding where the family casts its logits to fp32 (Mamba's
    `.float()`: the dense loss is fp32 then, while the fused op keeps the float64 of the hidden states)."""
    f32 = want.dtype == torch.float32
    torch.testing.assert_close(fused_loss, want.to(fused_loss.dtype), rtol=1e-6 if f32 else 1e-10, atol=1e-12)
    got, ref = grads(fused_model), grads(dense_model)
    assert got.keys() == ref.keys() and len(got) > 4
    for name in ref:
        atol = 1e-5 * float(ref[name].abs().max()) if f32 else 1e-12
        torch.testing.assert_close(got[name], ref[name], rtol=1e-5 if f32 else 1e-8, atol=atol,
                                   msg=lambda m: f"{name}: {m}")

