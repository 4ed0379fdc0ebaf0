"""The retention monitor on a real transformers.Trainer: the default interval follows the measured cost, and a
run resumed from a checkpoint measures against the model before fine-tuning (the saved reference), not the
checkpoint; a damaged reference file is named and the next valid copy used; a rebuilt reference keeps the earlier
points apart. A tiny random Llama with SmolLM2's tokenizer keeps it to seconds; each run is its own process
(ms-swift, imported by other tests, patches transformers.Trainer in-process)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eaft_plugins.retention.callback import SHARE, auto_interval

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, sys
import torch
from datasets import Dataset
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments
from eaft_plugins.retention import with_retention

tok_dir, out, probe, steps, resume = sys.argv[1:6]
tok = AutoTokenizer.from_pretrained(tok_dir)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id))
g = torch.Generator().manual_seed(1)
rows = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 2000, (16, 24), generator=g).tolist()]
args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=6, logging_steps=1, save_steps=2,
                         report_to="none", use_cpu=True, learning_rate=3e-2, lr_scheduler_type="constant", seed=0,
                         dataloader_num_workers=0, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
with_retention(trainer, probe=probe, steps=None if steps == "auto" else int(steps))
trainer.train(resume_from_checkpoint=None if resume == "no" else resume)
json.dump(trainer.state.log_history, open(out + "/history.json", "w"))
"""

PROBE = ('{"prompt": "Name a colour."}\n{"text": "Bees make honey from the nectar of flowers."}\n'
         '{"prompt": "Say hello."}\n{"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": 1}\n')


def run(tok_dir, out, probe, steps="1", resume="no"):
    from eaft_plugins.tools.demo import cli_env

    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tok_dir), str(out), str(probe), steps, resume],
                          capture_output=True, text=True, env=cli_env(), timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    points = [json.loads(x) for x in (out / "retention.jsonl").read_text().splitlines()]
    return points, proc.stdout + proc.stderr


def test_auto_interval_keeps_the_probe_under_its_share():
    assert auto_interval(10, probe_s=0.1, step_s=3.0) == 10  # a cheap probe: the logging interval itself
    n = auto_interval(10, probe_s=5.0, step_s=3.0)  # 5 s probe, 3 s steps: 5 / (0.03 * 3) = 55.6 steps
    assert n == 60 and 5.0 / (n * 3.0) <= SHARE < 5.0 / ((n - 10) * 3.0)
    assert auto_interval(7, probe_s=0.0, step_s=1.0) == 7 and auto_interval(7, probe_s=1.0, step_s=0.0) == 7


@pytest.mark.parametrize("probe_s, step_s, now, last", [(5.0, 3.0, 10, 120), (61.0, 24.6, 10, 120),
                                                        (61.0, 24.6, 10, 60), (1.0, 3.0, 10, 1000), (5.0, 3.0, 10, 95)])
def test_auto_interval_counts_the_last_steps_probe(probe_s, step_s, now, last):
    """With the run's length known, every probe still to come, the always-measured last step's included, fits in
    the share, or only the last step is measured (when its probe alone is over)."""
    from eaft_plugins.retention.callback import measurements

    n = auto_interval(10, probe_s, step_s, now=now, last=last)
    periodic = auto_interval(10, probe_s, step_s)  # the share between two probes alone: where the search starts
    budget = SHARE * step_s * (last - now)
    assert n % 10 == 0 and n >= periodic
    over = [k for k in range(periodic, min(n, last + 1), 10) if measurements(now, last, k) * probe_s > budget]
    assert over == list(range(periodic, min(n, last + 1), 10))  # every shorter interval is over the share
    if n <= last:
        assert measurements(now, last, n) * probe_s <= budget
    else:  # none fits: only the last step is measured
        assert measurements(now, last, n) == 1
    # the periodic rule alone (the last step not counted) would have been over: 120 steps, interval 90
    assert measurements(10, 120, 90) == 2 and measurements(10, 120, 120) == 1 and measurements(0, 60, 20) == 3


def numeric(row):
    return {k: v for k, v in row.items() if isinstance(v, (int, float))}


