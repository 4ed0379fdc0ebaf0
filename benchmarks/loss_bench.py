"""Loss benchmark: fwd+bwd time and peak memory of LM-head + loss variants on the same inputs.

    python benchmarks/loss_bench.py                       # Qwen3-4B head (H=2560, V=151936), 512..4096 tokens
    python benchmarks/loss_bench.py --tokens 256 512 --hidden 512 --vocab 32000 --repeat 2   # quick
    python benchmarks/loss_bench.py --device cuda         # GPU: 4k/16k/32k tokens, CUDA events, allocator peaks
    python benchmarks/loss_bench.py --topk 20 full --family llama,gemma2,cohere,granite   # the two axes below

Methods ("full": from last hidden states [N, H] and the LM head [V, H], gradients for both):
  torch_ce          logits = hidden @ W.T, then transformers' causal-LM loss recipe: logits.float(),
                    F.cross_entropy (shifted labels)
  llamafactory_095  logits as above, then LLaMA-Factory 0.9.5's eaft_loss_func (imported from the
                    installed llamafactory.train.trainer_utils)
  dense_eaft        logits as above, then eaft_plugins.eaft_loss
  fused_eaft        eaft_plugins.ops.fused.fused_linear_eaft_loss (no logits)
  fused_eaft_2pass  the same with weight_norm="mean" and no mean_weight: weights need every token's
                    entropy first, so the op runs two passes (4 matmuls per chunk instead of 3)
  liger_flce        Liger's LigerFusedLinearCrossEntropyLoss, when importable (Triton: needs a GPU)
  cce_compile       cut-cross-entropy's linear_cross_entropy(impl="torch_compile") when importable
                    (its fused "cce" kernel is Triton, GPU-only; this CPU fallback materialises logits)
  cce               cut-cross-entropy's fused Triton kernel, linear_cross_entropy(impl="cce") (GPU)
"Loss-only" mode times the same losses on fixed logits [N, V] (a leaf): the loss's own cost.
The EAFT losses use entropy_norm="upstream" so their loss value equals LLaMA-Factory's (checked).

Axes (every combination runs, ratios compare cases of one run):
  --topk     the EAFT methods' topk: integers and/or "full" (exact entropy); default 20.
  --family   the model family's logit transform, with its value from the installed transformers'
             config defaults: llama (none), gemma2 (tanh soft-capping, final_logit_softcapping),
             cohere (logits * logit_scale), granite (logits / logits_scaling). The dense methods
             apply it to the logits as the model's forward does; the fused op applies it inside,
             chunk by chunk. Liger and cut-cross-entropy run for llama only.

How memory is measured: tracemalloc does not see torch's allocations, so each case runs in fresh
child processes that read the kernel's counters. A child allocates the inputs, reads VmRSS, resets
the high-water mark (writes 5 to /proc/self/clear_refs), runs one fwd+bwd and reads VmHWM; the
difference is what that first step made resident (including what glibc keeps for reuse: real
memory as the OS sees it). Two children per case:
  workspace  the LM head frozen (as under LoRA), so the only gradient is d hidden [N, H] (d logits
             in loss-only mode), which is subtracted: the memory the loss itself needs.
  total      the LM head trainable: `peak extra` includes d W [V, H] (same for every method).
             This child then times `--repeat` more fwd+bwd runs (.grad reset to None before each):
             wall clock and process CPU time, best of the runs (the machine may be shared;
             with --threads 1 CPU time is robust to other jobs). The JSON keeps every run.

On --device cuda one child per method runs every token count (CUDA start-up is slow, and the
caching allocator's counters need no fresh process): after one warm-up step (Triton compiles
and autotunes there), memory is torch.cuda.max_memory_allocated() minus what was allocated
before the step, and time is CUDA events around fwd+bwd, the median of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FULL = ["torch_ce", "llamafactory_095", "dense_eaft", "fused_eaft", "fused_eaft_2pass", "liger_flce", "cce_compile"]
GPU = ["torch_ce", "llamafactory_095", "dense_eaft", "fused_eaft", "liger_flce", "cce"]
LOSS_ONLY = ["torch_ce", "llamafactory_095", "dense_eaft"]
DEFAULT_TOKENS = {"cpu": [512, 1024, 2048, 4096], "cuda": [4096, 16384, 32768]}
IGNORE = -100
MB = 1 << 20


# ----------------------------------------------------------------------------- child side
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


EAFT = ("dense_eaft", "fused_eaft", "fused_eaft_2pass")
# family -> (transformers model folder, config class, its attribute, LogitTransform kind of the fused op).
FAMILIES = {"llama": None, "gemma2": ("gemma2", "Gemma2Config", "final_logit_softcapping", "softcap"),
            "cohere": ("cohere", "CohereConfig", "logit_scale", "scale"),
            "granite": ("granite", "GraniteConfig", "logits_scaling", "divide")}
LLAMA_ONLY = ("liger_flce", "cce_compile", "cce")


class Unavailable(Exception):
    """The method cannot run this case here: reported as skipped, with the reason."""


def family_value(family: str):
    """The transform's constant: the installed transformers' config default (read once, in the parent)."""
    if FAMILIES[family] is None:
        return None
    import importlib

    folder, config, attr, _ = FAMILIES[family]
    module = importlib.import_module(f"transformers.models.{folder}.configuration_{folder}")
    return getattr(getattr(module, config)(), attr)


def _dense_transform(family: str, value):
    """What the family's *ForCausalLM.forward does to lm_head's output (transformers' own steps)."""
    import torch

    if family == "gemma2":  # modeling_gemma2: logits / cap, tanh, * cap (three [N, V] passes)
        return lambda z: torch.tanh(z / value) * value
    if family == "cohere":
        return lambda z: z * value
    if family == "granite":
        return lambda z: z / value
    return lambda z: z


def _fused_transform(family: str, value) -> dict:
    """Keyword arguments that make fused_linear_eaft_loss apply the family's transform."""
    if family == "llama":
        return {}
    try:
        from eaft_plugins.ops.fused import LogitTransform
    except ImportError as exc:
        raise Unavailable(f"the fused op in this checkout takes no {family} logit transform ({exc})") from exc
    return {"logit_transform": LogitTransform(FAMILIES[family][3], value)}


def _topk(text: str):
    return None if text == "full" else int(text)


def _loss_fn(method: str, mode: str, args):
    """A closure (leaves) -> scalar loss, or raises when the method is unavailable."""
    import torch.nn.functional as F

    family, topk = args.family[0], _topk(args.topk[0])
    if family != "llama" and method in LLAMA_ONLY:
        raise Unavailable(f"{method} is run for llama only (no {family} logit transform here)")
    transform = _dense_transform(family, args.family_value)

    def shifted_ce(logits, labels):  # transformers' ForCausalLMLoss recipe
        logits = logits.float()
        target = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE)

    if method == "torch_ce":
        loss = shifted_ce
    elif method == "llamafactory_095":
        from llamafactory.train.trainer_utils import eaft_loss_func

        def loss(logits, labels):
            return eaft_loss_func({"logits": logits}, labels)
    elif method == "dense_eaft":
        from eaft_plugins import eaft_loss

        def loss(logits, labels):
            return eaft_loss(logits, labels, entropy_norm="upstream", topk=topk).loss
    elif method in ("fused_eaft", "fused_eaft_2pass"):
        from eaft_plugins.ops.fused import fused_linear_eaft_loss

        kw = dict(entropy_norm="upstream", topk=topk, chunk_size=args.chunk or None, **_fused_transform(family, args.family_value))
        if method == "fused_eaft_2pass":
            kw["weight_norm"] = "mean"
        return lambda h, w, labels: fused_linear_eaft_loss(h, w, labels, **kw).loss
    elif method == "liger_flce":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()

        def flce(h, w, labels):
            target = F.pad(labels, (0, 1), value=IGNORE)[..., 1:]
            return liger(w, h.reshape(-1, h.size(-1)), target.reshape(-1))

        return flce
    elif method == "cce_compile":
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, labels):
            return linear_cross_entropy(h, w, labels, shift=True, impl="torch_compile")

        return cce
    elif method == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, labels: linear_cross_entropy(h, w, labels, shift=True, impl="cce")
    else:
        raise ValueError(f"unknown method {method!r}")
    if mode == "loss":
        return lambda logits, labels: loss(transform(logits), labels)
    return lambda h, w, labels: loss(transform(F.linear(h, w)), labels)


