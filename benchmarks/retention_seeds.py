"""Fine-tuning methods against each other on the target and on retention, several seeds, with intervals: the numbers
of docs/reproduction.md's retention and method-comparison sections and of docs/retention.md's standard-error table.

SmolLM2-135M-Instruct, full fine-tune on the first --train-n GSM8K training examples (the shared data folder), a
plain transformers.Trainer: SFT as is, EAFT / SFT-KL / FLOW / TALR through this package's `with_loss`, DFT through
TRL's own `dft_loss` (a framework's implementation, not a copy). The live monitor is on with the default probe
(`builtin`, every --interval steps); at the end every model is read with the larger preset (`builtin-large`, one base
reference for all runs) and on the target: the NLL per answer token of the first --target-n GSM8K *test* answers
under the chat template (held out; the base model's reading is stored once). Each run's output folder gets the
monitor's files, so

    eaft-retention compare RUNS/sft_s0,RUNS/sft_s1,RUNS/sft_s2 RUNS/eaft_s0,RUNS/eaft_s1,RUNS/eaft_s2

reproduces the default-probe differences (and RUNS/large/... the large-probe ones); this script calls the same
function and writes everything to --json.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/retention_seeds.py --out /tmp/retention_seeds \\
        --json benchmarks/results/retention_seeds.json            # SFT and EAFT, 3 seeds (docs/retention.md)
    ... --arms sft,sft_kl,flow,dft,talr,eaft --seeds 0,1 --out /tmp/methods \\
        --json benchmarks/results/methods_seeds.json              # the six methods (docs/reproduction.md)
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
ARMS = ("sft", "sft_kl", "flow", "dft", "talr", "eaft")  # the paper's math-table order; sft: the baseline


def gsm8k_rows(tok, n: int, cutoff: int, split: str = "train") -> list:
    lines = (SHARED / "gsm8k" / f"{split}.jsonl").read_text().splitlines()[:n]
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


def target_items(model, rows) -> list:
    """[summed NLL of the answer tokens, answer tokens] per held-out row (the target reading, a ratio over items)."""
    import torch

    items = []
    model.eval()
    with torch.no_grad():
        for r in rows:
            ids = torch.tensor([r["input_ids"]])
            labels = torch.tensor(r["labels"][1:])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            keep = labels != -100
            nll = -lp[keep].gather(1, labels[keep, None]).sum()
            items.append([float(nll), int(keep.sum())])
    model.train()
    return items


def base_target(tok, model, args, out: Path) -> list:
    """The base model's target items, measured once and reused."""
    path = out / "target_base.json"
    if path.is_file():
        return json.loads(path.read_text())
    items = target_items(model, gsm8k_rows(tok, args.target_n, args.cutoff, "test"))
    path.write_text(json.dumps(items))
    return items


def with_method(trainer, arm: str):
    """The arm's loss on a built Trainer: SFT as is, DFT as TRL computes it, the others through this package."""
    from eaft_plugins.integrations.hf_trainer import with_loss

    if arm == "dft":
        from trl.trainer.sft_trainer import dft_loss

        trainer.compute_loss_func = dft_loss
    elif arm == "eaft":
        with_loss(trainer, "eaft", eaft_topk=20)
    elif arm != "sft":
        with_loss(trainer, arm)


def train_one(args, arm: str, seed: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from eaft_plugins.retention import with_retention
    from eaft_plugins.tools.smollm2 import local_smollm2

    run_dir = out / f"{arm}_s{seed}"
    if (run_dir / "done.json").is_file():
        return json.loads((run_dir / "done.json").read_text())
    model_dir = str(local_smollm2())
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    large = large_monitor(tok, model, out)
    base_target(tok, model, args, out)
    targs = TrainingArguments(output_dir=str(run_dir), per_device_train_batch_size=args.batch, max_steps=args.steps,
                              logging_steps=args.interval, save_strategy="no", report_to="none",
                              learning_rate=args.lr, lr_scheduler_type="cosine", warmup_ratio=0.1, seed=seed,
                              use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(gsm8k_rows(tok, args.train_n, args.cutoff)),
                      processing_class=tok, data_collator=DataCollatorForSeq2Seq(tok, padding=True,
                                                                                 label_pad_token_id=-100))
    with_method(trainer, arm)
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
            "target": target_items(trainer.model, gsm8k_rows(tok, args.target_n, args.cutoff, "test")),
            "train_loss": [h["loss"] for h in trainer.state.log_history if "loss" in h]}
    (run_dir / "done.json").write_text(json.dumps(done, indent=1))
    return done


def pairs(items) -> tuple:
    """[[x, n], ...] -> (xs, ns), the shape `difference` takes."""
    return [x for x, _ in items], [n for _, n in items]


