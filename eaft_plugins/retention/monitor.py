"""The retention numbers, one implementation for the live monitor and for eaft-repro.

Reference (the model as loaded, before any optimizer step; no second model kept):
  * prompt items: the base's greedy answer, and per answer token the base's top-k log-probs, their token ids
    and the log of the remaining (tail) mass (or, `exact`, the full distribution);
  * every item: its per-item values (readings.COLUMNS), so each later value has a change from the base.
Measure (any later model, eval mode, no gradient, the same forward):
  kl_base     KL(base || current) per answer token, on the k stored entries plus one tail bucket. Merging the
              tail into one outcome can only lose information, so this is a lower bound of the full KL, equal
              to it when k = |V| (topk=None stores the full distribution: the exact KL).
  text_nll    NLL per text token.
  mc_*        multiple choice as lm-eval-harness scores it, in plain text (no chat template): the cloze form
              "Question: Q\\nAnswer:" + " choice" for every choice (summed log-probs, no end-of-turn token),
              and the lettered form (the choices listed as "A. ...", then "Answer:", the letters " A", " B", ...
              scored at the next token). Logged: the right choice's probability normalised among the choices
              (mc_prob, its log mc_logp), and whether it ranks first (mc_acc); mc_letter_prob / _acc likewise.
Each reading comes with its standard error over items (readings.py).
Distributed: items are dealt over the data-parallel ranks (item i to rank i % world); a rank pads its prompts and
its sequences with zero-weight copies so every rank runs the same forward (and generate) calls (ZeRO-3 / FSDP
gather parameters collectively: a rank skipping a forward would hang the others); the per-item table is
all-reduced, so every rank holds every item's values.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .probe import Row
from .readings import COLUMNS, PREFIX, SERIES, readings, unit_values

GENERATE_BATCH = 16
MAX_NEW_TOKENS = 64  # of a greedy answer (docs/retention.md: the share of answers that reach it)
METRICS = ("kl_base", "text_nll", "text_nll_delta", "mc_logp", "mc_logp_delta")  # the first readings (kept keys)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VERSION = 2  # of the scoring: a saved reference of another version does not fit
EXACT_LIMIT = 4 * 2 ** 30  # bytes of full base distributions the exact KL may hold


@dataclass
class Seq:
    """One scored sequence: ids[start:] are scored (predicted from the position before)."""

    unit: int  # the item (index in the probe)
    role: str  # "prompt", "text", "cloze" (one choice of an MC item) or "letter"
    ids: List[int]
    start: int
    choice: int = -1  # cloze: which choice
    letters: tuple = ()  # letter: the token of each letter
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


def _continuation(tok, context: str, cont: str):
    """(context ids, continuation ids) as lm-eval-harness splits them: the whole encoded at once, cut at the context."""
    whole, ctx = _ids(tok, context + cont), _ids(tok, context)
    if whole[:len(ctx)] != ctx:
        return ctx, _ids(tok, cont)
    return ctx, whole[len(ctx):]


def cloze_context(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def letter_context(question: str, choices: Sequence[str]) -> str:
    listed = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))
    return f"Question: {question}\n{listed}\nAnswer:"


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


def _fsdp1(model):
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return model if isinstance(model, FullyShardedDataParallel) else None


@contextlib.contextmanager
def _generating(model):
    """The module to call generate on: FSDP (v1) shards parameters outside its own forward, so generate runs on
    the inner module with the full parameters gathered (every rank at once; freed afterwards)."""
    fsdp = _fsdp1(model)
    if fsdp is None:
        yield model
        return
    with type(fsdp).summon_full_params(fsdp, writeback=False, recurse=True):
        yield fsdp.module


class RetentionMonitor:
    """Encodes the probe rows, stores the base reference, measures later models against it."""

    def __init__(self, rows: Sequence[Row], tok, *, topk: Optional[int] = 32, max_new_tokens: int = MAX_NEW_TOKENS,
                 batch_size: int = 4, context: Optional[int] = None, shown: str = "retention_probe",
                 name: str = "custom"):
        self.tok, self.topk, self.max_new_tokens, self.batch_size = tok, topk, max_new_tokens, batch_size
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.rows, self.name, self.shown = list(rows), name, shown
        self.kinds = [r.kind for r in self.rows]
        self.seqs: List[Seq] = []  # every item's sequences (prompts without their answers)
        for i, row in enumerate(self.rows):
            for seq in self._encode(i, row):
                cost = len(seq.ids) + (max_new_tokens if row.kind == "prompt" else 0)
                if context is not None and cost > context:
                    raise ValueError(f"{shown}: {row.where} needs {cost} tokens"
                                     f"{f' (prompt + {max_new_tokens} answer tokens)' if row.kind == 'prompt' else ''}"
                                     f", more than the model's context of {context}; shorten or drop it")
                self.seqs.append(seq)
        self.tokens = sum(len(s.ids) + (max_new_tokens if s.role == "prompt" else 0) for s in self.seqs)
        if topk is None:
            need = sum(s.role == "prompt" for s in self.seqs) * max_new_tokens * len(tok) * 4
            if need > EXACT_LIMIT:
                raise ValueError(f"{shown}: the exact KL would store up to {need / 2 ** 30:.1f} GiB of base "
                                 f"distributions ({len(tok)} log-probs per answer token), more than "
                                 f"{EXACT_LIMIT / 2 ** 30:.0f} GiB; drop `:exact` (the top-k + tail lower bound) "
                                 "or use fewer prompts")
        self.local: List[Seq] = []
        self.answers: Dict[int, List[int]] = {}  # this rank's prompt items: the base's greedy answer
        self.base = torch.zeros(len(self.rows), COLUMNS, dtype=torch.float64)
        self.ready = False
        self.seconds = {"generate": 0.0, "score": 0.0}  # of the last reference build; score ~ one measure
        self.capped = (0, 0)  # answers that reached max_new_tokens, of all (this rank's share)

    def _encode(self, i: int, row: Row) -> List[Seq]:
        tok = self.tok
        if row.kind == "text":
            ids = _ids(tok, row.text)
            if len(ids) < 2:
                raise ValueError(f"{self.shown}: {row.where}: a text needs at least 2 tokens, got {len(ids)}")
            return [Seq(i, "text", ids, 1)]
        if row.kind == "prompt":
            ids = prompt_ids(tok, row.text)
            return [Seq(i, "prompt", ids, len(ids))]
        out = []
        for j, choice in enumerate(row.choices):
            ctx, cont = _continuation(tok, cloze_context(row.text), " " + choice)
            out.append(Seq(i, "cloze", ctx + cont, len(ctx), choice=j))
        context = letter_context(row.text, row.choices)
        firsts = [_continuation(tok, context, " " + LETTERS[j]) for j in range(len(row.choices))]
        letters = tuple(cont[0] for _, cont in firsts)
        if len(set(letters)) != len(letters):
            raise ValueError(f"{self.shown}: {row.where}: the tokenizer does not tell the letters "
                             f"{LETTERS[:len(letters)]} apart by their first token")
        return out + [Seq(i, "letter", firsts[0][0], len(firsts[0][0]), letters=letters)]

    # ---- the data-parallel share

    def _owned(self, rank: int, world: int) -> List[Seq]:
        return [s for s in self.seqs if s.unit % world == rank]

    def _pads(self, mine: List[Seq], counts: List[int], like: Seq) -> List[Seq]:
        return [Seq(like.unit, like.role, like.ids, like.start, like.choice, like.letters, 0.0, like.ref)
                for _ in range(max(counts) - len(mine))]

    def _share(self, rank: int, world: int) -> List[Seq]:
        """This rank's scored sequences (prompts with their answers), padded to the same count on every rank."""
        mine = [s for s in self._owned(rank, world) if s.role != "prompt" or s.unit in self.answers]
        for s in mine:
            if s.role == "prompt":
                s.ids, s.start = s.ids[:s.start] + self.answers[s.unit], s.start
        counts = [len(self._owned(r, world)) for r in range(world)]
        like = min(mine or self.seqs, key=lambda s: len(s.ids))
        return mine + self._pads(mine, counts, like)

    # ---- reference

    @torch.no_grad()
    def build_reference(self, model, autocast: Callable = contextlib.nullcontext) -> Dict[str, float]:
        """Greedy base answers, then the stored reference; returns the step-0 readings (KL 0, changes 0)."""
        rank, world = _dist()
        self._reset()
        prompts = [s for s in self._owned(rank, world) if s.role == "prompt"]
        counts = [sum(s.role == "prompt" for s in self._owned(r, world)) for r in range(world)]
        if prompts or max(counts):
            padded = prompts + self._pads(prompts, counts, prompts[0] if prompts else
                                          next(s for s in self.seqs if s.role == "prompt"))
            with _eval_mode(model):
                t0 = time.perf_counter()
                answers = self._generate(model, [s.ids for s in padded], world, autocast)
                self.seconds["generate"] = time.perf_counter() - t0
            self.answers = {s.unit: a for s, (a, _) in zip(padded, answers) if s.weight}
            self.capped = (sum(not done for s, (_, done) in zip(padded, answers) if s.weight), len(self.answers))
        self.local = self._share(rank, world)
        t1 = time.perf_counter()
        table = self._table(model, autocast, store=True)
        self.seconds["score"] = time.perf_counter() - t1
        self.base, self.ready = table, True
        return readings(self.kinds, table, self.base)

    def _reset(self):
        self.answers, self.local, self.ready, self.capped = {}, [], False, (0, 0)
        for s in self.seqs:  # a second build (train() called again) starts from the prompts again
            if s.role == "prompt":
                s.ids, s.ref = s.ids[:s.start], {}

    def _generate(self, model, prompts: List[List[int]], world: int, autocast) -> List[tuple]:
        """(answer, finished) per prompt: the greedy answer up to its end token, and whether it reached one."""
        out = []
        device = _device(model)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else self.tok.eos_token_id
        stops = set(eos if isinstance(eos, (list, tuple)) else [eos])
        # Decoding is one forward per new token whatever the batch: a wide batch takes 64 steps, not 64 per 4 prompts.
        width = max(self.batch_size, GENERATE_BATCH)
        for start in range(0, len(prompts), width):
            batch = prompts[start:start + width]
            n = max(len(p) for p in batch)
            ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for i, p in enumerate(batch):  # left padding
                ids[i, n - len(p):] = torch.tensor(p)
                mask[i, n - len(p):] = 1
            with autocast(), _generating(model) as gen_model:
                gen = gen_model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                         max_new_tokens=self.max_new_tokens, pad_token_id=self.pad_id,
                                         eos_token_id=eos, synced_gpus=world > 1, top_p=None, top_k=None,
                                         temperature=None)
            for row in gen[:, n:].tolist():
                cut = next((j + 1 for j, t in enumerate(row) if t in stops), None)
                out.append((row[:cut], cut is not None))
        return out

    # ---- measurement

    @torch.no_grad()
    def measure(self, model, autocast: Callable = contextlib.nullcontext) -> Dict[str, float]:
        """The readings of `model` against the stored reference (a collective when distributed)."""
        return readings(self.kinds, self.measure_table(model, autocast), self.base)

    @torch.no_grad()
    def measure_table(self, model, autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
        """Per item values [items, COLUMNS] of `model` (every rank gets every item's)."""
        if not self.ready:
            raise RuntimeError("RetentionMonitor.measure before build_reference")
        return self._table(model, autocast, store=False)

    def _table(self, model, autocast, store: bool) -> torch.Tensor:
        with _eval_mode(model):
            scores = self._run(model, autocast, store)
        table = torch.zeros(len(self.rows), COLUMNS, dtype=torch.float64)
        cloze: Dict[int, Dict[int, float]] = {}
        for s, value, count in scores:
            if s.role in ("prompt", "text"):
                table[s.unit, 0] += value
                table[s.unit, 1] += count
            elif s.role == "cloze":
                cloze.setdefault(s.unit, {})[s.choice] = value
            else:  # letter: log-probs of the letters at the answer position
                right = self.rows[s.unit].answer
                lp = torch.tensor(value, dtype=torch.float64)
                norm = lp - torch.logsumexp(lp, 0)
                table[s.unit, 3] = math.exp(float(norm[right]))
                table[s.unit, 4] = float(int(lp.argmax()) == right)
        for unit, scored in cloze.items():
            right = self.rows[unit].answer
            lp = torch.tensor([scored[j] for j in range(len(self.rows[unit].choices))], dtype=torch.float64)
            norm = lp - torch.logsumexp(lp, 0)
            table[unit, 0], table[unit, 1] = float(norm[right]), math.exp(float(norm[right]))
            table[unit, 2] = float(int(lp.argmax()) == right)
        if _dist()[1] > 1:
            table = table.to(_device(model))
            torch.distributed.all_reduce(table)
            table = table.cpu()
        return table

    def _run(self, model, autocast, store: bool):
        """(sequence, value, count) of each real sequence of this rank; every rank runs the same calls."""
        out = []
        device = _device(model)
        # Similar lengths share a batch (less padding); every rank has the same count, so the same calls.
        ordered = sorted(self.local, key=lambda s: len(s.ids))
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start:start + self.batch_size]
            n = max(len(s.ids) for s in batch)
            ids = torch.full((len(batch), n), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), n), dtype=torch.long)
            for i, s in enumerate(batch):  # right padding
                ids[i, :len(s.ids)] = torch.tensor(s.ids)
                mask[i, :len(s.ids)] = 1
            with autocast():
                res = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            logits = res["logits"] if isinstance(res, dict) else res.logits
            for i, s in enumerate(batch):
                if s.weight:
                    first = s.start - 1 if s.role != "letter" else len(s.ids) - 1
                    lp = torch.log_softmax(logits[i, first:len(s.ids) - (s.role != "letter")].float(), -1)
                    out.append((s, *self.score(s, lp, store)))
        return out

    def score(self, s: Seq, lp: torch.Tensor, store: bool):
        """(value, count) of one sequence from its scored log-probs lp [n, V]."""
        if s.role == "letter":
            return lp[0, list(s.letters)].tolist(), 1
        target = torch.tensor(s.ids[s.start:], device=lp.device)
        if s.role == "text":
            return -float(lp.gather(-1, target[:, None]).sum()), len(target)
        if s.role == "cloze":
            return float(lp.gather(-1, target[:, None]).sum()), len(target)
        if store:
            s.ref = reference_of(lp, self.topk)
            return 0.0, len(target)  # the base against itself
        return float(kl_from_reference(s.ref, lp).sum()), len(target)

    # ---- identity and the saved reference (a resumed run measures against the model before fine-tuning)

    def fingerprint(self) -> str:
        """Identifies the encoded probe (items, template and tokenizer through the token ids, settings)."""
        kl = "exact" if self.topk is None else f"top{self.topk}+tail"
        h = hashlib.sha1(repr((VERSION, kl, self.max_new_tokens,
                               [(s.unit, s.role, s.ids[:s.start] if s.role == "prompt" else s.ids) for s in self.seqs])
                              ).encode())
        return h.hexdigest()[:16]

    def identity(self) -> dict:
        """What the readings were measured on: recorded with them (retention_probe.json), checked by compare."""
        template = getattr(self.tok, "chat_template", None) or ""
        return {"fingerprint": self.fingerprint(), "probe": self.name, "version": VERSION,
                "items": {k: self.kinds.count(k) for k in ("prompt", "text", "mc")},
                "kinds": self.kinds, "ids": [r.id or r.where for r in self.rows],
                "probe_tokens": self.tokens, "max_new_tokens": self.max_new_tokens,
                "kl": "exact" if self.topk is None else f"top-{self.topk} + tail (lower bound)",
                "tokenizer": getattr(self.tok, "name_or_path", ""), "vocab": len(self.tok),
                "template_sha1": hashlib.sha1(template.encode()).hexdigest()[:12],
                "base": self.base.tolist() if self.ready else None}

    def state_dict(self) -> dict:
        """This rank's share of the reference (answers and stored distributions of its prompt items) and the
        base values of every item; the files of all ranks together hold the whole reference."""
        rank, world = _dist()
        refs = {s.unit: s.ref for s in self.local if s.role == "prompt" and s.weight}
        return {"version": VERSION, "fingerprint": self.fingerprint(), "rank": rank, "world": world,
                "base": self.base.clone(), "answers": dict(self.answers), "refs": refs}

    def load_state_dicts(self, states: Sequence[dict]) -> Optional[str]:
        """Restore a reference saved by one run (one state per rank of that run, any world size); returns why it
        does not fit (and loads nothing), else None."""
        if not states or any(st.get("fingerprint") != self.fingerprint() for st in states):
            return "it was built from another probe, tokenizer or settings"
        answers, refs = {}, {}
        for st in states:
            answers.update(st["answers"])
            refs.update(st["refs"])
        prompts = [i for i, k in enumerate(self.kinds) if k == "prompt"]
        missing = [i for i in prompts if i not in answers or i not in refs]
        if missing:
            return f"the saved files lack {len(missing)} of the {len(prompts)} prompt items (a rank's file missing?)"
        rank, world = _dist()
        self._reset()
        self.answers = {i: answers[i] for i in prompts if i % world == rank}
        self.local = self._share(rank, world)
        for s in self.local:
            if s.role == "prompt":
                s.ref = refs[s.unit]
        self.base, self.ready = states[0]["base"].to(torch.float64), True
        return None

    def reference_bytes(self) -> int:
        """Memory held by the stored reference (the top-k log-probs, ids and tail mass)."""
        return sum(t.numel() * t.element_size() for s in self.local if s.weight for t in s.ref.values())

    # ---- per item (eaft-repro's bootstrap intervals, compare's paired differences)

    @torch.no_grad()
    def per_item(self, model, autocast: Callable = contextlib.nullcontext) -> Dict[str, List[float]]:
        """Per item of each kind, in probe order: kl (mean per answer token), text_nll (per token), mc_logp,
        mc_prob, mc_acc, mc_letter_prob, mc_letter_acc."""
        if not self.ready or _dist()[1] > 1:
            raise RuntimeError("RetentionMonitor.per_item needs build_reference in a single process first")
        values = unit_values(self.kinds, self.measure_table(model, autocast), self.base)
        out = {}
        for name, *_ in SERIES:
            if name in values:
                x, n = values[name]
                out["kl" if name == "kl_base" else name] = [a / b if b else 0.0 for a, b in zip(x, n)]
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


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode for a probe; afterwards the model is as before: training mode, and under FSDP2 its parameters
    sharded again (a no-grad forward leaves the root's unsharded: an optimizer built then would hold those)."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        if was:
            model.train()
        _reshard(model)


def _reshard(model) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


__all__ = ["METRICS", "PREFIX", "RetentionMonitor", "Seq", "kl_from_reference", "model_context", "prompt_ids",
           "reference_of"]
