"""eaft-analyze: the entropy/probability landscape of a fine-tuning set under a model.

For every supervised token (assistant turns under the model's chat template) it records the
probability of the label, the exact entropy, top-K entropies, the EAFT normalised entropy and
weight, all through the core (eaft_plugins.ops.entropy). It then does the same for the model's own
responses to the same prompts (the on-policy contrast), and writes:

  landscape.png   2-D density of normalised entropy vs probability, data vs own responses,
                  confident-conflict quadrant (Htilde < h_min, p < p_min) marked with its share
  topk_corr.png   top-K entropy vs exact entropy for K in --ks
  summary.json    shares, means, correlations, settings
  tokens.csv      one row per scored token
  conflicts.md    the strongest confident conflicts of the data, in context

    eaft-analyze --model DIR_OR_ID --data train.json [--format auto] [--out analysis/]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..ops.entropy import chunk_scores, conflict_mask, finish_weights, topk_entropy
from .evaluation import IGNORE, chunks, encode_conversation, generate, load_model, pad_batch, write_json
from ..options import SETTINGS, EAFTOptions, Spelling, config_from_keys

# One scoring pass has no optimizer step to normalise over (weight_norm), and no trainer.
SCORING_SETTINGS = tuple(st for st in SETTINGS if not st.trainer and st.name != "weight_norm")

DEFAULT_KS = (5, 10, 20, 50)


# ----------------------------------------------------------------------------- data formats


def read_rows(path) -> List[Tuple[str, object]]:
    """(where, row) for every row of a .json file (one list) or a .jsonl file (one row per line), read as plain JSON;
    `where` is "FILE line N" or "FILE item N". ValueError naming the file (and the line) on any problem."""
    p = Path(path)
    try:
        is_dir, is_file = p.is_dir(), p.is_file()
    except OSError as exc:  # e.g. a name too long
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    if is_dir:
        raise ValueError(f"{path} is a directory; --data takes a .json or .jsonl file")
    if not is_file:
        raise ValueError(f"{path}: no such file (--data)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; --data takes a .json or .jsonl file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    if not text.strip():
        raise ValueError(f"{path} is empty; --data needs rows (a .json list or a .jsonl file)")
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})") from None
        return [(f"{path} item {i}", row) for i, row in enumerate(rows, 1)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path} line {n}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path} line {n}: not valid JSON ({exc.msg}); a .jsonl file holds one JSON object "
                                 "per line, a .json file one list of them") from None
    return out


FORMATS = ("auto", "alpaca", "sharegpt", "messages", "swift_query")  # every format to_messages reads
# The keys that make a row one format; `auto` takes the first that fits.
NEEDS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
         "swift_query": ("query", "response")}
# Text fields of a row: (required, optional: None allowed).
TEXTS = {"messages": ((), ()), "sharegpt": ((), ("system",)), "alpaca": (("instruction", "output"), ("input", "system")),
         "swift_query": (("query", "response"), ("system",))}
NEEDS_TEXT = "; ".join(f"{fmt} needs {' and '.join(keys)}" for fmt, keys in NEEDS.items())


def fitting(row: dict) -> List[str]:
    """The formats whose keys the row has."""
    return [fmt for fmt, keys in NEEDS.items() if all(k in row for k in keys)]


def detect_format(row: dict) -> str:
    fits = fitting(row)
    if not fits:
        raise ValueError(f"cannot tell the data format from keys {sorted(row)} ({NEEDS_TEXT}); fix the row or pass "
                         f"--format {'|'.join(FORMATS[1:])}")
    return fits[0]


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                   "function_call": "assistant", "observation": "user", "tool": "user"}


def to_messages(row: dict, fmt: str = "auto") -> List[Dict[str, str]]:
    """LLaMA-Factory alpaca / sharegpt or ms-swift messages / query-response -> [{role, content}]; ValueError saying
    what the row lacks (and which formats it fits) when it is not of that format."""
    fmt = detect_format(row) if fmt == "auto" else fmt
    if fmt not in NEEDS:
        raise ValueError(f"--format must be one of {list(FORMATS)}, got {fmt!r}")
    if not all(k in row for k in NEEDS[fmt]):
        fits = fitting(row)
        hint = f"it fits --format {' or '.join(fits)}" if fits else f"no format fits it: {NEEDS_TEXT}"
        raise ValueError(f"--format {fmt} needs the key{'s' if len(NEEDS[fmt]) > 1 else ''} "
                         f"{' and '.join(NEEDS[fmt])}; this row has keys {sorted(row)} ({hint})")
    required, optional = TEXTS[fmt]
    for key in required + optional:
        if not isinstance(row.get(key, ""), str) and not (key in optional and row[key] is None):
            raise ValueError(f"\"{key}\" must be text, got {_brief(row[key])} ({fmt} row with keys {sorted(row)})")
    system = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    if fmt == "alpaca":
        user = row["instruction"] + ("\n" + row["input"] if row.get("input") else "")
        msgs = system + _history(row) + [{"role": "user", "content": user},
                                         {"role": "assistant", "content": row["output"]}]
    elif fmt == "sharegpt":
        msgs = system + [{"role": _sharegpt_role(turn), "content": turn.get("value", turn.get("content", ""))}
                         for turn in _objects(row, "conversations", '{"from", "value"}')]
    elif fmt == "messages":
        msgs = [{"role": m.get("role"), "content": m["content"]}
                for m in _objects(row, "messages", '{"role", "content"}') if m.get("content") is not None]
    else:
        msgs = system + _history(row) + [{"role": "user", "content": row["query"]},
                                         {"role": "assistant", "content": row["response"]}]
    for m in msgs:
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise ValueError(f"every turn needs a text role and content; got role {_brief(m['role'])} with content "
                             f"{_brief(m['content'])} ({fmt} row with keys {sorted(row)})")
    return msgs


def _brief(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _objects(row: dict, key: str, shape: str) -> list:
    items = row[key]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError(f"\"{key}\" must be a list of {shape} objects, got {_brief(items)}")
    return items


def _history(row: dict) -> List[Dict[str, str]]:
    pairs = row.get("history") or []
    if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs):
        raise ValueError(f"\"history\" must be a list of [question, answer] pairs, got {_brief(pairs)}")
    return [m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def _sharegpt_role(turn: dict) -> str:
    role = turn.get("from", turn.get("role"))
    if not isinstance(role, str) or role not in _SHAREGPT_ROLES:
        raise ValueError(f"unknown sharegpt role {_brief(role)} (known: {', '.join(_SHAREGPT_ROLES)})")
    return _SHAREGPT_ROLES[role]


def load_conversations(path, fmt: str = "auto", limit: Optional[int] = None) -> List[List[Dict[str, str]]]:
    """Every row of the data file (the first `limit`) as [{role, content}], all checked before a model is loaded;
    ValueError naming the file and the line."""
    rows = read_rows(path)
    rows = rows[:limit] if limit else rows
    if not rows:
        raise ValueError(f"{path} has no rows; --data needs at least one")
    convs = []
    for where, row in rows:
        if not isinstance(row, dict):
            kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(row), "null")
            raise ValueError(f"{where} is a JSON {kind}, not an object (one example per row)")
        try:
            convs.append(to_messages(row, fmt))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    if not any(m["role"] == "assistant" for conv in convs for m in conv):
        raise ValueError(f"{path}: no row has an assistant turn, so no token would be scored")
    return convs


def first_prompt(messages: List[Dict[str, str]]) -> Optional[List[Dict[str, str]]]:
    """The conversation up to the first assistant turn (what the model answers on-policy)."""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            return messages[:i]
    return None


# ----------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_sequences(model, tok, seqs, opts: EAFTOptions, ks: Sequence[int] = DEFAULT_KS, batch_size: int = 4,
                    progress: bool = True, desc: str = "score") -> Dict[str, torch.Tensor]:
    """Per supervised token of each (ids, labels) sequence: seq, pos, label, p, ce, Htilde (EAFT),
    exact entropy (nats), top-K entropies (nats), EAFT weight, conflict flag, argmax and its p."""
    device = next(model.parameters()).device
    cols: Dict[str, List[torch.Tensor]] = {}
    steps = list(chunks(seqs, batch_size))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=desc, unit="batch")
    for start, batch in steps:
        ids, mask, lab = pad_batch(batch, tok.pad_token_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        y = lab[:, 1:]
        where = (y != IGNORE).nonzero()
        rows = logits[where[:, 0], where[:, 1]]
        labels = y[where[:, 0], where[:, 1]]
        parts: Dict[str, List[torch.Tensor]] = {}
        for s, z in chunks(rows, opts.rows_per_chunk(rows.size(-1))):
            z = z.float()
            yy = labels[s : s + z.size(0)]
            lse, z_y, h_norm = chunk_scores(z, yy, opts)
            top = z.max(-1)
            got = {"ce": lse - z_y, "h_norm": h_norm, "h_exact": topk_entropy(z, None),
                   "argmax": top.indices, "p_argmax": torch.exp(top.values - lse)}
            for k in ks:
                got[f"h_top{k}"] = topk_entropy(z, k)
            for key, val in got.items():
                parts.setdefault(key, []).append(val.cpu())
        if not parts:
            continue
        part = {k: torch.cat(v) for k, v in parts.items()}
        # Weights per micro-batch, like training (shuffle / mean norm act within a batch).
        w, _ = finish_weights(part["h_norm"], part["ce"], opts)
        part.update(weight=w, conflict=conflict_mask(part["h_norm"], part["ce"], opts),
                    p=torch.exp(-part["ce"]), label=labels.cpu(),
                    seq=where[:, 0].cpu() + start, pos=where[:, 1].cpu() + 1)
        for k, v in part.items():
            cols.setdefault(k, []).append(v)
    if not cols:
        raise ValueError("no supervised tokens to score (are there assistant turns, and is --cutoff long enough?)")
    return {k: torch.cat(v) for k, v in cols.items()}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else float("nan")


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    rank = lambda x: torch.argsort(torch.argsort(x.double())).double()  # noqa: E731 (ties: arbitrary order)
    return pearson(rank(a), rank(b))


def summarize(scores: Dict[str, torch.Tensor], opts: EAFTOptions, ks: Sequence[int]) -> dict:
    n = int(scores["p"].numel())
    return {
        "tokens": n,
        "sequences": int(scores["seq"].unique().numel()),
        "conflict_share": float(scores["conflict"].double().mean()),
        "conflict_tokens": int(scores["conflict"].sum()),
        "mean_p": float(scores["p"].double().mean()),
        "mean_ce": float(scores["ce"].double().mean()),
        "mean_entropy_norm": float(scores["h_norm"].double().mean()),
        "mean_entropy_exact_nats": float(scores["h_exact"].double().mean()),
        "mean_weight": float(scores["weight"].double().mean()),
        "topk_vs_exact": {
            str(k): {"pearson": pearson(scores[f"h_top{k}"], scores["h_exact"]),
                     "spearman": spearman(scores[f"h_top{k}"], scores["h_exact"]),
                     "mean_abs_diff_nats": float((scores[f"h_top{k}"] - scores["h_exact"]).abs().double().mean())}
            for k in ks
        },
    }


# ----------------------------------------------------------------------------- reports


def plot_landscape(panels, opts: EAFTOptions, path, title: str = "") -> Path:
    """panels: [(name, scores)]; density of (p, Htilde) with the confident-conflict quadrant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    top = max(1.0, max(float(s["h_norm"].max()) for _, s in panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, (name, s) in zip(axes[0], panels):
        h = ax.hist2d(s["p"].numpy(), s["h_norm"].clamp_max(top).numpy(), bins=[40, 40],
                      range=[[0, 1], [0, top]], norm=LogNorm(), cmap="viridis")
        fig.colorbar(h[3], ax=ax, label="tokens")
        ax.add_patch(Rectangle((0, 0), opts.p_min, opts.h_min, fill=False, ec="red", lw=2))
        share = float(s["conflict"].double().mean())
        ax.text(opts.p_min + 0.02, opts.h_min + 0.02 * top,
                f"confident conflicts\n{share:.1%} of {s['p'].numel()} tokens", color="red", fontsize=9)
        ax.set_xlabel("probability of the label token")
        ax.set_ylabel(f"normalised entropy (top-{opts.topk or 'V'}, {opts.entropy_norm})")
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_topk(scores: Dict[str, torch.Tensor], ks: Sequence[int], summary: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ks), figsize=(3.4 * len(ks), 3.4), squeeze=False)
    x = scores["h_exact"].numpy()
    for ax, k in zip(axes[0], ks):
        ax.scatter(x, scores[f"h_top{k}"].numpy(), s=2, alpha=0.3)
        hi = float(max(x.max(), scores[f"h_top{k}"].max()))
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set_title(f"K={k}: r={summary['topk_vs_exact'][str(k)]['pearson']:.3f}", fontsize=10)
        ax.set_xlabel("exact entropy (nats)")
        ax.set_ylabel(f"top-{k} entropy (nats)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _clean(text: str) -> str:
    return text.replace("\n", "⏎").replace("|", "\\|")


def conflict_examples(scores, seqs, tok, n: int = 30, left: int = 12, right: int = 6) -> List[dict]:
    """The n confident-conflict tokens with the lowest label probability, with context and the
    token the model expected instead."""
    idx = scores["conflict"].nonzero().squeeze(1)
    idx = idx[torch.argsort(scores["p"][idx])][:n]
    out = []
    for i in idx.tolist():
        seq, pos = int(scores["seq"][i]), int(scores["pos"][i])
        ids = seqs[seq][0]
        out.append({
            "example": seq, "position": pos,
            "before": tok.decode(ids[max(0, pos - left):pos]),
            "token": tok.decode([ids[pos]]),
            "after": tok.decode(ids[pos + 1:pos + 1 + right]),
            "p": float(scores["p"][i]), "entropy_norm": float(scores["h_norm"][i]),
            "model_expected": tok.decode([int(scores["argmax"][i])]), "p_expected": float(scores["p_argmax"][i]),
        })
    return out


def write_conflicts_md(examples: List[dict], path, opts: EAFTOptions) -> Path:
    lines = [f"# Strongest confident conflicts (Htilde < {opts.h_min}, p < {opts.p_min})", "",
             "The label token is in **bold**; the model was confident in another token.", "",
             "| example | context | p(label) | Htilde | model expected (p) |", "|---|---|---|---|---|"]
    for e in examples:
        lines.append(f"| {e['example']} | …{_clean(e['before'])}**{_clean(e['token'])}**{_clean(e['after'])}… "
                     f"| {e['p']:.4f} | {e['entropy_norm']:.3f} | `{_clean(e['model_expected'])}` ({e['p_expected']:.2f}) |")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def write_tokens_csv(scores, tok, path, ks: Sequence[int], source: str, mode: str = "w") -> None:
    keys = ["seq", "pos", "p", "h_norm", "h_exact"] + [f"h_top{k}" for k in ks] + ["weight", "conflict"]
    with open(path, mode, newline="") as fh:
        w = csv.writer(fh)
        if mode == "w":
            w.writerow(["source", "token"] + keys)
        labels = scores["label"].tolist()
        vals = {k: scores[k].tolist() for k in keys}
        for i, lab in enumerate(labels):
            w.writerow([source, tok.convert_ids_to_tokens(lab)] + [
                (f"{vals[k][i]:.6g}" if isinstance(vals[k][i], float) else int(vals[k][i])) for k in keys])


# ----------------------------------------------------------------------------- main


def analyze(model_path, data_path, out_dir, fmt: str = "auto", opts: Optional[EAFTOptions] = None,
            ks: Sequence[int] = DEFAULT_KS, limit: Optional[int] = None, cutoff: int = 1024, batch_size: int = 4,
            on_policy: int = 64, max_new_tokens: int = 256, sample: bool = False, temperature: float = 1.0,
            seed: int = 0, device: Optional[str] = None, n_conflicts: int = 30, progress: bool = True,
            conversations: Optional[List[List[Dict[str, str]]]] = None) -> dict:
    """`conversations`: the data already read by load_conversations (else it is read here, before the model)."""
    opts = opts or EAFTOptions()
    convs = conversations if conversations is not None else load_conversations(data_path, fmt, limit)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file on the way, no permission
        raise ValueError(f"--out {out_dir}: cannot create the folder ({exc.strerror})") from None
    try:
        model, tok = load_model(model_path, device)
    except OSError as exc:  # not a model folder, or a Hub id while offline
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"--model {model_path}: cannot load a model from it ({first})") from None
    opts.check_vocab(model.config.vocab_size)
    for k in ks:
        if k > model.config.vocab_size:
            raise ValueError(f"--ks entry {k} is larger than the vocabulary ({model.config.vocab_size})")

    seqs = [encode_conversation(tok, m, cutoff)[:2] for m in convs]
    data = score_sequences(model, tok, seqs, opts, ks, batch_size, progress, desc="score data")
    summary = {"model": str(model_path), "data": str(data_path), "examples": len(convs),
               "options": {"topk": opts.topk, "alpha": opts.alpha, "entropy_norm": opts.entropy_norm,
                           "gate": opts.gate, "h_min": opts.h_min, "p_min": opts.p_min, "weight_norm": opts.weight_norm},
               "data_tokens": summarize(data, opts, ks)}
    panels = [(f"training data ({Path(data_path).name})", data)]
    write_tokens_csv(data, tok, out / "tokens.csv", ks, "data")

    if on_policy:
        prompts = [(i, first_prompt(m)) for i, m in enumerate(convs)]
        prompts = [(i, p) for i, p in prompts if p][:on_policy]
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for _, p in prompts]
        answers = generate(model, tok, texts, max_new_tokens, batch_size=max(batch_size, 8), sample=sample,
                           temperature=temperature, seed=seed, progress=progress)
        own = [encode_conversation(tok, p + [{"role": "assistant", "content": a}], cutoff)[:2]
               for (_, p), a in zip(prompts, answers)]
        mine = score_sequences(model, tok, own, opts, ks, batch_size, progress, desc="score own answers")
        kind = f"sampled, T={temperature}" if sample else "greedy"
        summary["own_responses"] = {"decoding": kind, **summarize(mine, opts, ks)}
        panels.append((f"model's own {kind} responses (same {len(prompts)} prompts)", mine))
        write_tokens_csv(mine, tok, out / "tokens.csv", ks, "own", mode="a")
        write_json(out / "own_responses.json", [{"example": i, "response": a} for (i, _), a in zip(prompts, answers)])

    plot_landscape(panels, opts, out / "landscape.png", title=f"{Path(str(model_path)).name}: token landscape")
    plot_topk(data, ks, summary["data_tokens"], out / "topk_corr.png")
    examples = conflict_examples(data, seqs, tok, n_conflicts)
    write_conflicts_md(examples, out / "conflicts.md", opts)
    summary["top_conflicts"] = examples
    write_json(out / "summary.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eaft-analyze", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local model directory or Hub id")
    p.add_argument("--data", required=True, help="local .json/.jsonl: alpaca, sharegpt, messages or swift query/response rows")
    p.add_argument("--format", default="auto", choices=FORMATS)
    p.add_argument("--out", default="eaft_analysis")
    p.add_argument("--limit", type=at_least(1), default=None, help="first N examples only")
    p.add_argument("--cutoff", type=at_least(2), default=1024, help="max tokens per example")
    p.add_argument("--batch-size", type=at_least(1), default=4)
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="top-K sizes compared with exact entropy")
    p.add_argument("--on-policy", type=at_least(0), default=64, help="prompts the model answers itself (0: skip)")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256)
    p.add_argument("--sample", action="store_true", help="sample the own responses instead of greedy")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--conflicts", type=at_least(0), default=30, help="confident conflicts listed in conflicts.md")
    for setting in SCORING_SETTINGS:  # the EAFT options, from the schema
        p.add_argument(f"--{setting.name.replace('_', '-')}", default=None,
                       help=f"EAFT: {setting.help} (default {setting.default_text})")
    p.add_argument("--no-progress", action="store_true")
    return p


