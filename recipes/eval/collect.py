"""Collect EvalScope reports into the paper's table: target scores, target avg, general scores,
general avg, and the change of each average against the base model.

Input: one folder per run (base, sft, sft_kl, flow, dft, talr, eaft, ...: recipes/row.sh's METHOD) under RESULTS,
listed in the paper's row order (a missing row of the paper's table is warned about), each holding EvalScope's output
(`<timestamp>/reports/<model>/<dataset>.json`, scores in [0, 1]); run recipes/eval/run_eval.sh
with RUN_NAME = the folder name. Later timestamps win when a dataset was evaluated twice.
  python recipes/eval/collect.py --domain math results/math [--base base] [--metric ifeval=prompt_level_strict]
Writes RESULTS/table.md and RESULTS/table.csv (scores in percent) and prints the markdown.
IFEval is read as EvalScope's inst_level_strict (DEFAULT_METRIC): the paper's IFEval scores are not
all attainable as prompt-level scores (k/541) nor pooled over the 834 instructions (recipes/eval/attainable.py,
docs/evaluation.md); other datasets use their report's first metric.
AIME24/25 scores are the mean over several samples per problem (run_eval.sh: AIME_REPEATS, EvalScope
--repeats); the table notes how many each run had and warns below MIN_REPEATS.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

# (column, EvalScope dataset_name, subset or None for the dataset's overall score)
TARGETS = {
    "math": [("AIME24", "aime24", None), ("AIME25", "aime25", None), ("GSM8K", "gsm8k", None)],
    "medical": [("MedMCQA", "med_mcqa", None), ("MedQA", "general_mcq", "medqa"), ("PubMedQA", "pubmedqa", None)],
    "agent": [("BFCL v3", "bfcl_v3", None)],
}
TARGET_AVG = {"math": "Math Avg.", "medical": "Medical Avg.", "agent": "Target Avg."}
GENERAL = [("MMLU", "mmlu", None), ("IFEval", "ifeval", None), ("CLUEWSC", "general_mcq", "cluewsc")]
# Metrics read instead of a report's first one (the choice is argued in docs/evaluation.md).
DEFAULT_METRIC = {"ifeval": "inst_level_strict"}
# Problems per benchmark scored from repeated samples: report num / problems = samples per problem.
REPEATED = {"aime24": 30, "aime25": 30}
MIN_REPEATS = 8  # one sample of 30 problems at temperature 0.7 moves the score by about +-9 points
# Run folders (recipes/row.sh METHOD) in the paper's row order; eaft_hard is the ablation, after the table.
ORDER = ["base", "sft", "sft_kl", "flow", "dft", "talr", "eaft", "eaft_hard"]
TITLES = {"sft": "SFT", "sft_kl": "SFT-KL", "flow": "FLOW", "dft": "DFT", "talr": "TALR", "eaft": "EAFT"}

# The paper's numbers (README tables of PRIS-CV/EAFT, arXiv 2601.02151), for side-by-side rows.
PAPER = {
    "math": {
        "Qwen3-4B-Instruct": [63.3, 47.4, 94.3, 68.3, 77.1, 81.0, 85.2, 81.1],
        "+ SFT": [63.3, 50.0, 94.8, 69.4, 76.5, 79.5, 74.5, 76.5],
        "+ SFT-KL": [63.3, 50.0, 93.6, 69.0, 74.5, 74.9, 89.4, 79.6],
        "+ FLOW": [66.7, 46.7, 94.3, 69.2, 76.2, 78.3, 82.8, 79.1],
        "+ DFT": [56.7, 40.0, 93.9, 63.5, 75.9, 77.0, 81.4, 78.1],
        "+ TALR": [50.0, 50.0, 93.3, 64.4, 76.2, 78.1, 74.5, 76.2],
        "+ EAFT": [60.0, 53.3, 94.5, 69.3, 76.6, 80.1, 83.7, 80.1],
    },
    "medical": {
        "Qwen3-4B-Thinking": [63.5, 78.2, 76.0, 72.6, 79.3, 85.0, 94.1, 86.1],
        "+ SFT": [63.3, 79.5, 78.0, 73.6, 78.3, 75.3, 90.4, 81.3],
        "+ EAFT": [63.9, 80.0, 77.2, 73.7, 80.1, 81.7, 91.8, 84.5],
    },
    "agent": {
        # the paper's agent table has one target column; its "target avg" is that column
        "Qwen3-4B-Instruct": [60.5, 60.5, 77.1, 81.0, 85.2, 81.1],
        "+ SFT": [61.4, 61.4, 74.5, 77.8, 72.2, 74.8],
        "+ EAFT": [60.8, 60.8, 76.1, 78.6, 77.7, 77.5],
    },
}


def paper_columns(domain: str) -> List[str]:
    """The columns of the paper's table for a domain (PAPER rows follow them)."""
    return [c for c, _, _ in TARGETS[domain]] + [TARGET_AVG[domain]] + [c for c, _, _ in GENERAL] + ["General Avg."]