def child(args) -> dict:
    """One case in this fresh process: `--measure workspace` (LM head frozen, one run, memory only)
    or `--measure total` (LM head trainable: memory of the first run, then timed runs)."""
    import gc

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    n = args.tokens[0]
    leaves, labels = _inputs(args, n, dtype, torch.device("cpu"))
    try:
        fn = _loss_fn(args.method, args.mode, args)
    except Unavailable as exc:
        return {"method": args.method, "mode": args.mode, "tokens": n, "skipped": str(exc)}
    trainable = leaves if args.measure == "total" else leaves[:1]  # workspace: d hidden (or d logits) only
    for x in trainable:
        x.requires_grad_()
    if args.method == "cce_compile":  # compile once on a small batch, outside the measurement
        small = [x[:, :8].detach().clone().requires_grad_() if x.dim() == 3 else x for x in leaves]
        fn(*small, labels[:, :8]).backward()
        for x in leaves:
            x.grad = None

    def step():
        for x in leaves:
            x.grad = None
        t0, c0 = time.perf_counter(), time.process_time()
        loss = fn(*leaves, labels)
        loss.backward()
        return time.perf_counter() - t0, time.process_time() - c0, float(loss)

    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    cold, cold_cpu, value = step()
    peak = _status("VmHWM") - base
    grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in leaves if x.grad is not None)
    out = {"method": args.method, "mode": args.mode, "tokens": n, "measure": args.measure, "loss": value,
           "peak_extra_mb": peak / MB, "grad_mb": grad_bytes / MB, "threads": torch.get_num_threads()}
    if args.measure == "total":
        runs = [step() for _ in range(args.repeat)] or [(cold, cold_cpu, value)]
        out.update(cold_s=cold, times_s=[r[0] for r in runs], cpu_s=[r[1] for r in runs],
                   time_s=min(r[0] for r in runs), cpu_time_s=min(r[1] for r in runs))
    return out


