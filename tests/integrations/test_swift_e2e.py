"""End to end: the real `swift sft` CLI (ms-swift 4.6) on the SmolLM2 model, CPU, a few steps.

The step-1 numbers in swift's logging.jsonl are checked against a recomputation written here:
the same rows encoded by swift's own chatml template, the model run on each row, and the EAFT
formula applied token by token (and the core eaft_loss, which must agree).
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eaft_plugins import eaft_loss
from eaft_plugins.tools import mathgen
from frameworks import free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# ms-swift 4.6 and llamafactory 0.9.5 need different `datasets` releases, so the CLI runs from
# its own venv (scripts/setup.sh swift), or from $EAFT_SWIFT_BIN.
SWIFT = os.environ.get("EAFT_SWIFT_BIN") or (
    str(ROOT / ".venv-swift" / "bin" / "swift")
    if (ROOT / ".venv-swift" / "bin" / "swift").exists()
    else shutil.which("swift", path=str(Path(sys.executable).parent))
)
IGNORE = -100


def _require_swift(datasets_needed=True):
    if SWIFT is None:
        pytest.skip("SKIPPED: no `swift` CLI: run scripts/setup.sh swift (builds .venv-swift) or set EAFT_SWIFT_BIN")
    if not datasets_needed:
        return
    python = Path(SWIFT).with_name("python")
    probe = subprocess.run(
        [str(python), "-c", "import datasets, datasets.features as f; f.Json; print(datasets.__version__)"],
        capture_output=True, text=True, check=False,
    )
    if probe.returncode != 0:
        pytest.skip(
            f"SKIPPED: ms-swift 4.6 needs datasets.features.Json (datasets >= 4.1), missing in {python}'s "
            "environment (llamafactory 0.9.5 pins datasets<=4.0.0): run scripts/setup.sh swift"
        )


def swift_sft(model_dir, data, out, *extra, nproc=None, check=True):
    """Run `swift sft` on CPU; return (completed process, logged step rows).

    check=False: a run expected to fail while parsing its flags, before any dataset is loaded.
    """
    _require_swift(datasets_needed=check)
    cmd = [
        SWIFT, "sft", "--model", str(model_dir), "--model_type", "llama", "--template", "chatml",
        "--tuner_type", "full", "--dataset", str(data), "--max_length", "256",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_steps", "2",
        "--logging_steps", "1", "--save_strategy", "no", "--output_dir", str(out), "--add_version", "false",
        "--torch_dtype", "float32", "--fp16", "false", "--bf16", "false", "--report_to", "none",
        "--dataloader_num_workers", "0", "--check_model", "false", "--dataset_num_proc", "1",
        *extra,
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("NPROC_PER_NODE", None)
    if nproc:
        env.update(NPROC_PER_NODE=str(nproc), MASTER_PORT=str(free_port()))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"swift sft failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    log = Path(out) / "logging.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    proc.eval_rows = [r for r in rows if "eval_loss" in r]
    proc.rows = rows
    return proc, [r for r in rows if "loss" in r and "global_step/max_steps" in r]


def write_rows(path, n, seed, scales=()):
    """mathgen rows in ms-swift's messages format; scales[i] sets row i's assistant loss_scale."""
    mathgen.write_messages(mathgen.generate(n, seed=seed), path)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    for row, scale in zip(rows, scales):
        row["messages"][1]["loss_scale"] = scale
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def encode_like_swift(model_dir, rows, is_binary_loss_scale=None):
    """Token ids, labels and loss_scale of each row, through swift's own chatml template."""
    from swift.model import get_processor
    from swift.template import get_template

    processor = get_processor(str(model_dir), model_type="llama")
    template = get_template(
        processor, template_type="chatml", max_length=256, is_binary_loss_scale=is_binary_loss_scale
    )
    template.set_mode("train")
    return [template.encode({"messages": row["messages"]}) for row in rows]


