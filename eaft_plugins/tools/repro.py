"""eaft-repro: CPU-scale reproduction of "EAFT learns the target and forgets less than SFT".

Fine-tunes SmolLM2-135M-Instruct on math with plain SFT and with EAFT (same seed, data and
hyperparameters) through the real `llamafactory-cli train`, then measures
  target:  greedy exact-match accuracy on held-out math, and NLL of their reference answers;
  general: multiple-choice accuracy by log-likelihood ranking and mean log-prob of the right
           answer, mean KL(base || tuned) along the base model's answers to general prompts,
           NLL of general text.
Each figure carries a bootstrap 95% interval over evaluation items (seed-averaged per item).

  eaft-repro                       # offline data (eaft_plugins.tools.mathgen + eaft_plugins/data)
  eaft-repro --data-dir ../shared/data --train-n 300 --lrs 5e-5,2e-4 --seeds 0,1,2
  eaft-repro --controls            # + step-matched SFT, EAFT weight_norm=mean, shuffled gate
  eaft-repro --quick               # a few steps and items (tests)

Runs are cached in --out/runs/<name>/eval.json and reused when their settings match.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from . import mathgen
from ..retention.monitor import RetentionMonitor
from ..retention.probe import Row
from .evaluation import (bootstrap_ci, encode_pair, end_token, generate, load_model, paired_delta_ci, rank_choices,
                         render_prompt, sequence_logprobs, write_json)

DATA = Path(__file__).resolve().parents[1] / "data"
# SmolLM2's chat template adds this system prompt when none is given; training uses it too.
SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ARMS = ("sft", "eaft")
CONTROL_ARMS = ("sft", "eaft", "sft_stepmatched", "eaft_meannorm", "eaft_shuffle")
METRICS = {  # name: (label, higher is better)
    "target_acc": ("target: math exact match", True),
    "target_nll": ("target: answer NLL/token", False),
    "mc_acc": ("general: MC accuracy", True),
    "mc_logprob": ("general: log p(right answer)", True),
    "kl": ("general: KL(base||tuned)/token", False),
    "text_nll": ("general: text NLL/token", False),
}


@dataclass
class Settings:
    model: str
    data_dir: Optional[str] = None
    train_n: int = 160
    eval_n: int = 40
    mc_n: int = 60
    prompts_n: int = 30
    texts_n: int = 24
    lrs: List[float] = field(default_factory=lambda: [2e-4])
    seeds: List[int] = field(default_factory=lambda: [0])
    max_steps: int = 40
    batch_size: int = 4
    grad_accum: int = 1
    cutoff: int = 256
    warmup_ratio: float = 0.1
    max_new_tokens: int = 80
    general_new_tokens: int = 48
    eval_batch: int = 16
    controls: bool = False

    def train_spec(self) -> dict:
        keys = ("model", "data_dir", "train_n", "max_steps", "batch_size", "grad_accum", "cutoff", "warmup_ratio")
        return {k: getattr(self, k) for k in keys}

    def eval_spec(self) -> dict:
        keys = ("data_dir", "eval_n", "mc_n", "prompts_n", "texts_n", "max_new_tokens", "general_new_tokens")
        # kl / text_nll / mc_logprob come from the retention monitor (one implementation with the live one)
        return {**{k: getattr(self, k) for k in keys}, "general": "retention-monitor"}


# ----------------------------------------------------------------------------- data


def _jsonl(path) -> List[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_data(s: Settings) -> dict:
    """Training items (question/answer), held-out math, MC items, general prompts and texts."""
    prompts = json.loads((DATA / "general_prompts.json").read_text())[: s.prompts_n]
    texts = json.loads((DATA / "general_texts.json").read_text())[: s.texts_n]
    if s.data_dir:
        root = Path(s.data_dir)
        need = [root / "gsm8k" / "train.jsonl", root / "gsm8k" / "test.jsonl", root / "general" / "arc_challenge_test.jsonl"]
        missing = [str(p) for p in need if not p.exists()]
        if missing:
            raise FileNotFoundError(f"--data-dir {root} lacks {missing} (expected the shared data layout, see its README)")
        train = _jsonl(need[0])[: s.train_n]
        test = _jsonl(need[1])[: s.eval_n]
        mc = []
        for row in _jsonl(need[2])[: s.mc_n]:
            labels = [c["label"] for c in row["question"]["choices"]]
            mc.append({"question": row["question"]["stem"], "choices": [c["text"] for c in row["question"]["choices"]],
                       "answer": labels.index(row["answerKey"])})
        names = {"target": "GSM8K", "mc": "ARC-Challenge"}
    else:
        train = mathgen.generate(s.train_n, seed=1000)
        seen = {it["question"] for it in train}
        test = [it for it in mathgen.generate(s.eval_n * 3, seed=2000) if it["question"] not in seen][: s.eval_n]
        mc = json.loads((DATA / "general_mc.json").read_text())[: s.mc_n]
        names = {"target": "mathgen", "mc": "eaft_plugins/data/general_mc.json"}
    for it in test:
        it["final"] = mathgen.final_answer(it["answer"])
    return {"train": train, "test": test, "mc": mc, "prompts": prompts, "texts": texts, "names": names}


# ----------------------------------------------------------------------------- training


def arm_options(arm: str) -> dict:
    """LLaMA-Factory keys of an arm (beyond the shared ones)."""
    if arm in ("sft", "sft_stepmatched"):
        return {"use_eaft_loss": False}
    extra = {"eaft": {}, "eaft_meannorm": {"eaft_weight_norm": "mean"}, "eaft_shuffle": {"eaft_gate": "shuffle"}}[arm]
    return {"use_eaft_loss": True, **extra, "eaft_log_metrics": True}


def write_yaml(cfg: dict, path: Path) -> Path:
    # JSON scalars are valid YAML scalars.
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return path


def train(s: Settings, data_dir: Path, run_dir: Path, arm: str, lr: float, seed: int) -> Path:
    """Run `llamafactory-cli train` for one arm; returns the output (model) directory."""
    out = run_dir / "model"
    cfg = {
        "model_name_or_path": s.model, "stage": "sft", "do_train": True, "finetuning_type": "full",
        "dataset": "repro_math", "dataset_dir": str(data_dir), "template": "chatml", "default_system": SMOL_SYSTEM,
        "cutoff_len": s.cutoff, "output_dir": str(out), "overwrite_output_dir": True,
        "per_device_train_batch_size": s.batch_size, "gradient_accumulation_steps": s.grad_accum,
        "learning_rate": lr, "max_steps": s.max_steps, "lr_scheduler_type": "cosine", "warmup_ratio": s.warmup_ratio,
        "logging_steps": 1, "save_strategy": "no", "save_only_model": True, "report_to": "none",
        "seed": seed, "data_seed": seed, "bf16": False, "fp16": False, "dataloader_num_workers": 0,
        "preprocessing_num_workers": 1, "plot_loss": False, "disable_tqdm": True,
        **arm_options(arm),
    }
    yaml = write_yaml(cfg, run_dir / "train.yaml")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", DISABLE_VERSION_CHECK="1")
    cli = shutil.which("llamafactory-cli") or str(Path(sys.executable).with_name("llamafactory-cli"))
    with open(run_dir / "train.log", "w") as log:
        rc = subprocess.call([cli, "train", str(yaml)], stdout=log, stderr=subprocess.STDOUT, env=env)
    if rc != 0 or not (out / "trainer_state.json").exists():
        tail = (run_dir / "train.log").read_text()[-3000:]
        raise RuntimeError(f"llamafactory-cli train failed for {run_dir.name} (exit {rc}); log tail:\n{tail}")
    return out


def log_history(model_dir: Path) -> List[dict]:
    return json.loads((model_dir / "trainer_state.json").read_text())["log_history"]


def mean_eaft_weight(history: List[dict]) -> float:
    """Token-weighted mean of eaft/weight over the run's log entries."""
    rows = [h for h in history if "eaft/weight" in h]
    if not rows:
        raise RuntimeError("no eaft/weight in trainer_state.json log_history: the step-matched SFT control needs the "
                           "eaft-plugins LLaMA-Factory integration with eaft_log_metrics: true")
    tok = [h.get("eaft/tokens", 1.0) for h in rows]
    return sum(h["eaft/weight"] * t for h, t in zip(rows, tok)) / sum(tok)