def child_cuda(args) -> None:
    """Every token count of one method on the GPU; prints one JSON line per case as it finishes."""
    import statistics

    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    try:
        fn = _loss_fn(args.method, args.mode, args)
    except (ImportError, Unavailable) as exc:
        why = str(exc) if isinstance(exc, Unavailable) else f"not importable here: {exc}"
        for n in args.tokens:
            print(json.dumps({"method": args.method, "mode": args.mode, "tokens": n, "skipped": why}), flush=True)
        return
    for n in args.tokens:
        try:
            out = _cuda_case(fn, n, dtype, args)
        except Exception as exc:  # e.g. out of memory: the next size may still fit
            out = {"method": args.method, "mode": args.mode, "tokens": n, "error": f"{type(exc).__name__}: {exc}"[:300]}
        torch.cuda.empty_cache()
        out.update(method=args.method, mode=args.mode, tokens=n)
        if "time_s" in out:
            out["time_median_s"] = statistics.median(out["times_s"])
        print(json.dumps(out), flush=True)


def _inputs(args, n, dtype, device):
    """The same inputs for every method (seed 0): the leaves (logits, or hidden + head weight) and labels."""
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    h, v = args.hidden, args.vocab
    hidden = torch.randn(1, n, h, generator=g, device=device).to(dtype)
    weight = (torch.randn(v, h, generator=g, device=device) * (2.5 / h**0.5)).to(dtype)  # logits with std ~2.5
    labels = torch.randint(0, v, (1, n), generator=g, device=device)
    if args.mode == "loss":
        with torch.no_grad():
            return [torch.nn.functional.linear(hidden, weight)], labels
    return [hidden, weight], labels


def _cuda_case(fn, n, dtype, args) -> dict:
    import torch

    dev = torch.device("cuda")
    leaves, labels = _inputs(args, n, dtype, dev)

    def step():
        for x in leaves:
            x.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = fn(*leaves, labels)
        loss.backward()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000, float(loss.detach())

    def peak_of_one_step():
        for x in leaves:
            x.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        seconds, value = step()
        grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in leaves if x.grad is not None)
        return (torch.cuda.max_memory_allocated() - base) / MB, grad_bytes / MB, seconds, value

    out = {}
    # workspace: LM head frozen (d hidden, or d logits, subtracted); total: every gradient, then timing.
    for measure, trainable in (("workspace", leaves[:1]), ("total", leaves)):
        for x in leaves:
            x.requires_grad_(any(x is t for t in trainable))
        step()  # warm-up: Triton compiles and autotunes here, outside the measurement
        peak, grad_mb, cold, value = peak_of_one_step()
        if measure == "workspace":
            out["workspace_mb"] = peak - grad_mb
        else:
            runs = [step() for _ in range(max(args.repeat, 1))]
            out.update(peak_extra_mb=peak, grad_mb=grad_mb, loss=value, cold_s=cold,
                       times_s=[r[0] for r in runs], time_s=min(r[0] for r in runs))
    return out


