"""What the retention monitor costs, measured in one training run on the demo setup (SmolLM2-135M-Instruct,
full fine-tune, mathgen rows, batch 4, cutoff 256; CPU unless --device cuda).

A plain transformers.Trainer trains with `with_retention(trainer, "builtin")` at the default interval
(= the logging interval, --logging-steps); the monitor times every probe it runs (reference + measurements),
so the share of training time is the probe's wall time over the run's train_runtime, side by side in the
same run. Memory: the bytes of the stored reference (top-32 log-probs + ids + tail mass per answer token)
and the process's resident memory before / after the reference was built (CUDA: the allocator peak
during a probe over the training peak).

    python benchmarks/retention_cost.py                      # 40 steps, logging every 10
    python benchmarks/retention_cost.py --steps 20 --logging-steps 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--logging-steps", type=int, default=10, help="the default probe interval follows it")
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
    with_retention(trainer, "builtin")
    cb = trainer._retention
    cuda = args.device.startswith("cuda")

    rss = {}
    build = cb.monitor.build_reference

    def timed_build(*a, **kw):  # resident memory around the reference build
        rss["before"] = rss_mb()
        out = build(*a, **kw)
        rss["after"] = rss_mb()
        return out

    cb.monitor.build_reference = timed_build
    t0 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t0
    runtime = result.metrics.get("train_runtime", wall)
    probes = len(cb.history)
    res = {
        "steps": args.steps, "interval": cb.interval, "probes": probes, "probe_tokens": cb.monitor.tokens,
        "train_runtime_s": runtime, "probe_s": cb.seconds, "share": cb.seconds / runtime,
        "probe_s_each": cb.seconds / max(probes, 1), "step_s": (runtime - cb.seconds) / args.steps,
        "reference_mb": cb.monitor.reference_bytes() / 2**20,
        "rss_before_reference_mb": rss.get("before"), "rss_after_reference_mb": rss.get("after"),
        "threads": torch.get_num_threads(), "device": args.device,
    }
    if cuda:
        res["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    step, each = res["step_s"], res["probe_s_each"]
    print(f"retention probe on the demo setup ({args.device}, {res['threads']} threads), {args.steps} steps, "
          f"interval {cb.interval} (= logging_steps), {probes} probes of {res['probe_tokens']} probe tokens")
    print(f"  train_runtime {runtime:.1f} s, of which probe {cb.seconds:.1f} s: share {100 * res['share']:.1f}%")
    print(f"  one probe {each:.2f} s (reference build included in the total), one training step {step:.2f} s")
    for n in (1, 10, 50, 100):
        print(f"  projected share at interval {n:>3}: {100 * each / (each + n * step):.1f}%")
    print(f"  memory: stored reference {res['reference_mb']:.2f} MB; resident memory {rss.get('before', 0):.0f} MB "
          f"before the reference build, {rss.get('after', 0):.0f} MB after")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
