"""Retention curves: `retention.png` at the end of a run, and `eaft-retention compare RUN_DIR RUN_DIR ...`.

A run's values are read from, in order: `retention.jsonl` (written by the monitor on rank 0),
`trainer_state.json` (`log_history`: transformers, TRL, LLaMA-Factory), `logging.jsonl` (ms-swift, whose
output_dir gains a `vN-...` folder: the newest one is read when RUN_DIR is its parent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .monitor import PREFIX

PANELS = (("kl_base", "KL(base || current) per token, lower bound"), ("text_nll_delta", "general text NLL change"),
          ("mc_logp_delta", "log p(right MC answer) change"))


def _rows_of(entries) -> List[dict]:
    out = []
    for e in entries:
        if not any(str(k).startswith(PREFIX) for k in e):
            continue
        step = e.get("step")
        if step is None and "global_step/max_steps" in e:  # ms-swift: "5/10"
            step = int(str(e["global_step/max_steps"]).split("/")[0])
        out.append({"step": step, **{k: v for k, v in e.items() if str(k).startswith(PREFIX)}})
    return out


def _jsonl(path: Path) -> List[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def read_run(run_dir) -> List[dict]:
    """The retention rows ({"step", "retention/...": value}) of a run directory; ValueError when it has none."""
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"{run_dir}: not a directory")
    candidates = [root]
    versions = sorted((p for p in root.glob("v*-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    candidates += versions[::-1]
    for d in candidates:
        for name, read in (("retention.jsonl", _jsonl), ("trainer_state.json",
                                                         lambda p: json.loads(p.read_text())["log_history"]),
                           ("logging.jsonl", _jsonl)):
            if (d / name).is_file():
                rows = _rows_of(read(d / name))
                if rows:
                    return rows
    raise ValueError(f"{run_dir}: no retention/* values in retention.jsonl, trainer_state.json or logging.jsonl; "
                     "was the run trained with retention_probe set?")


def plot_runs(runs: Dict[str, List[dict]], path) -> Optional[Path]:
    """Three panels (KL, text NLL change, MC log-prob change) against the step, one line per run.
    Without matplotlib: a one-line note and None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[eaft-plugins] matplotlib is not installed: no {Path(path).name} (pip install matplotlib); "
              "the values are in retention.jsonl and the trainer's logs", flush=True)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        for name, rows in runs.items():
            pts = [(r["step"], r[PREFIX + key]) for r in rows if PREFIX + key in r and r["step"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.axhline(0, color="k", lw=0.6, ls=":")
        ax.legend(fontsize=7)
    fig.suptitle("retention on the probe set (0 = the model before fine-tuning)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="eaft-retention", description="Retention curves of fine-tuning runs.")
    sub = ap.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="draw several runs (e.g. SFT and EAFT) on one figure")
    cmp.add_argument("runs", nargs="+", help="run output directories")
    cmp.add_argument("--labels", default=None, help="comma-separated names (default: the directory names)")
    cmp.add_argument("--out", default="retention_compare.png")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [Path(r).resolve().name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error(f"--labels gives {len(labels)} names for {len(args.runs)} runs")
    try:
        runs = {label: read_run(r) for label, r in zip(labels, args.runs)}
    except ValueError as exc:
        print(f"eaft-retention: {exc}", file=sys.stderr)
        return 2
    for label, rows in runs.items():
        last = rows[-1]
        print(f"{label}: {len(rows)} points, last step {last['step']}: " + ", ".join(
            f"{k[len(PREFIX):]}={v:.4f}" for k, v in last.items() if k.startswith(PREFIX)))
    path = plot_runs(runs, args.out)
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