# ----------------------------------------------------------------------------- parent side
def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _child_cmd(case, tokens, args, measure="total") -> list:
    mode, method, family, topk = case
    return [sys.executable, __file__, "--child", "--device", args.device, "--method", method, "--mode", mode,
            "--tokens", *map(str, tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
            "--repeat", str(args.repeat), "--dtype", args.dtype, "--measure", measure, "--threads", str(args.threads),
            "--chunk", str(args.chunk), "--family", family, "--topk", topk or "20"] + \
        ([] if args.family_values[family] is None else ["--family-value", str(args.family_values[family])])


def _tagged(res: dict, case) -> dict:
    """A result with its case's family and topk (None for the methods without a topk)."""
    res.update(mode=case[0], method=case[1], family=case[2], topk=case[3])
    return res


# EAFT_PLUGINS_DISABLE: import LLaMA-Factory's own eaft_loss_func, untouched by our integration.
CHILD_ENV = dict(os.environ, PYTHONUNBUFFERED="1", EAFT_PLUGINS_DISABLE="1")


def run_cuda_method(case, args) -> list:
    """One child for every token count of one case (see child_cuda)."""
    proc = subprocess.run(_child_cmd(case, sorted(args.tokens), args), capture_output=True, text=True, env=CHILD_ENV)
    results = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    done = {r["tokens"] for r in results}
    err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
    results += [{"tokens": n, "error": err[:300]} for n in sorted(args.tokens) if n not in done]
    return [_tagged(r, case) for r in results]


def run_case(case, tokens: int, args) -> dict:
    """Two fresh children: workspace (frozen LM head / logits-only grads) and total (+ timing)."""
    merged = {}
    for measure in ("workspace", "total"):
        cmd = _child_cmd(case, [tokens], args, measure)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=CHILD_ENV)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            err = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}, no output"])[-1]
            return _tagged({"tokens": tokens, "error": err[:300]}, case)
        res = json.loads(lines[-1])
        if "skipped" in res:
            return _tagged(res, case)
        if measure == "workspace":
            merged["workspace_mb"] = res["peak_extra_mb"] - res["grad_mb"]  # d hidden / d logits: tiny or equal
        else:
            merged.update(res)
    merged.pop("measure", None)
    return _tagged(merged, case)


def machine(device: str = "cpu") -> dict:
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_mem_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def cases(args) -> list:
    """(mode, method, family, topk) of every case; topk None for the methods without one."""
    modes = [("full", m) for m in args.methods] + ([("loss", m) for m in LOSS_ONLY if m in args.methods] if args.loss_only else [])
    return [(mode, method, family, topk) for family in args.family for mode, method in modes
            for topk in (args.topk if method in EAFT else [None])]


def parent(args) -> None:
    results = []
    plan = cases(args)
    args.family_values = {f: family_value(f) for f in args.family}
    config = {k: v for k, v in vars(args).items() if k not in ("child", "method", "mode", "family_value")}
    report = {"config": config, "machine": machine(args.device), "results": results}
    last = {}
    for case in plan:
        mode, method = case[:2]
        if args.device == "cuda":
            for res in run_cuda_method(case, args):
                results.append(res)
                print(json.dumps(res), flush=True)
            write_json(report, args.json)  # after each method: a run cut short keeps what it measured
            continue
        for n in sorted(args.tokens):
            key = case
            if key in last and "error" not in last[key] and "skipped" not in last[key]:
                prev = last[key]
                predicted = prev["peak_extra_mb"] * MB * n / prev["tokens"]
                if predicted > 0.85 * mem_available():
                    res = _tagged({"tokens": n, "skipped": f"predicted peak {predicted / 2**30:.1f} GiB > 85% of MemAvailable"},
                                  case)
                    results.append(res)
                    print(json.dumps(res), flush=True)
                    continue
            if key in last and ("error" in last[key] or "skipped" in last[key]):
                continue  # unavailable method: reported once
            res = run_case(case, n, args)
            last[key] = res
            results.append(res)
            print(json.dumps(res), flush=True)
            write_json(report, args.json)
    write_json(report, args.json)
    print(markdown(report))
    if args.plot:
        plot(report, args.plot)


