"""Retention curves and run comparisons: `retention.png` at the end of a run, and
`eaft-retention compare RUN RUN ...` (a RUN may be several seeds of one arm: DIR,DIR,DIR).

A run's curve is read from, in order: `retention.jsonl` (written by the monitor on rank 0),
`trainer_state.json` (`log_history`: transformers, TRL, LLaMA-Factory), `logging.jsonl` (ms-swift, whose
output_dir gains a `vN-...` folder: the newest one is read when RUN_DIR is its parent). `compare` also needs the
monitor's `retention_probe.json` (the probe's identity: runs on different probes are refused) and
`retention_items.jsonl` (per-item values: differences are paired by item, with a 95% interval).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional

from .readings import CHANGES, PREFIX, difference, unit_values

PANELS = (("kl_base", "KL(base || current) per token, lower bound"), ("text_nll_delta", "general text NLL change"),
          ("mc_prob_delta", "p(right choice) among the choices, change"))
IDENTITY_FIELDS = ("probe", "items", "tokenizer", "vocab", "template_sha1", "kl", "max_new_tokens", "version")


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


def _folders(run_dir) -> List[Path]:
    root = Path(run_dir)
    if not root.is_dir():
        raise ValueError(f"{run_dir}: not a directory")
    versions = sorted((p for p in root.glob("v*-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return [root] + versions[::-1]


def read_run(run_dir) -> List[dict]:
    """The retention rows ({"step", "retention/...": value}) of a run directory; ValueError when it has none."""
    for d in _folders(run_dir):
        for name, read in (("retention.jsonl", _jsonl), ("trainer_state.json",
                                                         lambda p: json.loads(p.read_text())["log_history"]),
                           ("logging.jsonl", _jsonl)):
            if (d / name).is_file():
                rows = _rows_of(read(d / name))
                if rows:
                    return rows
    raise ValueError(f"{run_dir}: no retention/* values in retention.jsonl, trainer_state.json or logging.jsonl; "
                     "was the run trained with retention_probe set?")


def read_items(run_dir):
    """(identity, {step: per-item table}) written by the monitor; ValueError naming what is missing."""
    for d in _folders(run_dir):
        if (d / "retention_probe.json").is_file():
            identity = json.loads((d / "retention_probe.json").read_text())
            items = d / "retention_items.jsonl"
            tables = {r["step"]: r["table"] for r in _jsonl(items)} if items.is_file() else {}
            if not tables:
                raise ValueError(f"{run_dir}: {items} holds no per-item values")
            return identity, tables
    raise ValueError(f"{run_dir}: no retention_probe.json (the probe's identity, written by the retention monitor "
                     "of eaft-plugins >= 0.1 in output_dir): cannot tell which probe the run measured on")


def check_same_probe(identities: Dict[str, dict]) -> None:
    """ValueError unless every run measured on the same probe (items, template, tokenizer, settings)."""
    (first, ref), *rest = identities.items()
    for name, ident in rest:
        if ident.get("fingerprint") != ref.get("fingerprint"):
            differ = [f"{k}: {ref.get(k)!r} vs {ident.get(k)!r}" for k in IDENTITY_FIELDS if ref.get(k) != ident.get(k)]
            raise ValueError(f"{first} and {name} were measured on different probes (fingerprint "
                             f"{ref.get('fingerprint')} vs {ident.get('fingerprint')}"
                             f"{'; ' + '; '.join(differ) if differ else '; the same settings but other token ids'}); "
                             "their readings are not comparable: measure both with the same retention_probe, "
                             "tokenizer and chat template")


def compare_groups(groups: Dict[str, List[str]], step: Optional[int] = None) -> dict:
    """Paired differences of each later group against the first, on CHANGES, at `step` (default: the last step
    every run measured). groups: {label: [run dir, ...]} (several dirs: seeds of one arm)."""
    loaded = {label: [read_items(d) for d in dirs] for label, dirs in groups.items()}
    check_same_probe({f"{label}[{i}] ({groups[label][i]})": ident for label, runs in loaded.items()
                      for i, (ident, _) in enumerate(runs)})
    common = set.intersection(*(set(t) for runs in loaded.values() for _, t in runs))
    if step is None:
        if not common:
            raise ValueError("the runs share no measured step")
        step = max(common)
    elif step not in common:
        raise ValueError(f"step {step} was not measured in every run (common steps: {sorted(common)})")
    values = {label: [unit_values(ident["kinds"], tables[step], ident["base"]) for ident, tables in runs]
              for label, runs in loaded.items()}
    (first, base_runs), *others = values.items()
    out = {"step": step, "baseline": first, "probe": loaded[first][0][0]["fingerprint"], "differences": {}}
    for label, runs in others:
        out["differences"][label] = {key: difference([r[key] for r in base_runs], [r[key] for r in runs])
                                     for key in CHANGES if key in base_runs[0]}
    return out


def report(result: dict) -> str:
    lines = [f"differences at step {result['step']} against {result['baseline']} (probe {result['probe']}); "
             "95% interval over probe items (and over seeds where an arm has several runs):"]
    for label, diffs in result["differences"].items():
        for key, d in diffs.items():
            ci = d["ci"]
            verdict = ("within noise (the interval holds 0)" if d["within_noise"]
                       else f"{label} {'higher' if d['diff'] > 0 else 'lower'}")
            interval = f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "[no interval: one item]"
            lines.append(f"  {label} - {result['baseline']}  {key:<22} {d['b']:+.4f} vs {d['a']:+.4f}: "
                         f"{d['diff']:+.4f} {interval}  {verdict}")
    return "\n".join(lines)


def plot_runs(runs: Dict[str, List[dict]], path) -> Optional[Path]:
    """Three panels (KL, text NLL change, MC change) against the step, one line per run (runs whose label ends in
    `#N` share the colour of their group). Without matplotlib: a one-line note and None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"[eaft-plugins] matplotlib is not installed: no {Path(path).name} (pip install matplotlib); "
              "the values are in retention.jsonl and the trainer's logs", flush=True)
        return None
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = {}
    for ax, (key, title) in zip(axes, PANELS):
        for name, rows in runs.items():
            group = name.split("#")[0]
            colour = colours.setdefault(group, f"C{len(colours)}")
            pts = [(r["step"], r[PREFIX + key]) for r in rows if PREFIX + key in r and r["step"] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=colour,
                        label=group if name in (group, group + "#0") else None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.axhline(0, color="k", lw=0.6, ls=":")
        if ax.get_legend_handles_labels()[0]:
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
    cmp = sub.add_parser("compare", help="compare runs (e.g. SFT and EAFT): paired differences with 95%% intervals "
                                         "against the first, and one figure")
    cmp.add_argument("runs", nargs="+", help="run output directories; DIR,DIR,... = several seeds of one arm")
    cmp.add_argument("--labels", default=None, help="comma-separated names (default: the directory names)")
    cmp.add_argument("--step", type=int, default=None, help="compare at this step (default: the last common one)")
    cmp.add_argument("--out", default="retention_compare.png")
    cmp.add_argument("--json", default=None, help="also write the differences as JSON")
    args = ap.parse_args(argv)
    groups = [r.split(",") for r in args.runs]
    labels = args.labels.split(",") if args.labels else [Path(g[0]).resolve().name for g in groups]
    if len(labels) != len(groups):
        ap.error(f"--labels gives {len(labels)} names for {len(groups)} runs")
    try:
        curves = {(label if len(g) == 1 else f"{label}#{i}"): read_run(d)
                  for label, g in zip(labels, groups) for i, d in enumerate(g)}
        result = compare_groups(dict(zip(labels, groups)), args.step) if len(groups) > 1 else None
    except ValueError as exc:
        print(f"eaft-retention: {exc}", file=sys.stderr)
        return 2
    for label, rows in curves.items():
        last = rows[-1]
        print(f"{label}: {len(rows)} points, last step {last['step']}: " + ", ".join(
            f"{k[len(PREFIX):]}={v:.4f}" for k, v in last.items() if k.startswith(PREFIX) and not k.endswith("_se")))
    if result is not None:
        print(report(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    path = plot_runs(curves, args.out)
    if path is not None:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