def from_base(dirs) -> dict:
    """Each retention reading's change from the base model over one arm's runs, paired by item, with its interval."""
    from eaft_plugins.retention.plot import read_items
    from eaft_plugins.retention.readings import CHANGES, difference, unit_values

    loaded = [read_items(d) for d in dirs]
    step = max(set.intersection(*(set(tables) for _, tables in loaded)))
    start = [unit_values(ident["kinds"], ident["base"], ident["base"]) for ident, _ in loaded]
    final = [unit_values(ident["kinds"], tables[step], ident["base"]) for ident, tables in loaded]
    return {k: difference([v[k] for v in start], [v[k] for v in final]) for k in CHANGES if k in final[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="run folders (large: model-free, a few MB)")
    ap.add_argument("--json", default=None, help="write the summary here")
    ap.add_argument("--arms", default="sft,eaft", help=f"comma-separated, sft first (the baseline): {','.join(ARMS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--train-n", type=int, default=100)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--cutoff", type=int, default=160)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--interval", type=int, default=25)
    ap.add_argument("--target-n", type=int, default=64, help="held-out GSM8K test answers of the target reading")
    ap.add_argument("--summary-only", action="store_true", help="only collect the finished runs")
    args = ap.parse_args(argv)
    if not args.summary_only and not (SHARED / "gsm8k" / "train.jsonl").is_file():
        print(f"needs the shared data folder {SHARED} (set EAFT_SHARED_DATA)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    if arms[0] != "sft" or not set(arms) <= set(ARMS):
        print(f"--arms: sft first, then any of {list(ARMS[1:])}; got {args.arms}", file=sys.stderr)
        return 2
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
    from eaft_plugins.retention.readings import difference

    summary = {"settings": {k: v for k, v in vars(args).items() if k not in ("summary_only", "json")}, "runs": runs}
    done = sorted({r["seed"] for r in runs.values() if all(f"{a}_s{r['seed']}" in runs for a in arms)})
    if done:
        for name, root in (("builtin", out), ("builtin-large", out / "large")):
            groups = {arm: [str(root / f"{arm}_s{s}") for s in done] for arm in arms}
            summary[f"compare_{name}"] = compare_groups(groups)
            summary[f"from_base_{name}"] = {arm: from_base(dirs) for arm, dirs in groups.items()}
            print(f"probe {name}, seeds {done}:\n" + report(summary[f"compare_{name}"]), flush=True)
        base = json.loads((out / "target_base.json").read_text())
        target = {arm: [runs[f"{arm}_s{s}"]["target"] for s in done] for arm in arms}
        summary["target"] = {"from_base": {arm: difference([pairs(base)], [pairs(t) for t in ts])
                                           for arm, ts in target.items()},
                             "vs_sft": {arm: difference([pairs(t) for t in target["sft"]], [pairs(t) for t in ts])
                                        for arm, ts in target.items() if arm != "sft"}}
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


TITLES = {"sft": "SFT", "sft_kl": "SFT-KL", "flow": "FLOW", "dft": "DFT", "talr": "TALR", "eaft": "EAFT"}


def _ci(d: dict) -> str:
    ci = d["ci"]
    return f"{d['diff']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else f"{d['diff']:+.4f} [no interval]"


def markdown(summary: dict) -> str:
    """The tables of docs/reproduction.md and docs/retention.md, from the summary."""
    lines = []
    target = summary.get("target")
    large = summary.get("from_base_builtin-large")
    if target and large:
        keys = ("kl_base", "text_nll_delta", "mc_prob_delta")
        lines += ["\nchange from the base model (95% interval over items and seeds); target: NLL per answer token of "
                  "held-out GSM8K test answers (lower is better); retention: `builtin-large` readings:", "",
                  "| method | target NLL change | " + " | ".join(f"`{k}`" for k in keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        for arm, d in target["from_base"].items():
            lines.append(f"| {TITLES[arm]} | {_ci(d)} | " + " | ".join(_ci(large[arm][k]) for k in keys) + " |")
        lines += ["", "the same, each method minus SFT (paired by item):", "",
                  "| method | target NLL | " + " | ".join(f"`{k}`" for k in keys) + " |",
                  "|---|---:|" + "---:|" * len(keys)]
        diffs = summary["compare_builtin-large"]["differences"]
        for arm, d in target["vs_sft"].items():
            lines.append(f"| {TITLES[arm]} - SFT | {_ci(d)} | " + " | ".join(_ci(diffs[arm][k]) for k in keys) + " |")
    for name in ("builtin", "builtin-large"):
        result = summary.get(f"compare_{name}")
        if not result:
            continue
        for arm, diffs in result["differences"].items():
            title, runs = TITLES[arm], diffs["kl_base"]["runs"]
            lines += [f"\nprobe `{name}`, step {result['step']}, {runs[0]} SFT and {runs[1]} {title} runs:", "",
                      f"| reading | SFT | {title} | {title} - SFT [95% interval] | reading |", "|---|---:|---:|---:|---|"]
            for key, d in diffs.items():
                verdict = "within noise" if d["within_noise"] else f"{title} {'higher' if d['diff'] > 0 else 'lower'}"
                lines.append(f"| `{key}` | {d['a']:+.4f} | {d['b']:+.4f} | {_ci(d)} | {verdict} |")
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
