"""What the retention monitor costs, measured in one training run on the demo setup (SmolLM2-135M-Instruct,
full fine-tune, mathgen rows, batch 4, cutoff 256; CPU unless --device cuda).

A plain transformers.Trainer trains with `with_retention(trainer, "builtin")` at the default interval (the
logging interval, --logging-steps, lengthened by the monitor to keep a probe under 3% of the training time;
--interval N sets it instead); the monitor times every probe it runs, so the shares below are probe wall
time over the run's train_runtime, side by side in the same run: the periodic probes (what the interval
governs), and everything (plus the one-time reference build: greedy answers + the step-0 pass). Memory: the bytes of the stored reference (top-32 log-probs + ids + tail mass per answer token)
and the process's resident memory before / after the reference was built (CUDA: the allocator peak
during a probe over the training peak).

    python benchmarks/retention_cost.py                      # 200 steps, logging every 10
    python benchmarks/retention_cost.py --steps 20 --interval 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def status_mb(key: str) -> float:
    """A memory line of /proc/self/status in MB: VmRSS (resident now) or VmHWM (peak resident so far)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    return status_mb("VmRSS")


def peak_mb() -> float:
    return status_mb("VmHWM")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--logging-steps", type=int, default=10, help="the default probe interval follows it")
    ap.add_argument("--interval", type=int, default=None, help="retention_steps (default: the monitor's choice)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from eaft_plugins.retention import with_retention
    from eaft_plugins.tools import mathgen
    from eaft_plugins.tools.smollm2 import local_smollm2

    model_dir = str(local_smollm2())
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = []
    for r in mathgen.generate(args.steps * 4, seed=0):
        p = tok.apply_chat_template([{"role": "user", "content": r["question"]}], add_generation_prompt=True,
                                    tokenize=False)
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        a_ids = tok(r["answer"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        rows.append({"input_ids": (p_ids + a_ids)[:256], "labels": ([-100] * len(p_ids) + a_ids)[:256]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, max_steps=args.steps,
                              logging_steps=args.logging_steps, save_strategy="no", report_to="none",
                              learning_rate=2e-5, lr_scheduler_type="constant", seed=42, use_cpu=args.device == "cpu",
                              dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=targs, train_dataset=Dataset.from_list(rows), processing_class=tok,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    with_retention(trainer, "builtin", steps=args.interval)
    cb = trainer._retention
    cuda = args.device.startswith("cuda")

    rss = {}
    build = cb.monitor.build_reference

    def timed_build(*a, **kw):  # resident memory around the reference build
        rss["before"], rss["peak_before"] = rss_mb(), peak_mb()
        out = build(*a, **kw)
        rss["after"], rss["peak_after"] = rss_mb(), peak_mb()
        return out

    cb.monitor.build_reference = timed_build
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    runtime = result.metrics.get("train_runtime", wall)
    probes = len(cb.history)
    periodic = cb.seconds - cb.reference_seconds
    res = {
        "steps": args.steps, "interval": cb.interval, "logging_steps": args.logging_steps, "probes": probes,
        "probe_tokens": cb.monitor.tokens, "train_runtime_s": runtime, "probe_s": cb.seconds,
        "reference_s": cb.reference_seconds, "reference_generate_s": cb.monitor.seconds["generate"],
        "periodic_probe_s": periodic, "periodic_share": periodic / runtime, "share": cb.seconds / runtime,
        "measure_s_each": periodic / max(probes - 1, 1), "step_s": (runtime - cb.seconds) / args.steps,
        "reference_mb": cb.monitor.reference_bytes() / 2**20,
        "rss_before_reference_mb": rss.get("before"), "rss_after_reference_mb": rss.get("after"),
        "peak_before_reference_mb": rss.get("peak_before"), "peak_after_reference_mb": rss.get("peak_after"),
        "peak_end_mb": peak_mb(),
        "threads": torch.get_num_threads(), "device": args.device,
    }
    if cuda:
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    step, each = res["step_s"], res["measure_s_each"]
    how = "set by --interval" if args.interval else f"chosen by the monitor; logging_steps {args.logging_steps}"
    print(f"retention probe on the demo setup ({args.device}, {res['threads']} threads), {args.steps} steps, "
          f"interval {cb.interval} ({how}), {probes} probes of {res['probe_tokens']} probe tokens")
    print(f"  train_runtime {runtime:.1f} s; one training step {step:.2f} s; one measurement {each:.2f} s")
    print(f"  periodic probes {periodic:.1f} s: share {100 * res['periodic_share']:.1f}% of train_runtime "
          f"(the last step's measurement included)")
    print(f"  one-time reference build {cb.reference_seconds:.1f} s (greedy answers "
          f"{res['reference_generate_s']:.1f} s): all probing {100 * res['share']:.1f}% of this {args.steps}-step run")
    for n in (10, 50, 100):
        print(f"  projected periodic share at interval {n:>3}: {100 * each / (each + n * step):.1f}%")
    print(f"  memory: stored reference {res['reference_mb']:.2f} MB; resident {rss.get('before', 0):.0f} MB before the "
          f"reference build, {rss.get('after', 0):.0f} MB after (freed buffers the allocator keeps)")
    print(f"  peak resident memory: {rss.get('peak_before', 0):.0f} MB before the reference build (model loaded), "
          f"{rss.get('peak_after', 0):.0f} MB after it, {res['peak_end_mb']:.0f} MB at the end of training: the probe "
          f"{'raised' if rss.get('peak_after', 0) > res['peak_end_mb'] - 1 else 'did not raise'} the run's peak")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
