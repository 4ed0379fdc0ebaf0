"""Rebuild the paper's math SFT set (its 19k set itself is not published).

Paper pipeline: prompts from Numina-Math, BigMathVerified and Nemotron-CrossThink, answered by
Qwen3-235B-A22B-Instruct, keeping only responses whose final answer is verified correct.
Steps (each reads the previous step's JSONL, so a long run can be resumed):

  sample    prompts + gold answers from the sources         -> prompts.jsonl
  generate  one answer per prompt from any OpenAI-compatible -> responses.jsonl (resumable)
            endpoint (`vllm serve Qwen/Qwen3-235B-A22B-Instruct-2507 --tensor-parallel-size 8`,
            or `swift deploy --model ... --infer_backend vllm`)
  filter    math-verify the final answer against the gold; keep correct, one per prompt, up to
            --keep; write LLaMA-Factory (alpaca JSON) and ms-swift (messages JSONL) files
  all       the three in a row

Example (see recipes/README.md):
  python recipes/math/build_data.py all --work-dir data_build/math \
      --base-url http://127.0.0.1:8000/v1 --model Qwen/Qwen3-235B-A22B-Instruct-2507 \
      --out-dir recipes/math/data/generated
Needs `pip install math-verify` (filter) and `datasets` (sample from the Hub).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # recipes/common: shared by the builders
from sft_files import write_outputs  # noqa: E402  (the two training files every builder writes)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
NAME = "eaft_math_19k"

# name -> (hub id, config, split, question column, answer column); a dotted column reads a nested
# field. Numina-Math 1.5 and Big-Math-RL-Verified carry a short final answer per problem.
# Nemotron-CrossThink: its card (README.md front matter) declares one `default` config whose splits
# are `train_qa` (Data/Nemotron-CrossThink-QA.jsonl, 187,496 rows) and `train_math`
# (Data/Nemotron-CrossThink-Math.jsonl, 99,880 rows); the paper draws on the math part. The card
# lists no column names: the rows are RL records, read here as `meta_data.question` and
# `reward_model.ground_truth`, as public loaders of the math file do. A row without them stops the
# build with the row's keys (never a silent empty source); --source overrides any entry.
DEFAULT_SOURCES = {
    "numina": ("AI-MO/NuminaMath-1.5", None, "train", "problem", "answer"),
    "bigmath": ("SynthLabsAI/Big-Math-RL-Verified", None, "train", "problem", "answer"),
    "crossthink": ("nvidia/Nemotron-CrossThink", None, "train_math", "meta_data.question", "reward_model.ground_truth"),
}
# Gold answers that cannot be verified (NuminaMath-1.5 marks proofs and unextracted answers so).
UNVERIFIABLE = {"", "proof", "notfound", "none"}


# ---------------------------------------------------------------- sample

def gsm8k_gold(answer: str) -> str:
    """GSM8K stores the final answer after '####'."""
    return answer.rsplit("####", 1)[-1].strip().replace(",", "")


def read_local(path: Path, question_col: str, answer_col: str) -> List[Dict[str, str]]:
    """JSON list or JSONL rows -> [{question, gold}]. A GSM8K-style '#### N' answer keeps N only."""
    text = Path(path).read_text()
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    out = []
    for r in rows:
        gold = str(r[answer_col])
        out.append({"question": str(r[question_col]), "gold": gsm8k_gold(gold) if "####" in gold else gold.strip()})
    return out


def field(row: dict, column: str):
    """row[column], following dots into nested records (`reward_model.ground_truth`)."""
    value = row
    for key in column.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(f"column {column!r} not in row with keys {sorted(row)}")
        value = value[key]
    return value


def read_hub(hub_id: str, config: Optional[str], split: str, question_col: str, answer_col: str, limit: int, seed: int,
             data_files: Optional[str] = None):
    """Up to `limit` shuffled {question, gold} rows. data_files: a local JSON/JSONL file shaped like the
    Hub split, read instead of the Hub (offline tests, mirrors)."""
    from datasets import load_dataset  # only needed for Hub sources

    if data_files:
        ds = load_dataset("json", data_files={split: str(data_files)}, split=split, streaming=True)
    else:
        ds = load_dataset(hub_id, config, split=split, streaming=True)
    out = []
    for r in ds.shuffle(seed=seed, buffer_size=50_000):
        q, a = field(r, question_col), field(r, answer_col)
        if not q or a is None or str(a).strip().lower() in UNVERIFIABLE:  # cannot be verified
            continue
        out.append({"question": str(q), "gold": str(a).strip()})
        if len(out) >= limit:
            break
    return out


def parse_source(spec: str):
    """name=hub_id[:config]:split:question_col:answer_col  or  name=local:PATH:question_col:answer_col"""
    name, _, rest = spec.partition("=")
    parts = rest.split(":")
    if parts[0] == "local":
        if len(parts) != 4:
            raise ValueError(f"--source {spec!r}: expected name=local:PATH:question_col:answer_col")
        return name, ("local", parts[1], parts[2], parts[3])
    if len(parts) == 4:
        parts.insert(1, "")
    if len(parts) != 5:
        raise ValueError(f"--source {spec!r}: expected name=hub_id[:config]:split:question_col:answer_col")
    hub, config, split, qc, ac = parts
    return name, (hub, config or None, split, qc, ac)


def sample(sources: Dict[str, tuple], per_source: int, seed: int,
           data_files: Optional[Dict[str, str]] = None) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    data_files = data_files or {}
    unknown = set(data_files) - set(sources)
    if unknown:
        raise ValueError(f"--data-files for unknown sources {sorted(unknown)}; sources: {sorted(sources)}")
    rows = []
    for name, spec in sources.items():
        if spec[0] == "local":
            got = read_local(Path(spec[1]), spec[2], spec[3])
            rng.shuffle(got)
            got = got[:per_source]
        else:
            got = read_hub(*spec, limit=per_source, seed=seed, data_files=data_files.get(name))
        for i, r in enumerate(got):
            rows.append({"id": f"{name}-{i}", "source": name, **r})
    seen, unique = set(), []
    for r in rows:  # the sources overlap (Big-Math draws on Numina): drop repeated problems
        key = " ".join(r["question"].split()).lower()
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


# ---------------------------------------------------------------- generate

def prompt_text(question: str) -> str:
    return f"{question.strip()}\n\n{INSTRUCTION}"


def chat_completion(base_url: str, model: str, prompt: str, *, max_tokens: int, temperature: float,
                    top_p: float, timeout: float, api_key: str = "EMPTY") -> str:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
    }
    req = urllib.request.Request(
        base_url.rstrip("/") + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    choice = out["choices"][0]
    if choice.get("finish_reason") == "length":
        return ""  # truncated: its final answer is missing, do not keep it
    return choice["message"]["content"] or ""


def with_retries(call, *, retries: int, backoff: float, sleep=time.sleep):
    """call() with up to `retries` more attempts after a failure, waiting backoff * 2**attempt between
    them; the last failure is raised. A teacher server under load drops some requests."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception:
            if attempt == retries:
                raise
            sleep(backoff * 2 ** attempt)


