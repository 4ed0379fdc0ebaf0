"""Medical SFT data for the Qwen3-4B-Thinking recipe, in LLaMA-Factory and ms-swift formats.

The paper does not name its medical training set. We use FreedomIntelligence/medical-o1-reasoning-SFT
(English config, ~19.7k verifiable medical questions with a reasoning chain and an answer, Apache-2.0):
it is public, sized like the paper's math set, and carries reasoning, which a Thinking model must be
trained on (answers without a <think> block would teach it to skip reasoning). Neither framework's
own registration of it keeps the reasoning column, so this script joins it:
    output = "<think>\\n{Complex_CoT}\\n</think>\\n\\n{Response}"

Sources (outputs are named after their source and limit, so neither an evaluation set nor a part of
the set lands in the training file):
  medical-o1 (default)     the Hub dataset (config en, split train) -> medical_o1_reasoning_en.{json,jsonl},
                           the file the recipes train on; or --input PATH to a local file shaped like it
                           (the Hub's JSON list of {Question, Complex_CoT, Response}) -> PATH's stem
                           (a full local copy of the Hub file: add --name medical_o1_reasoning_en)
  pubmedqa, medqa          local PubMedQA (ori_pqal.json) / MedQA (4-option JSONL) files. These are
                           the paper's *evaluation* sets: smoke tests only -> pubmedqa_eval_smoke.*,
                           medqa_eval_smoke.* (never the training name)
  --limit N                keeps the first N rows and adds _first<N> to the name
  python recipes/medical/prepare_data.py                          # -> recipes/medical/data/generated/
  python recipes/medical/prepare_data.py --source pubmedqa --input ../shared/data/medical/pubmedqa_ori_pqal.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "common"))  # recipes/common: shared by the builders
from sft_files import write_outputs  # noqa: E402  (the two training files every builder writes)

NAME = "medical_o1_reasoning_en"  # the training file (recipes/medical/data/dataset_info.json)
HUB = ("FreedomIntelligence/medical-o1-reasoning-SFT", "en", "train")
OUTPUT_NAMES = {"medical-o1": NAME, "pubmedqa": "pubmedqa_eval_smoke", "medqa": "medqa_eval_smoke"}


def thinking(reasoning: str, answer: str) -> str:
    return f"<think>\n{reasoning.strip()}\n</think>\n\n{answer.strip()}"


def _rows(path: Path):
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        return json.loads(text)
    if text.lstrip().startswith("{") and not path.suffix == ".jsonl":
        return json.loads(text)
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def from_medical_o1(rows) -> List[Dict[str, str]]:
    return [{"prompt": r["Question"], "response": thinking(r["Complex_CoT"], r["Response"])} for r in rows]


def from_pubmedqa(data: dict) -> List[Dict[str, str]]:
    out = []
    for item in data.values():
        context = "\n".join(item["CONTEXTS"])
        prompt = f"Context:\n{context}\n\nQuestion: {item['QUESTION']}\nAnswer with yes, no or maybe."
        out.append({"prompt": prompt, "response": thinking(item["LONG_ANSWER"], f"The answer is {item['final_decision']}.")})
    return out


def from_medqa(rows) -> List[Dict[str, str]]:
    out = []
    for r in rows:
        opts = "\n".join(f"{k}. {v}" for k, v in sorted(r["options"].items()))
        key = r["answer_idx"]
        prompt = f"{r['question']}\n\n{opts}\n\nAnswer with the letter of the correct option."
        out.append({"prompt": prompt, "response": thinking(f"The correct option is {key}: {r['options'][key]}.", f"The answer is {key}.")})
    return out


def hub_rows(data_files: "Path | None" = None):
    """The Hub split, or a local file shaped like it read through the same loader."""
    from datasets import load_dataset

    if data_files is not None:
        return load_dataset("json", data_files=str(data_files), split="train")
    hub_id, config, split = HUB
    return load_dataset(hub_id, config, split=split)


def load(source: str, input_path: "Path | None") -> List[Dict[str, str]]:
    if source == "medical-o1":
        return from_medical_o1(hub_rows(input_path))
    if input_path is None:
        raise ValueError(f"--source {source} needs --input PATH (a local file)")
    if source == "pubmedqa":
        return from_pubmedqa(json.loads(Path(input_path).read_text()))
    if source == "medqa":
        return from_medqa(_rows(input_path))
    raise ValueError(f"--source must be one of ['medical-o1', 'pubmedqa', 'medqa'], got {source!r}")


def output_name(source: str, input_path: "Path | None" = None, limit: "int | None" = None) -> str:
    """Named after what was read: the Hub set, a local file (its stem) or an evaluation source, and
    the row limit; only the whole Hub set gets the training name."""
    name = Path(input_path).stem if source == "medical-o1" and input_path is not None else OUTPUT_NAMES[source]
    return name if limit is None else f"{name}_first{limit}"


def check_name(source: str, name: str) -> str:
    """An explicit --name; an evaluation source may not take the training name."""
    if source != "medical-o1" and name == NAME:
        raise ValueError(f"--source {source} is an evaluation set: it cannot be written as the training file {NAME!r}")
    return name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="medical-o1", choices=["medical-o1", "pubmedqa", "medqa"])
    ap.add_argument("--input", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, default=Path("recipes/medical/data/generated"))
    ap.add_argument("--name", default=None, help=f"output file name (default: after the source and limit, {OUTPUT_NAMES})")
    args = ap.parse_args(argv)
    try:
        name = output_name(args.source, args.input, args.limit) if args.name is None else check_name(args.source, args.name)
    except ValueError as exc:
        ap.error(str(exc))
    rows = load(args.source, args.input)[: args.limit]
    paths = write_outputs(rows, args.out_dir, name)
    print(f"{len(rows)} rows -> {paths['llamafactory']} , {paths['swift']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
