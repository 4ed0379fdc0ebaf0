"""A tiny float64 model of any causal LM family, and the check that fused EAFT reproduces its dense loss.

`tiny_model(cls)` shrinks the family's default config (hidden size, layers, heads, experts, vocabulary, state
sizes: whatever names of TINY its config has) and runs its own forward once; `NotExercised` says which step
failed where no tiny version builds generically. `compare(model, batch)` checks that the fused loss and every
parameter's gradient equal `eaft_loss` on the unpatched model's own logits plus the router loss its own loss
adds (models/families.py runs both over every family).
"""

from __future__ import annotations

import copy
import inspect

VOCAB = 96
LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
# Config attributes a tiny model sets where the family's config has them (by any of these names).
TINY = {
    "vocab_size": VOCAB,
    ("vocab_size_per_layer_input",): VOCAB,
    ("hidden_size", "n_embd", "d_model"): 32,
    ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"): 64,
    LAYERS: 2,
    ("num_attention_heads", "n_head", "num_heads"): 4,
    ("num_key_value_heads", "num_kv_heads"): 2,
    ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "hidden_size_per_layer_input"): 8,
    ("global_head_dim", "qk_head_dim", "kv_lora_rank", "q_lora_rank"): 16,
    "rotary_dim": 4,
    ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "zero_expert_num"): 4,
    ("num_experts_per_tok", "moe_topk", "moe_k", "top_k"): 2,
    ("n_group", "topk_group", "n_shared_experts", "first_k_dense_replace"): 1,  # layer 2 is a MoE layer
    ("moe_intermediate_size", "shared_expert_intermediate_size", "moe_shared_expert_intermediate_size",
     "shared_intermediate_size", "expert_intermediate_size", "expert_ffn_hidden_size"): 16,
    # state-space layers: heads * head size == expand * hidden size
    ("state_size", "mamba_d_state", "ssm_state_size"): 4,
    ("mamba_n_heads", "mamba_num_heads"): 4,
    ("mamba_d_head", "mamba_head_dim"): 16,
    "mamba_d_ssm": 64,
    ("n_groups", "mamba_n_groups"): 1,
    ("linear_num_key_heads", "linear_num_value_heads"): 2,  # linear-attention layers (Qwen3-Next)
    ("linear_key_head_dim", "linear_value_head_dim"): 8,
    ("chunk_size", "mamba_chunk_size"): 8,
    "expand": 1,
    ("max_position_embeddings", "n_positions", "n_ctx", "keep_window_size"): 64,
    "output_router_logits": True,  # the router loss is part of what is checked
}
MAX_PARAMS = 4_000_000  # a tiny model above this keeps sizes TINY does not know (it is not run)


class NotExercised(Exception):
    """No tiny version of the family builds and runs its own forward generically (the message says why)."""


def tiny_model(cls):
    """A float64 random-init model of `cls` shrunk by TINY, and a batch its own forward runs on (dense, with
    labels). Where that fails: with 4, 8, then the default number of layers (hybrid families place their layer
    kinds by index), each also without the router logits; NotExercised with the first failure otherwise."""
    base = cls.config_class().to_dict()  # its fields, not properties such as Falcon's head_dim
    tiny = {}
    for names, value in TINY.items():
        tiny.update({key: value for key in ((names,) if isinstance(names, str) else names) if key in base})
    for key in ("num_key_value_heads", "num_kv_heads"):  # multi-head where the default is (MLA needs it)
        if key in tiny and base[key] == base.get("num_attention_heads"):
            tiny[key] = TINY[("num_attention_heads", "n_head", "num_heads")]
    for key, value in (("pad_token_id", 0), ("bos_token_id", 1), ("eos_token_id", 2)):  # inside the vocabulary
        if isinstance(base.get(key), int):
            tiny[key] = value
    first, tried = None, []
    for layers in (2, 4, 8, None):
        for router in (True, False):
            overrides = {k: v for k, v in tiny.items() if k not in LAYERS and (router or k != "output_router_logits")}
            overrides.update({k: layers for k in LAYERS if k in tiny and layers})
            if overrides in tried:  # a family without layer counts or router logits: nothing new to try
                continue
            tried.append(overrides)
            try:
                return _build_and_run(cls, overrides)
            except NotExercised as exc:
                first = first or exc
    raise first


