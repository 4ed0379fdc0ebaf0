"""Model family -> chat template (LLaMA-Factory and ms-swift), thinking or not, layer count.

One table for every recipe: generate.py writes the LLaMA-Factory template from it, the launchers
pass the ms-swift template from it (and the LLaMA-Factory one when the model is overridden), and
run_eval.sh decides from it whether a model thinks (served with a reasoning parser, scored on its
answer only). A model outside the table is refused with a clear error rather than trained in another
family's template.

  python recipes/common/models.py MODEL {llamafactory|swift|thinking|layers|tag} [FALLBACK_MODEL]
prints the field for MODEL (or, when MODEL is a local checkpoint whose path names no family, for
FALLBACK_MODEL: the model it was trained from). Exit 2 with a message when neither is known.
`tag` prints the name the output folders use.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

# (pattern on the model's last path component, LLaMA-Factory template, ms-swift template, thinking).
# ms-swift's own model registry uses the same templates (swift/model/models/{qwen,glm}.py);
# LLaMA-Factory's names are from llamafactory/data/template.py (0.9.5).
FAMILIES = (
    (r"qwen3-[\w.]+-thinking-2507", "qwen3", "qwen3_thinking", True),
    (r"qwen3-[\w.]+-instruct-2507", "qwen3_nothink", "qwen3_nothinking", False),
    (r"glm-z1-[\w.]+-0414", "glmz1", "glm4", True),
    (r"glm-4-[\w.]+-0414", "glm4", "glm4", False),
)
# num_hidden_layers of the README's models (their config.json), for Megatron pipeline splits.
LAYERS = {"qwen3-4b-instruct-2507": 36, "qwen3-4b-thinking-2507": 36, "glm-4-9b-0414": 40, "glm-4-32b-0414": 61}
FIELDS = ("llamafactory", "swift", "thinking", "layers", "tag")


def _name(model: str) -> str:
    return model.rstrip("/").split("/")[-1].lower()


def tag(model: str) -> str:
    """The model's name as the recipes' output folders use it (saves/<framework>/<domain>/<tag>/<method>)."""
    return model.rstrip("/").split("/")[-1]


def family(model: str) -> Optional[dict]:
    """{'llamafactory', 'swift', 'thinking'} of the model's family, or None when unknown. The last path
    component that names a family counts: a Hub id, or a recipe checkpoint saves/.../<model>/<method>[/checkpoint-N]."""
    for part in reversed(model.rstrip("/").split("/")):
        for pattern, lf, swift, thinking in FAMILIES:
            if re.fullmatch(pattern, part.lower()):
                return {"llamafactory": lf, "swift": swift, "thinking": thinking}
    return None


def layers(model: str) -> Optional[int]:
    """Decoder layers: a local checkpoint's config.json, else the table."""
    cfg = Path(model) / "config.json"
    if cfg.is_file():
        return json.loads(cfg.read_text()).get("num_hidden_layers")
    return LAYERS.get(_name(model))


def lookup(model: str, field: str, fallback: Optional[str] = None):
    """One field for MODEL, or for FALLBACK when MODEL matches no family (a local checkpoint)."""
    if field == "layers":
        return layers(model)
    if field == "tag":
        return tag(model)
    for m in (model, fallback):
        if m and family(m) is not None:
            return family(m)[field]
    known = ", ".join(p for p, *_ in FAMILIES)
    raise ValueError(f"no chat template known for model {model!r}"
                     + (f" (nor for {fallback!r})" if fallback else "")
                     + f"; known families: {known}. Add it to recipes/common/models.py, or name the "
                       "template yourself (ms-swift: -- --template T; LLaMA-Factory: -- template=T)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (2, 3) or argv[1] not in FIELDS:
        print(f"usage: models.py MODEL {{{'|'.join(FIELDS)}}} [FALLBACK_MODEL]", file=sys.stderr)
        return 2
    try:
        value = lookup(argv[0], argv[1], argv[2] if len(argv) == 3 else None)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print("" if value is None else str(value).lower() if isinstance(value, bool) else value)
    return 0


if __name__ == "__main__":
    sys.exit(main())
