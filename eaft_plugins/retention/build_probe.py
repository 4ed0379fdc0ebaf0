"""Regenerate the builtin probe files (eaft_plugins/data/probe_*.jsonl) from the public datasets they come from.

    python -m eaft_plugins.retention.build_probe --data ../shared/data        # rewrites eaft_plugins/data
    python -m eaft_plugins.retention.build_probe --data ../shared/data --check  # exit 1 if the files differ

Deterministic: every source is filtered by fixed rules, ordered by sha256(SALT + item id) and cut at LARGE rows;
nothing depends on a model. One file per source, so each file carries one licence (eaft_plugins/data/README.md):
  probe_arc.jsonl       ARC-Challenge test (CC BY-SA 4.0): LARGE multiple-choice rows, then LARGE other
                        questions as open prompts ("... Answer in one sentence."), none shared with the MC rows
  probe_ifeval.jsonl    IFEval prompts (Apache-2.0), as texts (natural English requests)
  probe_pubmedqa.jsonl  PubMedQA labelled set (MIT): its long answers, as texts
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from .probe import DATA

SALT = "eaft-retention-probe-v1:"
LARGE = 64  # rows per kind in builtin-large; builtin takes the first DEFAULT of each (probe.PRESETS)
PROMPT_SUFFIX = " Answer in one sentence."
# Stems that only make sense with their options shown (or with a figure) are no open questions.
NOT_OPEN = ("following", "these", "shown", "diagram", "table", "graph", "below", "above", "which statement",
            "best describes", "which is", "which of", "what is the best", "which two", "most likely")


def _order(items, key):
    return sorted(items, key=lambda it: hashlib.sha256((SALT + key(it)).encode()).hexdigest())


def _words(text: str) -> int:
    return len(text.split())


def arc_rows(path: Path) -> list:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fit = [r for r in rows if [c["label"] for c in r["question"]["choices"]] == list("ABCD")
           and _words(r["question"]["stem"]) <= 40 and all(_words(c["text"]) <= 10 for c in r["question"]["choices"])]
    fit = _order(fit, lambda r: r["id"])
    mc = [{"question": r["question"]["stem"], "choices": [c["text"] for c in r["question"]["choices"]],
           "answer": "ABCD".index(r["answerKey"]), "id": r["id"], "source": "arc-challenge-test"} for r in fit[:LARGE]]
    rest = [r for r in fit[LARGE:] if not any(w in r["question"]["stem"].lower() for w in NOT_OPEN)
            and r["question"]["stem"].rstrip().endswith("?")]
    prompts = [{"prompt": r["question"]["stem"] + PROMPT_SUFFIX, "id": r["id"], "source": "arc-challenge-test"}
               for r in rest[:LARGE]]
    return mc + prompts


def ifeval_rows(path: Path) -> list:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    fit = _order([r for r in rows if 12 <= _words(r["prompt"]) <= 60 and r["prompt"].isascii()], lambda r: str(r["key"]))
    return [{"text": r["prompt"], "id": f"ifeval-{r['key']}", "source": "ifeval"} for r in fit[:LARGE // 2]]


def pubmedqa_rows(path: Path) -> list:
    data = json.loads(path.read_text())
    fit = _order([(pmid, d["LONG_ANSWER"]) for pmid, d in data.items() if 12 <= _words(d["LONG_ANSWER"]) <= 60],
                 lambda x: x[0])
    return [{"text": text, "id": f"pubmed-{pmid}", "source": "pubmedqa"} for pmid, text in fit[:LARGE // 2]]


def build(data_dir) -> dict:
    """{file name: JSONL text} of the three probe files."""
    root = Path(data_dir)
    out = {"probe_arc.jsonl": arc_rows(root / "general" / "arc_challenge_test.jsonl"),
           "probe_ifeval.jsonl": ifeval_rows(root / "general" / "ifeval_input_data.jsonl"),
           "probe_pubmedqa.jsonl": pubmedqa_rows(root / "medical" / "pubmedqa_ori_pqal.json")}
    return {name: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) for name, rows in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the shared data folder (general/, medical/)")
    ap.add_argument("--out", default=str(DATA))
    ap.add_argument("--check", action="store_true", help="compare with the files in --out instead of writing")
    args = ap.parse_args(argv)
    files = build(args.data)
    differ = [n for n, text in files.items() if not (Path(args.out) / n).is_file()
              or (Path(args.out) / n).read_text(encoding="utf-8") != text]
    if args.check:
        print("probe files up to date" if not differ else f"probe files differ: {differ}")
        return 1 if differ else 0
    for name, text in files.items():
        (Path(args.out) / name).write_text(text, encoding="utf-8")
        print(f"wrote {Path(args.out) / name} ({text.count(chr(10))} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