def _metric(report: dict, name: Optional[str]) -> dict:
    metrics = report.get("metrics") or []
    if not metrics:
        raise ValueError(f"report {report.get('dataset_name')!r} has no metrics")
    if name is None:
        return metrics[0]  # EvalScope's own report score is its first metric
    for m in metrics:
        if m["name"] == name:
            return m
    raise ValueError(f"{report.get('dataset_name')}: no metric {name!r}; has {[m['name'] for m in metrics]}")


def read_run(run_dir: Path, metric_for: Dict[str, str]) -> Dict[Tuple[str, Optional[str]], float]:
    """{(dataset, None): overall, (dataset, subset): subset score}, in [0, 1]."""
    scores = {}
    for path in sorted(run_dir.rglob("reports/*/*.json")):  # timestamp folders sort chronologically
        report = json.loads(path.read_text())
        ds = report["dataset_name"]
        metric = _metric(report, metric_for.get(ds))
        scores[(ds, None)] = float(metric["score"] if ds in metric_for else report.get("score", metric["score"]))
        for cat in metric.get("categories", []):
            for sub in cat.get("subsets", []):
                scores[(ds, sub["name"])] = float(sub["score"])
    return scores


def samples_per_problem(run_dir: Path) -> Dict[str, float]:
    """{dataset: samples per problem} for REPEATED datasets (latest report wins)."""
    out = {}
    for path in sorted(run_dir.rglob("reports/*/*.json")):
        report = json.loads(path.read_text())
        ds = report["dataset_name"]
        if ds in REPEATED:
            num = _metric(report, None).get("num") or report.get("num") or 0
            out[ds] = num / REPEATED[ds]
    return out


def _avg(values: List[Optional[float]]) -> Optional[float]:
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def build_rows(domain: str, runs: Dict[str, Dict], base: str) -> List[dict]:
    cols = TARGETS[domain] + GENERAL
    rows = []
    for name, scores in runs.items():
        row = {"method": name}
        for col, ds, sub in cols:
            v = scores.get((ds, sub))
            row[col] = None if v is None else 100.0 * v
        row["target_avg"] = _avg([row[c] for c, _, _ in TARGETS[domain]])
        row["general_avg"] = _avg([row[c] for c, _, _ in GENERAL])
        rows.append(row)
    base_row = next((r for r in rows if r["method"] == base), None)
    for r in rows:
        for key in ("target_avg", "general_avg"):
            b = None if base_row is None else base_row[key]
            r[f"{key}_delta"] = None if b is None or r[key] is None else r[key] - b
    return rows