# ----------------------------------------------------------------------------- evaluation


class Evaluator:
    """Holds the data, the base model and its general-prompt responses; scores any model per item."""

    def __init__(self, s: Settings, data: dict, device: Optional[str] = None, progress: bool = True):
        self.s, self.data, self.device, self.progress = s, data, device, progress
        self.base, self.tok = load_model(s.model, device)
        tok = self.tok
        # The general numbers (KL along the base's greedy answers, text NLL, right-choice log-prob) are the
        # retention monitor's, with the full base distribution stored (topk=None: the exact KL).
        rows = ([Row("prompt", p, where=f"general prompt {i + 1}") for i, p in enumerate(data["prompts"])]
                + [Row("text", t, where=f"general text {i + 1}") for i, t in enumerate(data["texts"])]
                + [Row("mc", it["question"], tuple(it["choices"]), it["answer"], f"MC item {i + 1}")
                   for i, it in enumerate(data["mc"])])
        self.general = RetentionMonitor(rows, tok, topk=None, max_new_tokens=s.general_new_tokens,
                                        batch_size=s.eval_batch)
        self.general.build_reference(self.base)
        self.ref_seqs = [encode_pair(tok, render_prompt(tok, it["question"]), it["answer"] + end_token(tok), s.cutoff * 2)
                         for it in data["test"]]

    def evaluate(self, model) -> Dict[str, List[float]]:
        s, tok, d = self.s, self.tok, self.data
        answers = generate(model, tok, [render_prompt(tok, it["question"]) for it in d["test"]], s.max_new_tokens,
                           s.eval_batch)
        acc = [float(_same_number(mathgen.final_answer(a), it["final"])) for a, it in zip(answers, d["test"])]
        ref = sequence_logprobs(model, tok, self.ref_seqs, s.eval_batch)
        mc = rank_choices(model, tok, d["mc"], s.cutoff * 2)
        general = self.general.per_item(model)
        kl = [0.0] * len(general["kl"]) if model is self.base else general["kl"]
        return {
            "target_acc": acc,
            "target_nll": [-lp / max(n, 1) for lp, n in ref],
            "mc_acc": [r["correct"] for r in mc],
            "mc_logprob": general["mc_logp"],
            "kl": kl,
            "text_nll": general["text_nll"],
            "_answers": answers[:5],
        }