def per_token(model, encoded, topk=20, alpha=1.0):
    """Plain per-token reference over all rows: ce, normalised top-k entropy, weight, scale (shifted)."""
    ce, ent, scale = [], [], []
    logits_rows, label_rows, scale_rows = [], [], []
    for enc in encoded:
        ids = torch.tensor([enc["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float()
        labels = torch.tensor(enc["labels"])
        ls = torch.tensor(enc["loss_scale"], dtype=torch.float32) if enc.get("loss_scale") else torch.ones(len(labels))
        logits_rows.append(logits)
        label_rows.append(labels)
        scale_rows.append(ls)
        z, y, s = logits[:-1], labels[1:], ls[1:]  # logits at i predict label i+1
        keep = y != IGNORE
        z, y, s = z[keep], y[keep], s[keep]
        ce.append(torch.logsumexp(z, -1) - z.gather(1, y[:, None])[:, 0])
        p = torch.softmax(torch.topk(z, topk, dim=-1).values, -1)
        ent.append(-(p * torch.log(p)).sum(-1) / math.log(topk))
        scale.append(s)
    ce, ent, scale = torch.cat(ce), torch.cat(ent), torch.cat(scale)
    return {"ce": ce, "entropy": ent, "weight": ent ** alpha, "scale": scale,
            "logits": logits_rows, "labels": label_rows, "loss_scale": scale_rows}


@pytest.fixture(scope="module")
def model(smollm2_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def scaled_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("swift_data") / "train.jsonl"
    rows = write_rows(path, 4, seed=11, scales=(2.0, 0.5))
    return path, rows


def eaft_args(data):
    """EAFT with loss scales, evaluated every 2 steps on the training rows."""
    return ("--loss_type", "eaft", "--eaft_topk", "10", "--eaft_alpha", "0.5", "--is_binary_loss_scale", "false",
            "--val_dataset", str(data), "--eval_strategy", "steps", "--eval_steps", "2",
            "--per_device_eval_batch_size", "2")


@pytest.fixture(scope="module")
def eaft_run(smollm2_dir, scaled_data, tmp_path_factory):
    data, _ = scaled_data
    return swift_sft(smollm2_dir, data, tmp_path_factory.mktemp("swift_eaft"), *eaft_args(data))


@pytest.fixture(scope="module")
def eaft_fused_run(smollm2_dir, scaled_data, tmp_path_factory):
    """The eaft_run settings with --eaft_fused true: the loss from hidden states + LM head, no logits."""
    data, _ = scaled_data
    return swift_sft(smollm2_dir, data, tmp_path_factory.mktemp("swift_eaft_fused"), *eaft_args(data),
                     "--eaft_fused", "true")


def test_eaft_step1_loss_and_metrics_match_recomputation(smollm2_dir, model, scaled_data, eaft_run):
    """4 rows = one optimizer step of 2 micro-batches x 2 rows: step 1 sees exactly these rows."""
    _, rows = scaled_data
    _, logged = eaft_run
    assert len(logged) == 2, logged
    step1 = logged[0]
    ref = per_token(model, encode_like_swift(smollm2_dir, rows, is_binary_loss_scale=False), topk=10, alpha=0.5)
    assert sorted(set(ref["scale"].tolist())) == [0.5, 1.0, 2.0]  # loss_scale really reached the tokens
    n = ref["ce"].numel()
    want = float((ref["weight"] * ref["scale"] * ref["ce"]).sum() / n)
    assert step1["loss"] == pytest.approx(want, rel=2e-4)

    # The core on the same logits gives the same number (rows one at a time, shared N).
    core = sum(
        float(eaft_loss(z[None], y[None], topk=10, alpha=0.5, token_scale=s[None], num_items_in_batch=n).loss)
        for z, y, s in zip(ref["logits"], ref["labels"], ref["loss_scale"])
    )
    assert core == pytest.approx(want, rel=1e-5)

    # The eaft/* metrics: unweighted, unscaled per-token means over the whole step.
    assert step1["eaft/ce"] == pytest.approx(float(ref["ce"].mean()), rel=2e-4)
    assert step1["eaft/entropy"] == pytest.approx(float(ref["entropy"].mean()), rel=2e-4)
    assert step1["eaft/weight"] == pytest.approx(float(ref["weight"].mean()), rel=2e-4)
    conflict = (ref["entropy"] < 0.15) & (torch.exp(-ref["ce"]) < 0.1)
    assert step1["eaft/conflict_frac"] == pytest.approx(float(conflict.double().mean()), abs=1e-6)
    assert logged[1]["loss"] != step1["loss"]


def test_eval_loss_is_eaft_with_eval_metrics(eaft_run):
    proc, _ = eaft_run
    assert len(proc.eval_rows) == 1, proc.eval_rows
    ev = proc.eval_rows[0]
    for key in ("eval_eaft/ce", "eval_eaft/weight", "eval_eaft/entropy", "eval_eaft/conflict_frac"):
        assert key in ev
    # soft weights Htilde ** 0.5 lie in (0, 1); the eval loss is the weighted one, not the plain CE
    assert 0 < ev["eval_eaft/weight"] < 1
    assert ev["eval_loss"] != pytest.approx(ev["eval_eaft/ce"], rel=1e-2)


# The retention monitor rides on the plain run (no --loss_type: it works with any loss).
RETENTION = ('{"prompt": "Name a colour."}\n{"text": "Bees make honey from the nectar of flowers."}\n'
             '{"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": 1}\n')


@pytest.fixture(scope="module")
def plain_run(smollm2_dir, scaled_data, tmp_path_factory):
    data, _ = scaled_data
    out = tmp_path_factory.mktemp("swift_plain")
    probe = out / "probe.jsonl"
    probe.write_text(RETENTION)
    proc, logged = swift_sft(smollm2_dir, data, out / "run", "--is_binary_loss_scale", "false",
                             "--retention_probe", str(probe))
    return proc, logged, out / "run"


def test_plain_swift_sft_differs_and_matches_scaled_ce(smollm2_dir, model, scaled_data, eaft_run, plain_run):
    _, rows = scaled_data
    _, plain, _ = plain_run
    assert not any(k.startswith("eaft/") for k in plain[0])
    ref = per_token(model, encode_like_swift(smollm2_dir, rows, is_binary_loss_scale=False))
    want = float((ref["scale"] * ref["ce"]).sum() / ref["ce"].numel())
    assert plain[0]["loss"] == pytest.approx(want, rel=2e-4)
    eaft_step1 = eaft_run[1][0]["loss"]
    assert abs(plain[0]["loss"] - eaft_step1) > 0.05 * plain[0]["loss"]


def test_swift_sft_logs_retention_without_eaft(plain_run):
    """`swift sft --retention_probe` with plain SFT, at the default interval (the logging interval, or the multiple
    of it the monitor printed: a probe over 3% of a step's time is measured less often)."""
    proc, _, out = plain_run
    ret = [r for r in proc.rows if "retention/kl_base" in r]
    line = next(x for x in (proc.stdout + proc.stderr).splitlines() if "measuring every" in x)
    n = int(line.split("measuring every ")[1].split()[0])
    steps = [0] + [s for s in (1, 2) if s % n == 0 or s == 2]
    assert len(ret) == len(steps) and "--retention_steps not set" in line
    assert ret[0]["retention/kl_base"] == 0.0 and ret[-1]["retention/kl_base"] > 0
    assert all("loss" in r for r in ret[1:]) and "retention/mc_logp_delta" in ret[-1]
    from eaft_plugins.retention.plot import read_run

    assert [r["step"] for r in read_run(out)] == steps
    assert (out / "retention.png").exists()


@pytest.mark.dist
def test_torchrun_two_processes_weight_norm_mean(smollm2_dir, model, tmp_path):
    """NPROC_PER_NODE=2 (gloo on CPU): 8 rows = step 1 over both ranks and both micro-batches.

    weight_norm=mean: step 1 divides each micro-batch by its own mean (so eaft/weight = 1);
    step 2 divides by step 1's global mean raw weight, which for gate=soft, alpha=1 is step 1's
    global mean entropy: eaft/weight(2) = eaft/entropy(2) / eaft/entropy(1) only if the mean was
    reduced over both ranks and both micro-batches.
    """
    data = tmp_path / "train.jsonl"
    rows = write_rows(data, 8, seed=5)
    proc, logged = swift_sft(smollm2_dir, data, tmp_path / "out", "--loss_type", "eaft",
                             "--eaft_weight_norm", "mean", nproc=2)
    assert "torch.distributed.run" in proc.stdout + proc.stderr
    assert len(logged) == 2, logged
    s1, s2 = logged
    ref = per_token(model, encode_like_swift(smollm2_dir, rows))
    assert s1["eaft/ce"] == pytest.approx(float(ref["ce"].mean()), rel=2e-4)
    assert s1["eaft/entropy"] == pytest.approx(float(ref["entropy"].mean()), rel=2e-4)
    assert s1["eaft/weight"] == pytest.approx(1.0, abs=1e-5)
    assert s2["eaft/weight"] == pytest.approx(s2["eaft/entropy"] / s1["eaft/entropy"], rel=1e-4)
    assert s2["eaft/weight"] != pytest.approx(1.0, abs=1e-3)


def test_bad_flag_value_errors_naming_the_flag(smollm2_dir, scaled_data, tmp_path):
    data, _ = scaled_data
    proc, _ = swift_sft(smollm2_dir, data, tmp_path, "--loss_type", "eaft", "--eaft_gate", "sharp", check=False)
    assert proc.returncode != 0
    assert "--eaft_gate 'sharp' is invalid: gate must be one of ['soft', 'hard', 'shuffle']" in proc.stderr


def test_eaft_flag_without_loss_type_errors(smollm2_dir, scaled_data, tmp_path):
    data, _ = scaled_data
    proc, _ = swift_sft(smollm2_dir, data, tmp_path, "--eaft_alpha", "0.5", check=False)
    assert proc.returncode != 0
    assert "--eaft_alpha set but --loss_type is None" in proc.stderr
    assert "--loss_type eaft" in proc.stderr
    assert not (tmp_path / "logging.jsonl").exists()


def test_fused_run_equals_dense_run(eaft_run, eaft_fused_run):
    """--eaft_fused true: same step-1 loss and eaft/* metrics as the dense run; step 2 (after one update
    from the fused gradients) and the eval loss (eval with labels through the patched forward) too."""
    dense_proc, dense = eaft_run
    fused_proc, fused = eaft_fused_run
    assert len(fused) == len(dense) == 2, fused
    keys = ("loss", "eaft/ce", "eaft/weight", "eaft/entropy", "eaft/conflict_frac")
    for key in keys:
        assert fused[0][key] == pytest.approx(dense[0][key], rel=1e-4, abs=1e-7), key
    # Steps 1 and 2 see the same 4 rows (one epoch each), so their difference is the update's effect alone.
    update = abs(dense[1]["loss"] - dense[0]["loss"])
    assert update > 1e-3
    assert abs(fused[1]["loss"] - dense[1]["loss"]) < 0.01 * update
    assert "token_acc" in dense[0] and "token_acc" not in fused[0]  # the fused path never builds logits
    assert len(fused_proc.eval_rows) == 1
    ev, dense_ev = fused_proc.eval_rows[0], dense_proc.eval_rows[0]
    assert ev["eval_loss"] == pytest.approx(dense_ev["eval_loss"], rel=1e-4)
    for key in ("eval_eaft/ce", "eval_eaft/weight", "eval_eaft/entropy", "eval_eaft/conflict_frac"):
        assert ev[key] == pytest.approx(dense_ev[key], rel=1e-4, abs=1e-7), key


def test_liger_without_fused_errors_naming_the_fix(smollm2_dir, scaled_data, tmp_path):
    data, _ = scaled_data
    proc, _ = swift_sft(smollm2_dir, data, tmp_path, "--loss_type", "eaft", "--use_liger_kernel", "true", check=False)
    assert proc.returncode != 0
    assert "--loss_type eaft with --use_liger_kernel" in proc.stderr
    assert "Set --eaft_fused true" in proc.stderr and "or --use_liger_kernel false" in proc.stderr
    assert not (tmp_path / "logging.jsonl").exists()


# ---- --loss_type sft_kl / flow / talr: one real `swift sft` run each, on a tiny random model (SmolLM2's weights are
# not the point), the loss-scaled rows, 2 steps of 2 micro-batches x 2 rows (both steps see the same 4 rows).
# FLOW runs fused (no logits): step 1 must still equal the dense op.

METHOD_RUNS = {
    "sft_kl": (("--sft_kl_beta", "0.3"), {"beta": 0.3}),
    "flow": (("--flow_fused", "true"), {}),
    "talr": (("--talr_tau", "1.5"), {"tau": 1.5}),  # a given tau: the sum over rows does not depend on the grouping
}


@pytest.fixture(scope="module")
def tiny_dir(smollm2_dir, tmp_path_factory):
    from frameworks import tiny_llama

    return tiny_llama(smollm2_dir, tmp_path_factory.mktemp("swift_tiny") / "model", head_std=4.0)


@pytest.fixture(scope="module", params=list(METHOD_RUNS))
def method_run(request, tiny_dir, scaled_data, tmp_path_factory):
    data, _ = scaled_data
    method = request.param
    return method, swift_sft(tiny_dir, data, tmp_path_factory.mktemp(f"swift_{method}"), "--loss_type", method,
                             "--is_binary_loss_scale", "false", *METHOD_RUNS[method][0])


def method_reference(tiny_dir, rows, method, options):
    """Step 1 recomputed: swift's own encoding of the 4 rows, the untouched model on each row, the method's op per
    row with N = the step's supervised tokens (SFT-KL: the starting model is the model itself at step 1; FLOW: the
    weights from the 4 rows' starting losses)."""
    from transformers import AutoModelForCausalLM

    from eaft_plugins.ops.flow import flow_loss, flow_weights, sequence_losses
    from eaft_plugins.ops.sft_kl import sft_kl_loss
    from eaft_plugins.ops.talr import talr_loss
    from eaft_plugins.stats import MethodStats

    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.float32).eval()
    ref = per_token(model, encode_like_swift(tiny_dir, rows, is_binary_loss_scale=False))
    n = ref["ce"].numel()
    parts = zip(ref["logits"], ref["labels"], ref["loss_scale"])
    weights = flow_weights(torch.cat([sequence_losses(z[None], y[None]) for z, y in zip(ref["logits"], ref["labels"])]))[0]
    outs = []
    for i, (z, y, s) in enumerate(parts):
        kw = dict(token_scale=s[None], num_items_in_batch=n, **options)
        if method == "sft_kl":
            outs.append(sft_kl_loss(z[None], y[None], z[None].clone(), **kw))
        elif method == "flow":
            outs.append(flow_loss(z[None], y[None], weights[i:i + 1], **kw))
        else:
            outs.append(talr_loss(z[None], y[None], **kw))
    stats = sum((o.stats for o in outs[1:]), outs[0].stats)
    return dict(MethodStats.means(stats, f"{method}/"), loss=sum(o.loss.item() for o in outs))


def test_each_method_trains_and_its_step_one_loss_is_the_op(tiny_dir, scaled_data, method_run):
    from frameworks import check_method_steps

    _, rows = scaled_data
    method, (proc, logged) = method_run
    check_method_steps(logged, method_reference(tiny_dir, rows, method, METHOD_RUNS[method][1]), method, rel=2e-4,
                       tokens=False)  # ms-swift logs the means, not the token count
    step1 = logged[0]
    if method == "flow":
        assert "token_acc" not in step1  # the fused path never builds logits
        assert "starting losses of 4 training examples measured before step 1" in proc.stdout + proc.stderr
