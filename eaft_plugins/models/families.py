"""The supported-families table of docs/performance.md (checked against this code by a test)."""

from __future__ import annotations

import torch

from .reader import describe_model


TABLE_FAMILIES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "MixtralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Glm4ForCausalLM", "Phi3ForCausalLM",
    "CohereForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM", "Olmo2ForCausalLM", "GPT2LMHeadModel",
    "GPTNeoXForCausalLM", "MambaForCausalLM", "BartForCausalLM", "Gemma3ForConditionalGeneration",
)


def families_table(names=TABLE_FAMILIES) -> str:
    """Markdown rows: what the discovery finds for each family's default config (models built on the meta device)."""
    import transformers

    lines = ["| family | logit transform (default config) | MoE router loss | fused EAFT |", "|---|---|---|---|"]
    for name in names:
        cls = getattr(transformers, name)
        with torch.device("meta"):
            model = cls(cls.config_class())
        try:
            plan = describe_model(model)
        except ValueError as exc:
            why = str(exc).split(": ", 1)[-1] if "does not support" in str(exc) else str(exc).split("forward: ", 1)[-1]
            lines.append(f"| `{name}` | | | refused: {why} |")
            continue
        aux = f"`{plan.aux_coef} * aux_loss`" if plan.aux_coef else "none"
        lines.append(f"| `{name}` | {plan.transform} | {aux} | supported |")
    return "\n".join(lines)