@pytest.fixture(scope="module")
def first(smollm2_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    probe = base / "probe.jsonl"
    probe.write_text(PROBE)
    out = base / "run"
    points, _ = run(smollm2_dir, out, probe)
    return base, probe, out, points


@pytest.mark.e2e
def test_reference_saved_in_output_dir_and_checkpoints(first):
    _, _, out, points = first
    assert [p["step"] for p in points] == list(range(7)) and points[0]["retention/kl_base"] == 0.0
    assert points[2]["retention/kl_base"] > 1e-6  # it moved (a near-uniform random model: small KL)
    for folder in (out, out / "checkpoint-2", out / "checkpoint-4", out / "checkpoint-6"):
        assert (folder / "retention_reference.pt").is_file(), folder


@pytest.mark.e2e
def test_resumed_run_measures_against_the_model_before_fine_tuning(smollm2_dir, first):
    _, probe, out, points = first
    again, log = run(smollm2_dir, out, probe, resume=str(out / "checkpoint-2"))
    assert "NOT the model before fine-tuning" not in log
    assert [p["step"] for p in again] == list(range(7))
    assert again[:2] == points[:2]  # the first run's points before the resumed step are kept
    # At the resumed step the model is checkpoint-2: its KL from the base is the first run's (the reference is
    # the base's, not a rebuild from checkpoint-2, which would give 0); later steps replay the same batches.
    for got, want in zip(again[2:], points[2:]):
        for key, value in numeric(want).items():
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-9), (got["step"], key)


@pytest.mark.e2e
def test_damaged_checkpoint_reference_is_named_and_output_dir_copy_used(smollm2_dir, first, tmp_path):
    import shutil

    _, probe, out, points = first
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    damaged = copy / "checkpoint-4" / "retention_reference.pt"
    damaged.write_bytes(damaged.read_bytes()[:100])  # truncated, as by a full disk
    again, log = run(smollm2_dir, copy, probe, resume=str(copy / "checkpoint-4"))
    assert f"{damaged} is damaged and cannot be read" in log and "delete it" in log
    assert "weights_only" not in log and "Traceback" not in log
    assert "NOT the model before fine-tuning" not in log  # output_dir's copy, the same base, was used
    assert numeric(again[4]) == pytest.approx(numeric(points[4]), rel=1e-4, abs=1e-9)


@pytest.mark.e2e
def test_resume_with_another_probe_rebuilds_and_keeps_the_earlier_points_apart(smollm2_dir, first, tmp_path):
    import shutil

    base, probe, out, points = first
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    other = tmp_path / "other.jsonl"
    other.write_text(PROBE + '{"text": "Water boils at one hundred degrees."}\n')
    again, log = run(smollm2_dir, copy, other, resume=str(copy / "checkpoint-4"))
    assert "does not fit: it was built from another probe" in log
    assert "NOT the model before fine-tuning" in log
    assert again[0]["step"] == 4 and again[0]["retention/kl_base"] == 0.0
    assert "earlier points (measured against the first run's reference) are kept apart in " \
           "retention.before-step4.jsonl" in log
    kept = [json.loads(x) for x in (copy / "retention.before-step4.jsonl").read_text().splitlines()]
    assert [p["step"] for p in kept] == [p["step"] for p in points]
    assert (copy / "retention_items.before-step4.jsonl").is_file()


@pytest.mark.e2e
def test_default_interval_is_printed_and_followed(smollm2_dir, first, tmp_path):
    _, probe, _, _ = first
    points, log = run(smollm2_dir, tmp_path / "auto", probe, steps="auto")
    line = next(x for x in log.splitlines() if "measuring every" in x)
    n = int(line.split("measuring every ")[1].split()[0])
    assert n >= 1 and "with_retention(steps=...) not set: the trainer's logging interval 1" in line
    assert [p["step"] for p in points] == [0] + [s for s in range(1, 7) if s % n == 0 or s == 6]


def test_default_interval_reads_the_trainers_strategies():
    from transformers import TrainerState, TrainingArguments

    from eaft_plugins.retention.callback import default_interval

    def interval(**kw):
        args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none", max_steps=60, **kw)
        state = TrainerState()
        state.max_steps = 60
        state.compute_steps(args, 60)
        return default_interval(args, state)

    assert interval(logging_steps=7) == 7
    assert interval(logging_strategy="no", eval_strategy="steps", eval_steps=12) == 12
    assert interval(logging_strategy="epoch", num_train_epochs=3) == 20
