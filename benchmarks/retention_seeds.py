"""SFT against EAFT on retention, several seeds, with intervals: the numbers of docs/reproduction.md's retention
section and of docs/retention.md's standard-error table.

SmolLM2-135M-Instruct, full fine-tune on the first --train-n GSM8K training examples (the shared data folder), a
plain transformers.Trainer (EAFT through `with_eaft`), the live monitor on with the default probe (`builtin`,
every --interval steps), and at the end every model read with the larger preset (`builtin-large`, one base
reference for all runs). Each run's output folder gets the monitor's files, so

    eaft-retention compare RUNS/sft_s0,RUNS/sft_s1,RUNS/sft_s2 RUNS/eaft_s0,RUNS/eaft_s1,RUNS/eaft_s2

reproduces the default-probe differences (and RUNS/large/... the large-probe ones); this script calls the same
function and writes everything to --json.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/retention_seeds.py --out /tmp/retention_seeds \\
        --json benchmarks/results/retention_seeds.json            # ~100 steps x 6 runs on one CPU thread
    ... --arms sft --seeds 0        # one run (runs already done are reused: --out/<arm>_s<seed>/done.json)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EAFT_SHARED_DATA", ROOT.parent / "shared" / "data"))


def gsm8k_rows(tok, n: int, cutoff: int) -> list:
    lines = (SHARED / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]
    rows = []
    for line in lines:
        r = json.loads(line)
        prompt = tok.apply_chat_template([{"role": "user", "content": r["question"]}], tokenize=False,
                                         add_generation_prompt=True)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(r["answer"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": (p_ids + a_ids)[:cutoff], "labels": ([-100] * len(p_ids) + a_ids)[:cutoff]})
    return rows


def large_monitor(tok, model, out: Path):
    """The builtin-large monitor with its base reference, built once (from the base model) and reused."""
    import torch

    from eaft_plugins.retention import RetentionMonitor
    from eaft_plugins.retention.probe import parse_probe

    spec = parse_probe("builtin-large")
    mon = RetentionMonitor(spec.rows, tok, name=spec.name)
    path = out / "large_reference.pt"
    if path.is_file() and mon.load_state_dicts([torch.load(path, weights_only=True)]) is None:
        return mon
    mon.build_reference(model)
    torch.save(mon.state_dict(), path)
    print(f"[seeds] builtin-large reference: {mon.capped[0]} of {mon.capped[1]} answers reached the cap", flush=True)
    return mon


def train_one(args, arm: str, seed: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from eaft_plugins.integrations.hf_trainer import with_eaft
    from eaft_plugins.retention import with_retention
    from eaft_plugins.tools.smollm2 import local_smollm2

    run_dir = out / f"{arm}_s{seed}"
    if (run_dir / "done.json").is_file():
        return json.loads((run_dir / "done.json").read_text())
    model_dir = str(local_smollm2())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    large = large_monitor(tok, model, out)
    targs = TrainingArguments(output_dir=str(run_dir), per_device_train_batch_size=args.batch, max_steps=args.steps,
                              logging_steps=args.interval, save_strategy="no", report_to="none",
                              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_ratio=0.1, seed=seed,
                              use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(gsm8k_rows(tok, args.train_n, args.cutoff)),
                      processing_class=tok, data_collator=DataCollatorForSeq2Seq(tok, padding=True,
                                                                                 label_pad_token_id=-100))
    if arm == "eaft":
        with_eaft(trainer, eaft_topk=20)
    with_retention(trainer, "builtin", steps=args.interval)
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    # The larger preset, read once at the end, written as a run folder of its own for eaft-retention compare.
    large_dir = out / "large" / f"{arm}_s{seed}"
    large_dir.mkdir(parents=True, exist_ok=True)
    table = large.measure_table(trainer.model)
    (large_dir / "retention_probe.json").write_text(json.dumps(large.identity(), indent=1))
    (large_dir / "retention_items.jsonl").write_text(
        json.dumps({"step": 0, "table": large.base.tolist()}) + "\n"
        + json.dumps({"step": args.steps, "table": table.tolist()}) + "\n")
    from eaft_plugins.retention.readings import readings

    final = readings(large.kinds, table, large.base)
    (large_dir / "retention.jsonl").write_text(json.dumps({"step": 0, **readings(large.kinds, large.base, large.base)})
                                               + "\n" + json.dumps({"step": args.steps, **final}) + "\n")
    cb = trainer._retention
    done = {"arm": arm, "seed": seed, "train_s": train_s, "probe_s": cb.seconds,
            "live": cb.history[-1], "large": final,
            "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    (run_dir / "done.json").write_text(json.dumps(done, indent=1))
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run folders (large: model-free, a few MB)")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--arms", default="sft,eaft")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--train-n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--cutoff", type=int, default=160)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--interval", type=int, default=25)
    ap.add_argument("--summary-only", action="store_true", help="only collect the finished runs")
    args = ap.parse_args(argv)
    if not (SHARED / "gsm8k" / "train.jsonl").is_file():
        print(f"needs the shared data folder {SHARED} (set EAFT_SHARED_DATA)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    runs = {}
    for seed in seeds:
        for arm in arms:
            if args.summary_only and not (out / f"{arm}_s{seed}" / "done.json").is_file():
                continue
            runs[f"{arm}_s{seed}"] = train_one(args, arm, seed, out)
            print(f"[seeds] {arm} seed {seed}: {runs[f'{arm}_s{seed}']['train_s']:.0f} s", flush=True)
    if not args.json:
        return 0
    from eaft_plugins.retention.plot import compare_groups, report

    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("summary_only", "json")}, "runs": runs}
    done = sorted({r["seed"] for r in runs.values() if all(f"{a}_s{r['seed']}" in runs for a in ("sft", "eaft"))})
    if done:
        for name, root in (("builtin", out), ("builtin-large", out / "large")):
            groups = {arm: [str(root / f"{arm}_s{s}") for s in done] for arm in ("sft", "eaft")}
            summary[f"compare_{name}"] = compare_groups(groups)
            print(f"probe {name}, seeds {done}:\n" + report(summary[f"compare_{name}"]), flush=True)
    # The standard error over items of each reading at the last step, per probe size (mean and range over runs).
    from eaft_plugins.retention.readings import CHANGES

    summary["se_by_size"] = {}
    for size, part in (("builtin", "live"), ("builtin-large", "large")):
        per = {k: [r[part].get(f"retention/{k}_se") for r in runs.values()] for k in CHANGES}
        summary["se_by_size"][size] = {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)}
                                       for k, v in per.items() if v and None not in v}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    return 0


def markdown(summary: dict) -> str:
    """The tables of docs/reproduction.md and docs/retention.md, from the summary."""
    lines = []
    for name in ("builtin", "builtin-large"):
        result = summary.get(f"compare_{name}")
        if not result:
            continue
        runs = result["differences"]["eaft"]["kl_base"]["runs"]
        lines += [f"\nprobe `{name}`, step {result['step']}, {runs[0]} SFT and {runs[1]} EAFT runs:",
                  "", "| reading | SFT | EAFT | EAFT - SFT [95% interval] | reading |", "|---|---:|---:|---:|---|"]
        for key, d in result["differences"]["eaft"].items():
            ci = d["ci"]
            verdict = "within noise" if d["within_noise"] else ("EAFT higher" if d["diff"] > 0 else "EAFT lower")
            lines.append(f"| `{key}` | {d['a']:+.4f} | {d['b']:+.4f} | {d['diff']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}] "
                         f"| {verdict} |")
    se = summary.get("se_by_size", {})
    if se:
        keys = list(next(iter(se.values())))
        lines += ["", "| probe | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
        for size, row in se.items():
            lines.append(f"| `{size}` | " + " | ".join(
                f"{row[k]['mean']:.4f} ({row[k]['min']:.4f}-{row[k]['max']:.4f})" if k in row else "-"
                for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
