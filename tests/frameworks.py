"""What the end-to-end tests share: real `llamafactory-cli train` runs and an independent recomputation of their
first step, a free port for multi-process runs. Test-only: the package keeps what its own tools use (tools/demo.py)."""

import json
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from eaft_plugins.tools.demo import cli_env, log_history, run_train, train_config, write_yaml

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port nobody listens on now (a torchrun rendezvous); tests never hard-code one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sft_rows(cfg: dict, n: Optional[int] = None) -> list:
    """The first n rows (all when None) of LLaMA-Factory's own SFT dataset for a train config (its tokenizer,
    template, cutoff): what its trainer's batches hold, for recomputing a step independently of the trainer."""
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    model_args, data_args, training_args, _, _ = get_train_args(cfg)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    ds = get_dataset(template, model_args, data_args, training_args, stage="sft", **tokenizer_module)["train_dataset"]
    return [ds[i] for i in range(len(ds) if n is None else n)]


def lf_env(python: str = sys.executable, **extra) -> dict:
    """A framework CLI's environment: offline, CPU, the interpreter's torchrun on PATH."""
    return dict(cli_env(python), **extra)


@dataclass
class Run:
    history: list  # trainer_state.json's log_history
    output: str  # what the CLI printed (stdout + stderr)
    out_dir: Path

    @property
    def steps(self) -> list:
        """The training-step rows (with `loss`)."""
        return [row for row in self.history if "loss" in row]