def generate(prompts: List[dict], out_path: Path, *, base_url: str, model: str, workers: int = 32,
             max_tokens: int = 16384, temperature: float = 0.7, top_p: float = 0.8, timeout: float = 1800.0,
             api_key: str = "EMPTY", retries: int = 4, backoff: float = 5.0) -> Tuple[int, int]:
    """Append one response per prompt id not yet in out_path; a prompt whose requests all fail is
    left out (a rerun asks for it again). Returns (written, failed)."""
    done = set()
    if out_path.is_file():
        done = {json.loads(l)["id"] for l in out_path.read_text().splitlines() if l.strip()}
    todo = [p for p in prompts if p["id"] not in done]
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def one(p):
        text = with_retries(lambda: chat_completion(base_url, model, prompt_text(p["question"]), max_tokens=max_tokens,
                                                    temperature=temperature, top_p=top_p, timeout=timeout,
                                                    api_key=api_key),
                            retries=retries, backoff=backoff)
        return {**p, "prompt": prompt_text(p["question"]), "response": text}

    written, failed = 0, 0
    with out_path.open("a") as fh, ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(one, p): p["id"] for p in todo}
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:  # keep what succeeded; report the rest
                failed += 1
                print(f"generate: {futures[fut]} failed after {retries + 1} attempts: {exc!r}", file=sys.stderr)
                continue
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
            written += 1
    return written, failed


