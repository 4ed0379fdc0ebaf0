"""Evaluation helpers shared by eaft-analyze and eaft-repro: chat rendering, batched scoring,
generation, multiple-choice ranking and bootstrap intervals (the KL drift, general-text NLL and
right-choice log-prob are eaft_plugins.retention's, shared with the live monitor).

Everything runs on CPU or GPU with a plain Hugging Face causal LM.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

IGNORE = -100


# ----------------------------------------------------------------------------- loading


def pick_device(device: Optional[str] = None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path, device: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """A causal LM in eval mode and its tokenizer (left padding, pad = eos when missing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.to(pick_device(device)).eval()
    return model, tok


def end_token(tok) -> str:
    """Text that closes an assistant turn in the chat template (the eos token)."""
    return tok.eos_token or ""


# ----------------------------------------------------------------------------- chat data


def render_prompt(tok, user: str, system: Optional[str] = None) -> str:
    """The chat-template text up to the start of the assistant's answer."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode_conversation(tok, messages: List[Dict[str, str]], cutoff: int) -> Tuple[List[int], List[int], List[Tuple[int, int]]]:
    """Token ids, labels (assistant contents + end token supervised, the rest IGNORE) and offsets.

    Supervised spans are found on the rendered text: the template's prefix up to each
    assistant turn must be a prefix of the full rendering (true for chatml-style templates).
    """
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        if not text.startswith(prefix) or not text[len(prefix):].startswith(m["content"]):
            raise ValueError("the chat template does not render assistant turns after their prefix; cannot locate the supervised tokens")
        stop = len(prefix) + len(m["content"])
        if text[stop:].startswith(end_token(tok)):
            stop += len(end_token(tok))
        spans.append((len(prefix), stop))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:cutoff], [tuple(o) for o in enc["offset_mapping"][:cutoff]]
    labels = [t if any(s < b and e > a for a, b in spans) else IGNORE for t, (s, e) in zip(ids, offsets)]
    return ids, labels, offsets


def encode_pair(tok, prompt_text: str, target_text: str, cutoff: int) -> Tuple[List[int], List[int]]:
    """Prompt (unsupervised) followed by target (supervised), truncated to cutoff tokens."""
    p = tok(prompt_text, add_special_tokens=False)["input_ids"]
    t = tok(target_text, add_special_tokens=False)["input_ids"]
    ids = (p + t)[:cutoff]
    labels = ([IGNORE] * len(p) + t)[:cutoff]
    return ids, labels


def pad_batch(seqs: Sequence[Tuple[List[int], List[int]]], pad_id: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask, labels."""
    n = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (a, b) in enumerate(seqs):
        ids[i, : len(a)] = torch.tensor(a)
        lab[i, : len(b)] = torch.tensor(b)
        mask[i, : len(a)] = 1
    return ids.to(device), mask.to(device), lab.to(device)


def chunks(seq: Sequence, size: int) -> Iterable[Tuple[int, Sequence]]:
    for start in range(0, len(seq), size):
        yield start, seq[start : start + size]


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def sequence_logprobs(model, tok, seqs: Sequence[Tuple[List[int], List[int]]], batch_size: int = 8) -> List[Tuple[float, int]]:
    """(sum of log p(label), number of supervised tokens) for each (ids, labels) sequence."""
    device = next(model.parameters()).device
    out: List[Tuple[float, int]] = []
    for _, batch in chunks(seqs, batch_size):
        ids, mask, lab = pad_batch(batch, tok.pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        y = lab[:, 1:]
        keep = y != IGNORE
        lp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        lp = torch.where(keep, lp, torch.zeros_like(lp))
        out.extend(zip(lp.sum(1).tolist(), keep.sum(1).tolist()))
    return out


@torch.no_grad()
def generate(model, tok, prompts: Sequence[str], max_new_tokens: int = 128, batch_size: int = 16,
             sample: bool = False, temperature: float = 1.0, seed: int = 0, progress: bool = False) -> List[str]:
    """Responses to already-rendered prompt texts (greedy unless sample), stopping at eos."""
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"
    torch.manual_seed(seed)
    out: List[str] = []
    steps = list(chunks(list(prompts), batch_size))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="generate", unit="batch")
    try:
        for _, batch in steps:
            enc = tok(list(batch), return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if sample else dict(do_sample=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, **kw)
            out.extend(tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    finally:
        tok.padding_side = side
    return [o.strip() for o in out]


@torch.no_grad()
def choice_logprobs(model, tok, question: str, choices: Sequence[str], cutoff: int = 512) -> List[float]:
    """Sum of log p(choice text + end token | chat prompt of the question), per choice.

    The prompt is run once and its KV cache repeated over the choices (the prompt dominates
    the cost on CPU); same numbers as scoring each prompt+choice sequence on its own."""
    device = next(model.parameters()).device
    prompt = tok(render_prompt(tok, question), add_special_tokens=False)["input_ids"][-cutoff:]
    outs = [tok(c + end_token(tok), add_special_tokens=False)["input_ids"] for c in choices]
    first = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    first_lp = torch.log_softmax(first.logits[0, -1].float(), -1)
    cache = first.past_key_values
    n = max(len(o) for o in outs)
    res = [float(first_lp[o[0]]) for o in outs]
    if n > 1:
        cache.batch_repeat_interleave(len(outs))
        ids = torch.full((len(outs), n - 1), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(outs), len(prompt) + n - 1), dtype=torch.long)
        mask[:, : len(prompt)] = 1
        for i, o in enumerate(outs):
            ids[i, : len(o) - 1] = torch.tensor(o[:-1])
            mask[i, len(prompt) : len(prompt) + len(o) - 1] = 1
        lp = torch.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     past_key_values=cache, use_cache=True).logits.float(), -1)
        for i, o in enumerate(outs):
            res[i] += sum(float(lp[i, j, o[j + 1]]) for j in range(len(o) - 1))
    return res


def rank_choices(model, tok, items: Sequence[dict], cutoff: int = 512) -> List[Dict[str, float]]:
    """Multiple choice by log-likelihood: per item, whether the top-ranked choice is right and
    the log-probability of the right choice's text (+ end token) after the question."""
    res = []
    for it in items:
        lps = choice_logprobs(model, tok, it["question"], it["choices"], cutoff)
        best = max(range(len(lps)), key=lps.__getitem__)
        res.append({"correct": float(best == it["answer"]), "logprob": lps[it["answer"]]})
    return res


# ----------------------------------------------------------------------------- statistics


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean over items."""
    vals = [float(v) for v in values]
    if not vals:
        return (math.nan, math.nan, math.nan)
    r = random.Random(seed)
    n = len(vals)
    means = sorted(sum(vals[r.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo_i = int(math.floor((1 - level) / 2 * n_boot))
    hi_i = min(n_boot - 1, int(math.ceil((1 + level) / 2 * n_boot)) - 1)
    return (sum(vals) / n, means[lo_i], means[hi_i])


def paired_delta_ci(tuned: Sequence[float], base: Sequence[float], **kw) -> Tuple[float, float, float]:
    """Bootstrap interval of mean(tuned - base) over the same items (paired)."""
    if len(tuned) != len(base):
        raise ValueError(f"paired interval needs equal lengths, got {len(tuned)} and {len(base)}")
    return bootstrap_ci([a - b for a, b in zip(tuned, base)], **kw)


def write_json(path, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))
    return path