def lf_train(cfg: dict, *, python: str = sys.executable, env=None, timeout=1800) -> Run:
    """`llamafactory-cli train` on `cfg` (the run must succeed)."""
    out = Path(cfg["output_dir"])
    proc = run_train(write_yaml(cfg, out.parent / f"{out.name}.yaml"), python=python, env=env or lf_env(python),
                     check=False, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"llamafactory-cli train failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return Run(log_history(out), proc.stdout + proc.stderr, out)


DDP_STEPS = 2
# Three prompts (two on rank 0, one on rank 1 plus a zero-weight copy), two texts, one choice question.
DDP_PROBE = ('{"prompt": "Name a colour."}\n{"text": "Bees make honey from the nectar of flowers."}\n'
             '{"prompt": "Say hello in French."}\n{"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": 1}\n'
             '{"prompt": "What is the capital of Italy?"}\n{"text": "The Moon orbits the Earth."}\n')


def ddp_config(model_dir, data_dir, out, **overrides) -> dict:
    """The 2-process DDP runs (tests/integrations/conftest.py's, and test_zero3.py's ZeRO-3 twins): 2 ranks x 2 rows a
    step (accelerate deals whole batches: rows 0-1 to rank 0, 2-3 to rank 1), weight_norm=mean so step 2's divisor
    is step 1's mean over both ranks, the retention monitor (when a probe is given) every step."""
    return train_config(model_dir, data_dir, out, steps=DDP_STEPS, cutoff_len=64, per_device_train_batch_size=2,
                        ddp_backend="gloo", disable_gradient_checkpointing=True, eaft_weight_norm="mean",
                        **overrides)


def torchrun_env(**extra) -> dict:
    """LLaMA-Factory re-launches itself under torchrun with 2 CPU processes (gloo)."""
    return lf_env(FORCE_TORCHRUN="1", NNODES="1", NPROC_PER_NODE="2", MASTER_PORT=str(free_port()),
                  OMP_NUM_THREADS="1", **extra)


def first_batch_reference(cfg: dict, batch_size: int, micro_batches, options=None, python=sys.executable) -> dict:
    """Step-1 numbers recomputed independently of the trainer: LLaMA-Factory's own tokenisation of the first rows,
    the untouched model run on each row, the core loss summed over rows with N = all supervised tokens of the step.
    `loss_weight_norm`: the same with weight_norm="mean" as the first step applies it, each micro-batch divided by
    its own mean raw weight; `micro_batches`: rows per micro-batch, or the row indices of each."""
    if isinstance(micro_batches, int):
        micro_batches = [list(range(i, min(i + micro_batches, batch_size))) for i in range(0, batch_size, micro_batches)]
    job = json.dumps({"cfg": cfg, "batch_size": batch_size, "groups": micro_batches, "options": options or {},
                      "tests": str(TESTS)})
    proc = subprocess.run([python, "-c", _REFERENCE, job], capture_output=True, text=True, env=lf_env(python),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("REFERENCE", 1)[1])


_REFERENCE = """
import json, sys
job = json.loads(sys.argv[1])
sys.path.insert(0, job["tests"])
import torch
from eaft_plugins import EAFTOptions, eaft_loss
from frameworks import sft_rows
from transformers import AutoModelForCausalLM

ds = sft_rows(job["cfg"])
rows = ds[:job["batch_size"]]
supervised = lambda r: sum(1 for t in r["labels"] if t != -100)
n_items = sum(supervised(r) for r in rows)
options = EAFTOptions(**job["options"])
model = AutoModelForCausalLM.from_pretrained(job["cfg"]["model_name_or_path"], dtype=torch.float32).eval()
with torch.no_grad():  # one row at a time: no padding at all
    logits = [model(input_ids=torch.tensor([r["input_ids"]])).logits for r in rows]
labels = [torch.tensor([r["labels"]]) for r in rows]
plain = [eaft_loss(z, y, options=options, num_items_in_batch=n_items) for z, y in zip(logits, labels)]
wn = options.replace(weight_norm="mean")
loss_wn = 0.0
for part in job["groups"]:  # first step: each micro-batch divides by its own mean raw weight
    mean = sum(float(plain[i].stats.raw_weight_sum) for i in part) / sum(float(plain[i].stats.tokens) for i in part)
    loss_wn += sum(eaft_loss(logits[i], labels[i], options=wn, num_items_in_batch=n_items, mean_weight=mean).loss.item()
                   for i in part)
tokens = sum(int(o.stats.tokens) for o in plain)
print("REFERENCE", json.dumps({"loss": sum(o.loss.item() for o in plain), "loss_weight_norm": loss_wn,
                               "ce": sum(float(o.stats.ce_sum) for o in plain) / tokens, "tokens": tokens,
                               "all_tokens": sum(supervised(r) for r in ds)}))
"""


def method_first_batch(cfg: dict, batch_size: int, methods: dict, python=sys.executable) -> dict:
    """Step 1 of SFT-KL / FLOW / TALR recomputed independently of the trainer, one subprocess for all: LLaMA-Factory's
    own tokenisation, the untouched model on each row (no padding), the rows padded into one micro-batch of
    `batch_size` rows, and the method's op (`methods`: {method: its options}) with N = the step's supervised tokens.
    SFT-KL's starting model is the model itself at step 1; FLOW's starting losses are measured on every training row
    (its temperature is their median). Returns {method: {"loss", "tokens", "<metric>": per-token mean, ...}}."""
    job = json.dumps({"cfg": cfg, "batch_size": batch_size, "methods": methods, "tests": str(TESTS)})
    proc = subprocess.run([python, "-c", _METHOD_REFERENCE, job], capture_output=True, text=True, env=lf_env(python),
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("REFERENCE", 1)[1])


def check_method_steps(steps: list, ref: dict, method: str, rel: float, tokens: bool = True) -> None:
    """A 2-step run of SFT-KL / FLOW / TALR: its metrics logged at both steps, step 1 equal to the op recomputed
    (`ref`: loss and the per-token means), SFT-KL's KL 0 at step 1 (the model is the starting model) and > 0 after."""
    import pytest

    from eaft_plugins.run import metric_names

    assert len(steps) == 2, steps
    for row in steps:
        assert set(metric_names("train", method)) <= set(row), row
    assert steps[0]["loss"] == pytest.approx(ref["loss"], rel=rel)
    for key in metric_names("train", method):
        assert steps[0][key] == pytest.approx(ref[key], rel=rel, abs=1e-6), key
    if tokens:
        assert steps[0][f"{method}/tokens"] == ref[f"{method}/tokens"]
    if method == "sft_kl":
        assert steps[0]["sft_kl/kl"] == pytest.approx(0.0, abs=1e-6) and steps[1]["sft_kl/kl"] > 0


_METHOD_REFERENCE = """
import json, sys
job = json.loads(sys.argv[1])
sys.path.insert(0, job["tests"])
import torch
from eaft_plugins.ops.flow import flow_loss, flow_weights, sequence_losses
from eaft_plugins.ops.sft_kl import sft_kl_loss
from eaft_plugins.ops.talr import talr_loss
from frameworks import sft_rows
from transformers import AutoModelForCausalLM

ds = sft_rows(job["cfg"])
model = AutoModelForCausalLM.from_pretrained(job["cfg"]["model_name_or_path"], dtype=torch.float32).eval()
with torch.no_grad():  # one row at a time: no padding at all
    logits = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in ds]
labels = [torch.tensor(r["labels"]) for r in ds]
rows = range(job["batch_size"])
width = max(len(labels[i]) for i in rows)
z = torch.zeros(len(rows), width, logits[0].shape[-1])
y = torch.full((len(rows), width), -100)
for i in rows:
    z[i, :len(labels[i])], y[i, :len(labels[i])] = logits[i], labels[i]
n = int((y != -100).sum())
out = {}
for method, options in job["methods"].items():
    if method == "sft_kl":
        res = sft_kl_loss(z, y, z.clone(), num_items_in_batch=n, **options)
    elif method == "flow":
        start = torch.cat([sequence_losses(logits[i][None], labels[i][None]) for i in range(len(ds))])
        keep = ~start.isnan()  # a row with no supervised token has no starting loss
        weights = torch.zeros_like(start)
        weights[keep] = flow_weights(start[keep], options.get("tau"))[0]
        res = flow_loss(z, y, weights[: len(rows)], num_items_in_batch=n, **options)
    else:
        res = talr_loss(z, y, num_items_in_batch=n, **options)
    out[method] = dict(res.stats.means(method + "/"), loss=res.loss.item())
print("REFERENCE", json.dumps(out))
"""


TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template")


def save_with_tokenizer(model, smollm2_dir: Path, path: Path) -> Path:
    """A tiny random model saved beside SmolLM2's tokenizer: a model folder any framework loads, for the runs where
    SmolLM2's weights are not the point (its 49152-token vocabulary is kept)."""
    model.save_pretrained(path)
    for f in Path(smollm2_dir).iterdir():
        if f.name.startswith(TOKENIZER_FILES):
            (path / f.name).write_bytes(f.read_bytes())
    return path


def tiny_llama(smollm2_dir: Path, path: Path, head_std: float = 1.0) -> Path:
    """A 2-layer Llama with a peaked LM head (confident predictions, so EAFT's weights spread below 1)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, head_std)
    return save_with_tokenizer(model, smollm2_dir, path)