def _fmt(v: Optional[float], signed: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def to_markdown(domain: str, rows: List[dict], with_paper: bool = False) -> str:
    tcols = [c for c, _, _ in TARGETS[domain]]
    gcols = [c for c, _, _ in GENERAL]
    head = ["Method", *paper_columns(domain)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], *[_fmt(r[c]) for c in tcols]]
        t = _fmt(r["target_avg"]) + (f" ({_fmt(r['target_avg_delta'], True)})" if r["target_avg_delta"] is not None else "")
        g = _fmt(r["general_avg"]) + (f" ({_fmt(r['general_avg_delta'], True)})" if r["general_avg_delta"] is not None else "")
        cells += [t, *[_fmt(r[c]) for c in gcols], g]
        lines.append("| " + " | ".join(cells) + " |")
    if with_paper:
        for name, vals in PAPER[domain].items():
            cells = [f"paper: {name}", *[_fmt(v) for v in vals]]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(domain: str, rows: List[dict]) -> str:
    cols = [c for c, _, _ in TARGETS[domain] + GENERAL]
    fields = ["method", *cols, "target_avg", "general_avg", "target_avg_delta", "general_avg_delta"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else (round(r[k], 4) if isinstance(r[k], float) else r[k])) for k in fields})
    return buf.getvalue()


def paper_rows(domain: str) -> List[str]:
    """The run folders of the paper's table for a domain (math: base, sft, sft_kl, flow, dft, talr, eaft)."""
    return ["base"] + [m for m, title in TITLES.items() if f"+ {title}" in PAPER[domain]]


def _order(names: List[str], base: str) -> List[str]:
    rank = {n: i for i, n in enumerate([base] + [o for o in ORDER if o != base])}
    return sorted(names, key=lambda n: (rank.get(n, len(rank)), n))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="folder with one sub-folder per run (base, sft, eaft, ...)")
    ap.add_argument("--domain", required=True, choices=sorted(TARGETS))
    ap.add_argument("--base", default="base", help="run the deltas are taken against")
    ap.add_argument("--metric", action="append", default=[],
                    help=f"DATASET=METRIC: use that metric instead of the report's first (defaults: {DEFAULT_METRIC})")
    ap.add_argument("--paper", action="store_true", help="append the paper's rows")
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-csv", type=Path, default=None)
    args = ap.parse_args(argv)

    metric_for = {**DEFAULT_METRIC, **dict(m.split("=", 1) for m in args.metric)}
    run_dirs = [p for p in args.results.iterdir() if p.is_dir() and any(p.rglob("reports/*/*.json"))]
    if not run_dirs:
        raise SystemExit(f"no EvalScope reports (*/reports/<model>/<dataset>.json) under {args.results}")
    runs = {n: read_run(args.results / n, metric_for) for n in _order([p.name for p in run_dirs], args.base)}
    if args.base not in runs:
        print(f"warning: no run named {args.base!r} under {args.results}: deltas left empty", file=sys.stderr)
    missing = [m for m in paper_rows(args.domain) if m not in runs and m != "base"]
    if missing:
        print(f"warning: rows of the paper's {args.domain} table without results under {args.results}: "
              f"{', '.join(missing)} (bash recipes/row.sh {args.domain} METHOD)", file=sys.stderr)
    rows = build_rows(args.domain, runs, args.base)
    md, table_csv = to_markdown(args.domain, rows, args.paper), to_csv(args.domain, rows)
    notes = [f"{ds} metric: {m}" for ds, m in sorted(metric_for.items())]
    for name in runs:
        for ds, k in samples_per_problem(args.results / name).items():
            notes.append(f"{name} {ds}: mean of {k:g} samples per problem")
            if k < MIN_REPEATS:
                print(f"warning: {name} {ds} scored from {k:g} samples per problem (< {MIN_REPEATS}): "
                      "rerun with AIME_REPEATS >= 8", file=sys.stderr)
    if notes:
        md += "\n" + "; ".join(notes) + ".\n"
    (args.out_md or args.results / "table.md").write_text(md)
    (args.out_csv or args.results / "table.csv").write_text(table_csv)
    print(md, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