def at_least(low: int):
    """An argparse type: an integer >= low (argparse reports a bad one as `argument --x: ...`, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def parse_ks(text: str) -> List[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        ks = []
    if not ks or min(ks) < 1:
        raise ValueError(f"--ks must be comma-separated integers >= 1 (e.g. 5,10,20), got {text!r}")
    return ks


def check_run(args) -> None:
    """The flags only a run can refuse, checked before the data and the model are read."""
    if args.sample and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0 with --sample, got {args.temperature}")
    if args.device is not None:
        try:
            kind = torch.device(args.device).type
        except RuntimeError as exc:
            raise ValueError(f"--device {args.device!r} is not a device ({exc})") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")
    if Path(args.out).is_file():
        raise ValueError(f"--out {args.out} is a file; give a folder for the reports")


def main(argv=None) -> int:
    """Bad input (flags, the data file, a model that cannot be read) ends as `eaft-analyze: error: ...`, exit 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        opts = config_from_keys({st.key: getattr(args, st.name) for st in SCORING_SETTINGS}, Spelling("--{dashed}")).options
        ks = parse_ks(args.ks)
        check_run(args)
        convs = load_conversations(args.data, args.format, args.limit)  # every row checked before the model loads
    except ValueError as exc:
        parser.error(str(exc))
    try:
        s = analyze(args.model, args.data, args.out, args.format, opts, ks, args.limit, args.cutoff, args.batch_size,
                    args.on_policy, args.max_new_tokens, args.sample, args.temperature, args.seed, args.device,
                    args.conflicts, progress=not args.no_progress, conversations=convs)
    except ValueError as exc:  # what only the model tells: --model unreadable, top-K above its vocabulary
        parser.error(str(exc))
    d = s["data_tokens"]
    print(f"data: {d['tokens']} supervised tokens in {d['sequences']} examples; confident conflicts "
          f"{d['conflict_share']:.2%}; mean p {d['mean_p']:.3f}; mean weight {d['mean_weight']:.3f}")
    if "own_responses" in s:
        o = s["own_responses"]
        print(f"own responses ({o['decoding']}): {o['tokens']} tokens; confident conflicts {o['conflict_share']:.2%}; "
              f"mean p {o['mean_p']:.3f}")
    print("top-K vs exact entropy (pearson): " + ", ".join(f"K={k}: {v['pearson']:.3f}" for k, v in d["topk_vs_exact"].items()))
    print(f"wrote {args.out}/landscape.png, topk_corr.png, summary.json, tokens.csv, conflicts.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
