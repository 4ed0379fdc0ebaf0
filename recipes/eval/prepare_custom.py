"""Write MedQA and CLUEWSC as EvalScope `general_mcq` subsets (EvalScope has no built-in for them).

general_mcq reads <local_path>/<subset>_val.jsonl rows {id, question, A, B, ..., answer}.
  MedQA    GBaker/MedQA-USMLE-4-options (test split; 1,273 questions), or --medqa PATH to a local
           JSONL with {question, options: {A..D}, answer_idx}
  CLUEWSC  FewCLUE's labelled CLUEWSC test set, test_public.json (976 items; OpenCompass's `cluewsc-test`,
           the split EvalScope's OpenCompass backend runs), downloaded from GitHub at a fixed commit and
           checked by SHA-256; or --cluewsc PATH to any CLUE-format JSONL {text, label, target: {span1_text,
           span2_text}}. Why this split: the paper's CLUEWSC scores are attainable as k/976 but mostly not
           as k/304 (CLUE's dev set) -- recipes/eval/attainable.py, docs/evaluation.md.
           Posed as a yes/no question: does the pronoun (span2) refer to span1?
  python recipes/eval/prepare_custom.py [--medqa PATH] [--cluewsc PATH] [--out-dir recipes/eval/data/custom]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

LETTERS = "ABCDEFGHIJ"
# The CLUEWSC split the recipes evaluate on (a key of attainable.CANDIDATES["CLUEWSC"]) and its file.
CLUEWSC_SPLIT = "fewclue_test_public"
CLUEWSC_URL = ("https://raw.githubusercontent.com/CLUEbenchmark/FewCLUE/"
               "62a02c6f31cf32814cfe522f78ef088228840f8d/datasets/cluewsc/test_public.json")
CLUEWSC_SHA256 = "52532104368b124c88a29dc24665d4f749c68a6fcaa18cd9101e2b5fd514d704"


def _jsonl(path: Path) -> List[dict]:
    return _jsonl_text(Path(path).read_text())


def _jsonl_text(text: str) -> List[dict]:
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def medqa_rows(rows: Iterable[dict]) -> List[dict]:
    out = []
    for i, r in enumerate(rows):
        keys = sorted(r["options"])
        if keys != list(LETTERS[: len(keys)]):
            raise ValueError(f"MedQA row {i}: options must be lettered A.., got {keys}")
        out.append({"id": i, "question": r["question"], **{k: r["options"][k] for k in keys}, "answer": r["answer_idx"]})
    return out


def cluewsc_rows(rows: Iterable[dict], label_names: Optional[Sequence[str]] = None) -> List[dict]:
    """label is 'true'/'false' (CLUE files) or an index into label_names (Hub: ['true', 'false'])."""
    names = list(label_names) if label_names is not None else ["true", "false"]
    out = []
    for i, r in enumerate(rows):
        label = r["label"]
        label = names[label] if isinstance(label, int) else str(label)
        if label not in ("true", "false"):
            raise ValueError(f"CLUEWSC row {i}: label must be 'true' or 'false', got {r['label']!r}")
        t = r["target"]
        question = f"{r['text']}\n在上面的句子中，“{t['span2_text']}”指代的是“{t['span1_text']}”吗？"
        out.append({"id": i, "question": question, "A": "是", "B": "否", "answer": "A" if label == "true" else "B"})
    return out


def download(url: str, sha256: str, timeout: float = 60) -> str:
    """The file's text, refused unless its SHA-256 is the pinned one (a moved or edited file would
    silently change the benchmark)."""
    import hashlib
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as resp:
        data = resp.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise SystemExit(f"{url}: SHA-256 {got}, expected {sha256}: not the pinned CLUEWSC file")
    return data.decode("utf-8")


def write_subset(rows: List[dict], out_dir: Path, subset: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{subset}_val.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--medqa", type=Path, default=None)
    ap.add_argument("--cluewsc", type=Path, default=None, help="local CLUE-format JSONL instead of the download")
    ap.add_argument("--cluewsc-url", default=CLUEWSC_URL, help="a mirror of the pinned file (same SHA-256)")
    ap.add_argument("--out-dir", type=Path, default=Path("recipes/eval/data/custom"))
    args = ap.parse_args(argv)

    if args.medqa is not None:
        med = medqa_rows(_jsonl(args.medqa))
    else:
        from datasets import load_dataset

        ds = load_dataset("GBaker/MedQA-USMLE-4-options", split="test")
        med = medqa_rows(ds)
    if args.cluewsc is not None:
        wsc = cluewsc_rows(_jsonl(args.cluewsc))
    else:
        wsc = cluewsc_rows(_jsonl_text(download(args.cluewsc_url, CLUEWSC_SHA256)))
    for subset, rows in (("medqa", med), ("cluewsc", wsc)):
        print(f"{subset}: {len(rows)} -> {write_subset(rows, args.out_dir, subset)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