def _build_and_run(cls, overrides: dict):
    import torch

    try:
        config = cls.config_class(**overrides, experts_implementation="eager")  # grouped_mm has no float64
    except Exception as exc:  # noqa: BLE001
        raise NotExercised(f"the tiny config does not build ({short_error(exc)})") from None
    try:
        with torch.device("meta"):
            probe = cls(config)
        size = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    except Exception as exc:  # noqa: BLE001
        raise NotExercised(f"the tiny model does not build ({short_error(exc)})") from None
    if size > MAX_PARAMS:
        raise NotExercised(f"the shrunk config still has {size / 1e6:.0f}M parameters (sizes the sweep does not "
                           f"know how to shrink)")
    try:
        torch.manual_seed(0)
        model = cls(config).double()
    except Exception as exc:  # noqa: BLE001
        raise NotExercised(f"the tiny model does not build ({short_error(exc)})") from None
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # prompt
    labels[-1, 9:] = -100  # padding
    batch = {"input_ids": ids, "labels": labels}
    if "attention_mask" in inspect.signature(model.forward).parameters:
        mask = torch.ones_like(ids)
        mask[-1, 9:] = 0
        batch["attention_mask"] = mask
    try:
        with torch.no_grad():
            torch.manual_seed(1)
            out = model(**batch)
        assert out.logits.shape[-1] >= VOCAB and out.loss is not None, "no logits or no loss"
    except Exception as exc:  # noqa: BLE001
        raise NotExercised(f"the tiny model's own forward fails ({short_error(exc)})") from None
    return model, batch


def compare(dense_model, batch) -> None:
    """Fused loss and gradients == eaft_loss on the dense model's own logits + the router loss its own loss adds."""
    import torch

    from ..ops.dense import eaft_loss
    from .patch import patch_model_for_fused_eaft
    from .reader import router_aux_coef

    fused_model = copy.deepcopy(dense_model)
    torch.manual_seed(1)  # dropout: both forwards draw the same masks
    out = dense_model(**batch)
    coef, aux = router_aux_coef(dense_model), out.get("aux_loss")
    router = coef * torch.as_tensor(aux, dtype=torch.float64) if coef is not None and aux is not None else 0.0
    # The family's own loss is its cross-entropy plus exactly that (to the fp32 rounding of its loss).
    ce = dense_model.loss_function(logits=out.logits, labels=batch["labels"], vocab_size=out.logits.shape[-1])
    torch.testing.assert_close((out.loss - ce).detach().double(), torch.as_tensor(router, dtype=torch.float64).detach(),
                               rtol=0, atol=1e-6 * float(out.loss.detach().abs()),
                               msg=lambda m: f"the family's own loss adds more than its router loss: {m}")
    want = eaft_loss(out.logits, batch["labels"]).loss + router
    want.backward()
    patch_model_for_fused_eaft(fused_model, chunk_size=5)
    torch.manual_seed(1)
    got = fused_model(**batch).loss
    got.backward()
    f32 = out.logits.dtype == torch.float32  # the family casts its logits to fp32 (Mamba's `.float()`)
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6 if f32 else 1e-9, atol=1e-12)
    ref = {n: p.grad for n, p in dense_model.named_parameters() if p.grad is not None}
    new = {n: p.grad for n, p in fused_model.named_parameters() if p.grad is not None}
    assert new.keys() == ref.keys() and ref, f"gradients for {sorted(set(ref) ^ set(new))[:4]}"
    scale = max(float(g.abs().max()) for g in ref.values())  # some are zero in exact arithmetic (a key bias's)
    for name, grad in ref.items():
        torch.testing.assert_close(new[name], grad, rtol=1e-5 if f32 else 1e-7, atol=(1e-5 if f32 else 1e-10) * scale,
                                   msg=lambda m: f"gradient of {name}: {m}")


def short_error(exc: BaseException) -> str:
    """One line: the exception type and the start of its message."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:160]}"
