"""The retention numbers, one implementation for the live monitor and for eaft-repro.

Reference (the model as loaded, before any optimizer step; no second model kept):
  * prompt items: the base's greedy answer, and per answer token the base's top-k log-probs, their token ids
    and the log of the remaining (tail) mass;
  * text items: the base's summed log-prob of the text; mc items: of the right choice (+ end token).
Measure (any later model, eval mode, no gradient, the same forward):
  kl_base    KL(base || current) per answer token, on the k stored entries plus one tail bucket. Merging
             the tail into one outcome can only lose information, so this is a lower bound of the full
             KL, equal to it when k = |V| (topk=None stores the full distribution: the exact KL).
  text_nll   NLL per text token;   mc_logp   mean log-prob of the right choice.
Distributed: items are dealt over the data-parallel ranks (item i to rank i % world), each rank pads its
share with zero-weight copies so every rank runs the same forward (and generate) calls, and the sums are
all-reduced (ZeRO-3 gathers parameters collectively: a rank skipping a forward would hang the others).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .probe import Row

GENERATE_BATCH = 16
METRICS = ("kl_base", "text_nll", "text_nll_delta", "mc_logp", "mc_logp_delta")
PREFIX = "retention/"


@dataclass
class Item:
    row: Row
    ids: List[int]
    start: int  # ids[start:] are scored (predicted from the position before)
    weight: float = 1.0  # 0: a padding copy
    ref: dict = field(default_factory=dict)


def _ids(tok, text: str) -> List[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tok, text: str) -> List[int]:
    """The chat-template prompt of a user turn (plain text + newline for a tokenizer without a template)."""
    if getattr(tok, "chat_template", None):
        return _ids(tok, tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True))
    return _ids(tok, text + "\n")


def model_context(model) -> Optional[int]:
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device(model):
    return next(model.parameters()).device


class RetentionMonitor:
    """Encodes the probe rows, stores the base reference, measures later models against it."""

    def __init__(self, rows: Sequence[Row], tok, *, topk: Optional[int] = 32, max_new_tokens: int = 48,
                 batch_size: int = 4, budget: Optional[int] = None, context: Optional[int] = None,
                 shown: str = "retention_probe"):
        self.tok, self.topk, self.max_new_tokens, self.batch_size = tok, topk, max_new_tokens, batch_size
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.eos = tok.eos_token or ""
        self.items: List[Item] = []
        used = 0
        for row in rows:
            item = self._encode(row)
            cost = len(item.ids) + (max_new_tokens if row.kind == "prompt" else 0)
            if context is not None and cost > context:
                raise ValueError(f"{shown}: {row.where} needs {cost} tokens"
                                 f"{f' (prompt + {max_new_tokens} answer tokens)' if row.kind == 'prompt' else ''}"
                                 f", more than the model's context of {context}; shorten or drop it")
            if budget is not None and used + cost > budget and self.items:
                break
            used += cost
            self.items.append(item)
        self.tokens = used
        self.local: List[Item] = []
        self.base: Dict[str, float] = {}
        self.ready = False
        self.seconds = {"generate": 0.0, "score": 0.0}  # of the last reference build; score ~ one measure

    def _encode(self, row: Row) -> Item:
        tok = self.tok
        if row.kind == "text":
            ids = _ids(tok, row.text)
            if len(ids) < 2:
                raise ValueError(f"retention_probe: {row.where}: a text needs at least 2 tokens, got {len(ids)}")
            return Item(row, ids, 1)
        prompt = prompt_ids(tok, row.text)
        if row.kind == "prompt":
            return Item(row, prompt, len(prompt))
        return Item(row, prompt + _ids(tok, row.choices[row.answer] + self.eos), len(prompt))

    # ---- the data-parallel share

    def _share(self, items: List[Item], rank: int, world: int) -> List[Item]:
        """This rank's items, padded with zero-weight copies to the same count on every rank."""
        if not items:
            return []
        mine = items[rank::world]
        per_rank = math.ceil(len(items) / world)
        return mine + [Item(items[0].row, items[0].ids, items[0].start, 0.0) for _ in range(per_rank - len(mine))]

    # ---- reference

    @torch.no_grad()
    def build_reference(self, model, autocast: Callable = contextlib.nullcontext) -> Dict[str, float]:
        """Greedy base answers, then the stored reference; returns the step-0 metrics (KL 0)."""
        rank, world = _dist()
        # Fresh copies: a second build (train() called again) starts from the prompts again.
        prompts = [replace(it, ref={}) for it in self._share([it for it in self.items if it.row.kind == "prompt"],
                                                              rank, world)]
        others = [it for it in self.items if it.row.kind != "prompt"]
        with _eval_mode(model):
            t0 = time.perf_counter()
            answers = self._generate(model, [it.ids for it in prompts], world, autocast)
            for it, answer in zip(prompts, answers):
                it.start, it.ids = len(it.ids), it.ids + answer
            self.local = prompts + self._share(others, rank, world)
            t1 = time.perf_counter()
            sums = self._run(model, autocast, store=True)
            self.seconds = {"generate": t1 - t0, "score": time.perf_counter() - t1}
        totals = self._reduce(sums, model)
        self.base = {"text_nll": _ratio(-totals["text_sum"], totals["text_n"]),
                     "mc_logp": _ratio(totals["mc_sum"], totals["mc_n"])}
        self.ready = True
        return self._metrics(totals)

    def _generate(self, model, prompts: List[List[int]], world: int, autocast) -> List[List[int]]:
        out = []
        device = _device(model)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else self.tok.eos_token_id
        stops = set(eos if isinstance(eos, (list, tuple)) else [eos])
        # Decoding is one forward per new token whatever the batch: a wide batch takes 48 steps, not 48 per 4 prompts.
        width = max(self.batch_size, GENERATE_BATCH)
        for start in range(0, len(prompts), width):
            batch = prompts[start:start + width]
            n = max(len(p) for p in batch)
            ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for i, p in enumerate(batch):  # left padding
                ids[i, n - len(p):] = torch.tensor(p)
                mask[i, n - len(p):] = 1
            with autocast():
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                     eos_token_id=eos, synced_gpus=world > 1, top_p=None, top_k=None,
                                     temperature=None)
            for row in gen[:, n:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
                out.append(row[:cut])
        return out

    # ---- measurement

    @torch.no_grad()
    def measure(self, model, autocast: Callable = contextlib.nullcontext) -> Dict[str, float]:
        """The retention metrics of `model` against the stored reference (a collective when distributed)."""
        if not self.ready:
            raise RuntimeError("RetentionMonitor.measure before build_reference")
        with _eval_mode(model):
            sums = self._run(model, autocast, store=False)
        return self._metrics(self._reduce(sums, model))

    def _run(self, model, autocast, store: bool) -> Dict[str, float]:
        sums = dict.fromkeys(("kl_sum", "kl_n", "text_sum", "text_n", "mc_sum", "mc_n"), 0.0)
        device = _device(model)
        # Similar lengths share a batch (less padding); every rank has the same count, so the same calls.
        ordered = sorted(self.local, key=lambda it: len(it.ids))
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start:start + self.batch_size]
            n = max(len(it.ids) for it in batch)
            ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for i, it in enumerate(batch):  # right padding
                ids[i, :len(it.ids)] = torch.tensor(it.ids)
                mask[i, :len(it.ids)] = 1
            with autocast():
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            logits = out["logits"] if isinstance(out, dict) else out.logits
            for i, it in enumerate(batch):
                lp = torch.log_softmax(logits[i, it.start - 1:len(it.ids) - 1].float(), -1)
                kind, value, count = self.score(it, lp, store)
                sums[f"{kind}_sum"] += it.weight * value
                sums[f"{kind}_n"] += it.weight * count
        return sums

    def score(self, it: Item, lp: torch.Tensor, store: bool):
        """(kind, summed value, count) of one item from its scored log-probs lp [n, V]."""
        target = torch.tensor(it.ids[it.start:], device=lp.device)
        kind = it.row.kind
        if kind != "prompt":
            return kind, float(lp.gather(-1, target[:, None]).sum()), (len(target) if kind == "text" else 1)
        if store and it.weight:
            it.ref = reference_of(lp, self.topk)
        return "kl", (float(kl_from_reference(it.ref, lp).sum()) if it.ref else 0.0), len(target)

    def _reduce(self, sums: Dict[str, float], model) -> Dict[str, float]:
        keys = sorted(sums)
        if _dist()[1] > 1:
            t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=_device(model))
            torch.distributed.all_reduce(t)
            return dict(zip(keys, t.tolist()))
        return sums

    def _metrics(self, totals: Dict[str, float]) -> Dict[str, float]:
        out = {}
        if totals["kl_n"] > 0:
            out["kl_base"] = max(0.0, totals["kl_sum"] / totals["kl_n"])
        if totals["text_n"] > 0:
            out["text_nll"] = -totals["text_sum"] / totals["text_n"]
            out["text_nll_delta"] = out["text_nll"] - self.base["text_nll"]
        if totals["mc_n"] > 0:
            out["mc_logp"] = totals["mc_sum"] / totals["mc_n"]
            out["mc_logp_delta"] = out["mc_logp"] - self.base["mc_logp"]
        return {PREFIX + k: v for k, v in out.items()}

    # ---- saving the reference (a resumed run measures against the model before fine-tuning, not the checkpoint)

    def fingerprint(self) -> str:
        """Identifies the encoded probe (rows, tokenizer ids, settings): a saved reference must match it."""
        h = hashlib.sha1(repr((self.topk, self.max_new_tokens, [(it.row.kind, it.ids, it.start) for it in self.items])
                              ).encode())
        return h.hexdigest()[:16]

    def state_dict(self) -> dict:
        rank, world = _dist()
        return {"fingerprint": self.fingerprint(), "rank": rank, "world": world, "base": dict(self.base),
                "local": [{"ids": it.ids, "start": it.start, "weight": it.weight, "ref": it.ref,
                           "row": [it.row.kind, it.row.text, list(it.row.choices), it.row.answer, it.row.where]}
                          for it in self.local]}

    def load_state_dict(self, state: dict) -> Optional[str]:
        """Restore a saved reference; returns why it does not fit (and loads nothing), else None."""
        rank, world = _dist()
        if state.get("fingerprint") != self.fingerprint():
            return "it was built from another probe, tokenizer or settings"
        if (state.get("rank"), state.get("world")) != (rank, world):
            return f"it was saved by rank {state.get('rank')} of {state.get('world')}, this is rank {rank} of {world}"
        self.local = [Item(Row(d["row"][0], d["row"][1], tuple(d["row"][2]), d["row"][3], d["row"][4]), d["ids"],
                           d["start"], d["weight"], d["ref"]) for d in state["local"]]
        self.base, self.ready = dict(state["base"]), True
        return None

    def reference_bytes(self) -> int:
        """Memory held by the stored reference (the top-k log-probs, ids and tail mass)."""
        return sum(t.numel() * t.element_size() for it in self.local for t in it.ref.values())

    # ---- per item (eaft-repro's bootstrap intervals; one process)

    @torch.no_grad()
    def per_item(self, model, autocast: Callable = contextlib.nullcontext) -> Dict[str, List[float]]:
        """Per item, in probe order: kl (mean per answer token), text_nll (per token), mc_logp."""
        if not self.ready or _dist()[1] > 1:
            raise RuntimeError("RetentionMonitor.per_item needs build_reference in a single process first")
        out = {"kl": [], "text_nll": [], "mc_logp": []}
        device = _device(model)
        with _eval_mode(model):
            for it in self.local:
                with autocast():
                    logits = model(input_ids=torch.tensor([it.ids], device=device), use_cache=False).logits
                kind, value, count = self.score(it, torch.log_softmax(logits[0, it.start - 1:-1].float(), -1), False)
                out[{"kl": "kl", "text": "text_nll", "mc": "mc_logp"}[kind]].append(
                    value / max(count, 1) if kind == "kl" else (-value / count if kind == "text" else value))
        return out