def _same_number(a, b) -> bool:
    try:
        return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-6)
    except ValueError:
        return False


# ----------------------------------------------------------------------------- orchestration


def run_name(arm: str, lr: float, seed: int) -> str:
    return f"lr{lr:g}_s{seed}_{arm}"


def run_all(s: Settings, out: Path, device: Optional[str] = None, keep_models: bool = False, log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(s)
    data_dir = out / "data"
    mathgen.write_alpaca(data["train"], data_dir / "repro_math.json")
    (data_dir / "dataset_info.json").write_text(json.dumps({"repro_math": {"file_name": "repro_math.json"}}))
    arms = CONTROL_ARMS if s.controls else ARMS
    t0 = time.time()
    ev = Evaluator(s, data, device)
    base_eval = _cached(out / "base_eval.json", {"eval": s.eval_spec(), "model": s.model}, lambda: ev.evaluate(ev.base))
    log(f"[{time.time() - t0:6.0f}s] base evaluated")
    runs: Dict[str, dict] = {}
    for lr in s.lrs:
        for seed in s.seeds:
            for arm in arms:
                name = run_name(arm, lr, seed)
                run_dir = out / "runs" / name
                run_dir.mkdir(parents=True, exist_ok=True)
                lr_arm = lr
                if arm == "sft_stepmatched":
                    w = runs[run_name("eaft", lr, seed)]["mean_weight"]
                    lr_arm = lr * w
                spec = {"train": s.train_spec(), "eval": s.eval_spec(), "arm": arm, "lr": lr_arm, "seed": seed}

                def work():
                    model_dir = train(s, data_dir, run_dir, arm, lr_arm, seed)
                    model, _ = load_model(model_dir, device)
                    res = ev.evaluate(model)
                    del model
                    hist = log_history(model_dir)
                    res["_history"] = hist
                    if not keep_models:
                        for f in model_dir.glob("*.safetensors"):
                            f.unlink()
                    return res

                res = _cached(run_dir / "eval.json", spec, work)
                hist = res.get("_history", [])
                runs[name] = {"arm": arm, "lr": lr, "lr_used": lr_arm, "seed": seed, "eval": res,
                              "mean_weight": mean_eaft_weight(hist) if any("eaft/weight" in h for h in hist) else None,
                              "train_loss": [h["loss"] for h in hist if "loss" in h]}
                log(f"[{time.time() - t0:6.0f}s] {name}: " + ", ".join(
                    f"{k}={sum(res[k]) / len(res[k]):.4f}" for k in METRICS) +
                    (f", mean eaft/weight={runs[name]['mean_weight']:.3f}" if runs[name]["mean_weight"] else ""))
    results = aggregate(s, data, base_eval, runs, arms)
    write_json(out / "results.json", results)
    (out / "table.md").write_text(format_table(results))
    plot_bars(results, out / "repro_bars.png")
    plot_weights(runs, out / "repro_weight.png")
    return results


def _cached(path: Path, spec: dict, compute):
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("spec") == spec:
            return saved["result"]
    result = compute()
    write_json(path, {"spec": spec, "result": result})
    return result


def summarize_metric(per_seed: List[List[float]], base: List[float]) -> dict:
    """Seed-averaged per-item values -> mean with bootstrap CI; paired delta vs base with CI."""
    items = [sum(v) / len(v) for v in zip(*per_seed)]
    mean, lo, hi = bootstrap_ci(items)
    d, dlo, dhi = paired_delta_ci(items, base)
    return {"mean": mean, "ci": [lo, hi], "delta": d, "delta_ci": [dlo, dhi],
            "per_seed": [sum(v) / len(v) for v in per_seed], "n_items": len(items)}


def aggregate(s: Settings, data: dict, base_eval: dict, runs: Dict[str, dict], arms) -> dict:
    base = {}
    for k in METRICS:
        m, lo, hi = bootstrap_ci(base_eval[k])
        base[k] = {"mean": m, "ci": [lo, hi], "n_items": len(base_eval[k])}
    table = {}
    for lr in s.lrs:
        for arm in arms:
            sel = [r for r in runs.values() if r["arm"] == arm and r["lr"] == lr]
            entry = {k: summarize_metric([r["eval"][k] for r in sel], base_eval[k]) for k in METRICS}
            entry["seeds"] = [r["seed"] for r in sel]
            entry["lr_used"] = [r["lr_used"] for r in sel]
            weights = [r["mean_weight"] for r in sel if r["mean_weight"] is not None]
            entry["mean_eaft_weight"] = sum(weights) / len(weights) if weights else None
            table[f"lr={lr:g} {arm}"] = entry
    return {"settings": asdict(s), "data": data["names"], "base": base,
            "arms": table, "runs": {n: {k: v for k, v in r.items() if k != "eval"} for n, r in runs.items()}}


def format_table(results: dict) -> str:
    keys = list(METRICS)
    head = "| model | " + " | ".join(METRICS[k][0] for k in keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    fmt = lambda e: f"{e['mean']:.3f} [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"  # noqa: E731
    lines.append("| base | " + " | ".join(fmt(results["base"][k]) for k in keys) + " |")
    for name, e in results["arms"].items():
        cells = [f"{fmt(e[k])}<br>Δ {e[k]['delta']:+.3f} [{e[k]['delta_ci'][0]:+.3f}, {e[k]['delta_ci'][1]:+.3f}]" for k in keys]
        lines.append(f"| {name} (seeds {','.join(map(str, e['seeds']))}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_table(results: dict) -> None:
    keys = list(METRICS)
    short = {"target_acc": "tgt acc", "target_nll": "tgt NLL", "mc_acc": "MC acc", "mc_logprob": "MC logp",
             "kl": "KL", "text_nll": "text NLL"}
    print(f"{'model':28s}" + "".join(f"{short[k]:>24s}" for k in keys))
    print(f"{'base':28s}" + "".join(f"{results['base'][k]['mean']:>24.4f}" for k in keys))
    for name, e in results["arms"].items():
        print(f"{name:28s}" + "".join(f"{e[k]['mean']:>10.4f} (Δ{e[k]['delta']:+.4f})".rjust(24) for k in keys))
    print("Δ: change vs base; 95% bootstrap intervals over items in results.json / table.md")


def plot_bars(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["arms"])
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, k in zip(axes.flat, METRICS):
        means = [results["arms"][n][k]["mean"] for n in names]
        lo = [m - results["arms"][n][k]["ci"][0] for m, n in zip(means, names)]
        hi = [results["arms"][n][k]["ci"][1] - m for m, n in zip(means, names)]
        colors = ["tab:orange" if "eaft" in n else "tab:blue" for n in names]
        ax.bar(range(len(names)), means, yerr=[lo, hi], color=colors, capsize=3)
        ax.axhline(results["base"][k]["mean"], color="k", ls="--", lw=1, label="base")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=7)
        ax.set_title(METRICS[k][0] + (" ↑" if METRICS[k][1] else " ↓"), fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("SFT vs EAFT (bars: mean over items of the seed-averaged score, 95% bootstrap CI)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_weights(runs: Dict[str, dict], path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for name, r in runs.items():
        hist = [h for h in r["eval"].get("_history", []) if "eaft/weight" in h]
        if hist:
            ax.plot([h["step"] for h in hist], [h["eaft/weight"] for h in hist], label=name, lw=1)
            drawn = True
    if not drawn:
        ax.text(0.5, 0.5, "no eaft/weight logged (needs the eaft-plugins LLaMA-Factory integration)", ha="center")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("mean EAFT weight (eaft/weight)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eaft-repro", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="eaft_repro")
    p.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct built offline (eaft_plugins.tools.smollm2)")
    p.add_argument("--data-dir", default=None, help="folder with gsm8k/{train,test}.jsonl and general/arc_challenge_test.jsonl")
    p.add_argument("--quick", action="store_true", help="a few steps and items (tests)")
    p.add_argument("--controls", action="store_true", help="add step-matched SFT, EAFT weight_norm=mean, shuffled gate")
    p.add_argument("--seeds", default=None, help="comma list, default 0")
    p.add_argument("--lrs", default=None, help="comma list of learning rates, default 2e-4")
    for name in ("train-n", "eval-n", "mc-n", "prompts-n", "texts-n", "max-steps", "batch-size", "grad-accum",
                 "cutoff", "max-new-tokens", "general-new-tokens", "eval-batch"):
        p.add_argument(f"--{name}", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--keep-models", action="store_true", help="keep the fine-tuned weights (540 MB each)")
    return p


def settings_from_args(args) -> Settings:
    from .smollm2 import local_smollm2

    s = Settings(model=args.model or str(local_smollm2()), data_dir=args.data_dir, controls=args.controls)
    if args.data_dir:  # GSM8K answers are longer than mathgen's
        s.cutoff, s.max_new_tokens = 384, 256
    if args.quick:
        s.train_n, s.eval_n, s.mc_n, s.prompts_n, s.texts_n = 16, 4, 6, 3, 3
        s.max_steps, s.cutoff, s.max_new_tokens, s.general_new_tokens = 2, 128, 32, 16
    for key in ("train_n", "eval_n", "mc_n", "prompts_n", "texts_n", "max_steps", "batch_size", "grad_accum",
                "cutoff", "max_new_tokens", "general_new_tokens", "eval_batch"):
        if getattr(args, key) is not None:
            setattr(s, key, getattr(args, key))
    if args.seeds:
        s.seeds = [int(x) for x in args.seeds.split(",")]
    if args.lrs:
        s.lrs = [float(x) for x in args.lrs.split(",")]
    return s


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    s = settings_from_args(args)
    results = run_all(s, Path(args.out), args.device, args.keep_models)
    print_table(results)
    print(f"wrote {args.out}/results.json, table.md, repro_bars.png, repro_weight.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