def write_json(report, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1))


def _get(results, mode, method, n, family="llama", topk=None):
    for r in results:
        if (r["mode"], r["method"], r["tokens"], r.get("family", "llama"), r.get("topk")) == (mode, method, n, family, topk) \
                and "time_s" in r:
            return r
    return None


def _time(r) -> float:
    """The time the ratios use: process CPU time on the CPU, CUDA-event median on the GPU."""
    return r["cpu_time_s"] if "cpu_time_s" in r else r.get("time_median_s", r["time_s"])


def markdown(report) -> str:
    res, cfg, mach = report["results"], report["config"], report["machine"]
    gpu = cfg.get("device", "cpu") == "cuda"
    if gpu:
        head = f"Machine: {mach.get('gpu')}, CUDA {mach.get('cuda')}, torch {mach['torch']}; "
        rest = f"H={cfg['hidden']}, V={cfg['vocab']}, {cfg['dtype']}, median of {cfg['repeat']} runs (CUDA events)."
        time_cols = [("torch_ce", "x torch_ce"), ("llamafactory_095", "x LF 0.9.5"), ("liger_flce", "x Liger")]
        mem_cols = [("llamafactory_095", "workspace x LF"), ("liger_flce", "workspace x Liger")]
        first = "| method | tokens | ms |"
    else:
        head = f"Machine: {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}; "
        rest = (f"H={cfg['hidden']}, V={cfg['vocab']}, {cfg['dtype']}, {cfg['threads'] or 'default'} thread(s), "
                f"best of {cfg['repeat']} runs.")
        time_cols = [("torch_ce", "cpu x torch_ce"), ("llamafactory_095", "cpu x LF 0.9.5")]
        mem_cols = [("llamafactory_095", "workspace x LF")]
        first = "| method | tokens | wall s | cpu s |"
    ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
    families = list(dict.fromkeys(r.get("family", "llama") for r in res))
    topks = {r.get("topk") for r in res} - {None}
    show_family = families != ["llama"]
    if show_family:  # the cost of a family's transform: the same case with the llama (identity) head
        time_cols = time_cols + [("llama", "cpu x llama" if not gpu else "x llama")]
        first = first.replace("| method |", "| method | family |")

    def name(r):  # the topk is named when the run has another than the default 20
        k = r.get("topk")
        return r["method"] if k is None or topks == {"20"} else f"{r['method']} topk={k}"

    lines = [head + rest, ""]
    for mode, title in (("full", "LM head + loss, fwd+bwd"), ("loss", "loss only, on fixed logits, fwd+bwd")):
        rows = [r for r in res if r["mode"] == mode]
        if not rows:
            continue
        header = (first + "".join(f" {c} |" for _, c in time_cols) + " peak extra MB (all grads) | workspace MB |"
                  + "".join(f" {c} |" for _, c in mem_cols) + " loss |")
        width = header.count("|") - 1
        lines += [f"### {title}", "", header, "|---|" + "---:|" * (width - 1)]
        for r in rows:
            family = r.get("family", "llama")
            lead = f"| {name(r)} | " + (f"{family} | " if show_family else "") + f"{r['tokens']} |"
            if "time_s" not in r:
                lines.append(f"{lead} {r.get('error') or r.get('skipped')} |" + "|" * (width - 3 - show_family) + " ")
                continue
            base = {m: _get(res, mode, m, r["tokens"], family) for m, _ in time_cols + mem_cols}
            base["llama"] = _get(res, mode, r["method"], r["tokens"], "llama", r.get("topk"))
            t = _time(r)
            cells = [f"{t * 1000:.1f}"] if gpu else [f"{r['time_s']:.2f}", f"{r['cpu_time_s']:.2f}"]
            cells += [ratio(t, base[m] and _time(base[m])) for m, _ in time_cols]
            cells += [f"{r['peak_extra_mb']:.0f}", f"{r['workspace_mb']:.0f}"]
            cells += [ratio(max(r["workspace_mb"], 0.0), base[m] and base[m]["workspace_mb"]) for m, _ in mem_cols]
            cells.append(f"{r['loss']:.4f}")
            lines.append(f"{lead} " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(report, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = [r for r in report["results"] if r["mode"] == "full" and "time_s" in r]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    label = lambda r: " ".join([r["method"]] + [f"{k}={r[k]}" for k in ("family", "topk")  # noqa: E731
                                                if r.get(k) not in (None, "llama", "20")])
    for name in dict.fromkeys(map(label, res)):
        rows = sorted((r for r in res if label(r) == name), key=lambda r: r["tokens"])
        n = [r["tokens"] for r in rows]
        ax_m.plot(n, [r["workspace_mb"] for r in rows], marker="o", label=name)
        ax_t.plot(n, [_time(r) for r in rows], marker="o", label=name)
    cfg = report["config"]
    gpu = cfg.get("device", "cpu") == "cuda"
    ax_m.set(xlabel="tokens", ylabel=f"workspace MB (peak {'allocated' if gpu else 'RSS'} - inputs - d hidden)",
             xscale="log", yscale="log",
             title=f"loss memory (LM head frozen), H={cfg['hidden']} V={cfg['vocab']} {cfg['dtype']}")
    where = report["machine"].get("gpu") if gpu else f"{report['machine']['cpu']}, {cfg['threads'] or 'all'} thread(s)"
    ax_t.set(xlabel="tokens", ylabel=f"fwd+bwd {'GPU seconds (median)' if gpu else 'CPU seconds (best run)'}",
             xscale="log", yscale="log", title=f"LM head + loss time, {where}")
    ticks = sorted({r["tokens"] for r in res})
    for ax in (ax_m, ax_t):
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _topk_arg(text: str) -> list:
    out = []
    for k in filter(None, text.split(",")):
        if k != "full" and not (k.isdigit() and int(k) >= 2):
            raise argparse.ArgumentTypeError(f"--topk takes integers >= 2 or 'full', got {k!r}")
        out.append(k)
    return out


def _family_arg(text: str) -> list:
    out = list(filter(None, text.split(",")))
    bad = [f for f in out if f not in FAMILIES]
    if bad:
        raise argparse.ArgumentTypeError(f"--family {bad[0]!r} is unknown; choose from {', '.join(FAMILIES)}")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", help="default: 512..4096 on cpu, 4096 16384 32768 on cuda")
    p.add_argument("--hidden", type=int, default=2560)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeat", type=int, default=2, help="timed runs after the measured first run")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--methods", nargs="+", choices=FULL + ["cce"], help=f"default: {FULL} on cpu, {GPU} on cuda")
    p.add_argument("--no-loss-only", dest="loss_only", action="store_false", help="skip the fixed-logits runs")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (0: torch's default)")
    p.add_argument("--chunk", type=int, default=0, help="fused op's tokens per chunk (0: its default)")
    p.add_argument("--topk", nargs="+", type=_topk_arg,
                   help="the EAFT methods' topk: integers >= 2 and/or full (exact entropy); default 20")
    p.add_argument("--family", nargs="+", type=_family_arg,
                   help=f"model families' logit transforms, comma- or space-separated: {', '.join(FAMILIES)}")
    p.add_argument("--json", help="default: benchmarks/results/loss_bench[_cuda].json")
    p.add_argument("--plot", help="PNG path ('' for none; default docs/img/perf_loss[_cuda].png)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--family-value", type=float, help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="full", help=argparse.SUPPRESS)
    p.add_argument("--measure", default="total", help=argparse.SUPPRESS)
    p.add_argument("--replot", metavar="JSON", help="only redraw table and plot from a saved JSON report")
    args = p.parse_args(argv)
    args.topk = list(dict.fromkeys(k for ks in args.topk or [["20"]] for k in ks))
    args.family = list(dict.fromkeys(f for fs in args.family or [["llama"]] for f in fs))
    gpu = args.device == "cuda"
    args.tokens = args.tokens or DEFAULT_TOKENS[args.device]
    args.methods = args.methods or (GPU if gpu else FULL)
    suffix = "_cuda" if gpu else ""
    args.json = args.json or str(ROOT / "benchmarks" / "results" / f"loss_bench{suffix}.json")
    args.plot = str(ROOT / "docs" / "img" / f"perf_loss{suffix}.png") if args.plot is None else args.plot
    if args.replot:
        report = json.loads(Path(args.replot).read_text())
        print(markdown(report))
        if args.plot:
            plot(report, args.plot)
    elif args.child and gpu:
        child_cuda(args)
    elif args.child:
        print(json.dumps(child(args)), flush=True)
    else:
        parent(args)


if __name__ == "__main__":
    main()