# ---------------------------------------------------------------- filter

def is_correct(gold: str, response: str) -> bool:
    """math-verify: parse the gold answer and the response's final answer, compare symbolically."""
    from math_verify import parse, verify

    if not response.strip():
        return False
    gold_parsed = parse(f"\\boxed{{{gold}}}")
    if not gold_parsed:
        gold_parsed = parse(gold)
    if not gold_parsed:
        return False
    return bool(verify(gold_parsed, parse(response)))


def filter_rows(rows: Iterable[dict], keep: Optional[int] = None, seed: int = 0) -> List[dict]:
    """Verified-correct responses, one per prompt id, at most `keep` (a seeded random subset)."""
    kept, seen = [], set()
    for r in rows:
        if r["id"] in seen or not is_correct(r["gold"], r["response"]):
            continue
        seen.add(r["id"])
        kept.append(r)
    if keep is not None and len(kept) > keep:
        kept = random.Random(seed).sample(kept, keep)
    return kept


# ---------------------------------------------------------------- cli

def _read_jsonl(path: Path) -> List[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["sample", "generate", "filter", "all"])
    ap.add_argument("--work-dir", type=Path, default=Path("data_build/math"))
    ap.add_argument("--source", action="append", default=[],
                    help="name=hub_id[:config]:split:question_col:answer_col or name=local:PATH:question_col:answer_col "
                         "(replaces the default sources when given)")
    ap.add_argument("--data-files", action="append", default=[], metavar="NAME=PATH",
                    help="read source NAME from a local JSON/JSONL file shaped like its Hub split (offline)")
    ap.add_argument("--per-source", type=int, default=10_000, help="prompts sampled per source")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="Qwen/Qwen3-235B-A22B-Instruct-2507")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.8)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--retries", type=int, default=4, help="more attempts per prompt after a failed request")
    ap.add_argument("--backoff", type=float, default=5.0, help="seconds before the first retry (doubles each time)")
    ap.add_argument("--keep", type=int, default=19_000, help="paper: ~19k verified samples")
    ap.add_argument("--out-dir", type=Path, default=Path("recipes/math/data/generated"))
    ap.add_argument("--name", default=NAME)
    args = ap.parse_args(argv)

    failed = 0
    prompts_path, responses_path = args.work_dir / "prompts.jsonl", args.work_dir / "responses.jsonl"
    if args.step in ("sample", "all"):
        sources = dict(parse_source(s) for s in args.source) if args.source else DEFAULT_SOURCES
        rows = sample(sources, args.per_source, args.seed, dict(d.split("=", 1) for d in args.data_files))
        args.work_dir.mkdir(parents=True, exist_ok=True)
        prompts_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"sample: {len(rows)} prompts -> {prompts_path}")
    if args.step in ("generate", "all"):
        n, failed = generate(_read_jsonl(prompts_path), responses_path, base_url=args.base_url, model=args.model,
                             workers=args.workers, max_tokens=args.max_tokens, temperature=args.temperature,
                             top_p=args.top_p, timeout=args.timeout, api_key=args.api_key, retries=args.retries,
                             backoff=args.backoff)
        print(f"generate: {n} new responses -> {responses_path}")
        if failed:
            print(f"generate: {failed} prompts failed; rerun `generate` to ask for them again", file=sys.stderr)
    if args.step in ("filter", "all"):
        rows = _read_jsonl(responses_path)
        kept = filter_rows(rows, keep=args.keep, seed=args.seed)
        paths = write_outputs(kept, args.out_dir, args.name)
        print(f"filter: kept {len(kept)} of {len(rows)} -> {paths['llamafactory']} , {paths['swift']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