def reference_of(lp: torch.Tensor, topk: Optional[int]) -> dict:
    """What is kept of the base distribution at each position: top-k log-probs, ids, log tail mass (CPU)."""
    if topk is None:
        return {"full": lp.cpu()}
    values, idx = lp.topk(min(topk, lp.shape[-1]), -1)
    return {"values": values.cpu(), "idx": idx.to(torch.int32).cpu(), "tail": _tail(lp, idx).cpu()}


def _tail(lp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside idx, per row (-inf when idx covers the vocabulary)."""
    return lp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def kl_from_reference(ref: dict, lp: torch.Tensor) -> torch.Tensor:
    """Per position KL(base || current) on the stored entries + one tail bucket; lp [n, V] current log-probs."""
    if "full" in ref:
        base = ref["full"].to(lp.device)
        return (base.exp() * (base - lp)).sum(-1)
    values, idx, tail = (ref[k].to(lp.device) for k in ("values", "idx", "tail"))
    idx = idx.long()
    kl = (values.exp() * (values - lp.gather(-1, idx))).sum(-1)
    tail_p = tail.exp()
    tail_term = tail_p * (tail - _tail(lp, idx))
    return kl + torch.where(tail_p > 0, tail_term, torch.zeros_like(tail_term))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        if was:
            model.train()
