"""The retention monitor through the real frameworks on SmolLM2 (CPU, two steps, a four-row probe):
LLaMA-Factory (`llamafactory-cli train`, plain SFT: no use_eaft_loss), TRL SFTTrainer (with EAFT), a plain
transformers.Trainer (with_retention), and the key checks that stop before training."""

import json
import sys
from pathlib import Path

import pytest

from eaft_plugins.tools.demo import log_history, run_train, train_config, write_dataset, write_yaml

ROOT = Path(__file__).resolve().parents[2]
PROBE = ['{"prompt": "Name a colour."}', '{"prompt": "Say hello in French."}',
         '{"text": "The Moon is Earth\'s only natural satellite. It causes the tides."}',
         '{"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"], "answer": 0}']
KEYS = ("retention/kl_base", "retention/text_nll", "retention/text_nll_delta", "retention/mc_logp",
        "retention/mc_logp_delta")


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    p = tmp_path_factory.mktemp("probe") / "probe.jsonl"
    p.write_text("\n".join(PROBE) + "\n")
    return str(p)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("ret_data"), 16, seed=3)


def default_steps(log, last):
    """The probe steps under the default interval: the one the monitor printed, plus step 0 and the last step."""
    line = next(x for x in log.splitlines() if "measuring every" in x)
    n = int(line.split("measuring every ")[1].split()[0])
    return [0] + [s for s in range(1, last + 1) if s % n == 0 or s == last]


def check_curve(history, steps, out_dir, expected=None):
    expected = expected or list(range(0, steps + 1))
    rows = [r for r in history if "retention/kl_base" in r]
    assert [r["step"] for r in rows] == expected
    assert rows[0]["retention/kl_base"] == 0.0 and rows[0]["retention/text_nll_delta"] == 0.0
    assert all(set(KEYS) <= set(r) for r in rows)
    assert rows[-1]["retention/kl_base"] > 0  # training moved the model
    assert all("loss" in r for r in rows[1:])  # logged in the step's own training entry
    lines = [json.loads(x) for x in (Path(out_dir) / "retention.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == expected
    assert (Path(out_dir) / "retention.png").stat().st_size > 1000
    return rows


# ---------------------------------------------------------------- LLaMA-Factory parser (no training)

llamafactory = pytest.importorskip("llamafactory", reason="SKIPPED: llamafactory is not installed in this environment")


def parse(smollm2_dir, data_dir, tmp_path, **kw):
    from llamafactory.hparams import get_train_args

    return get_train_args(train_config(smollm2_dir, data_dir, tmp_path / "out", steps=1, eaft=False, **kw))


def test_lf_keys_work_without_eaft(smollm2_dir, data_dir, tmp_path, probe):
    finetuning_args = parse(smollm2_dir, data_dir, tmp_path, retention_probe=probe, retention_steps=5)[3]
    assert finetuning_args.retention_probe == probe and finetuning_args.retention_steps == 5
    assert finetuning_args.use_eaft_loss is False


@pytest.mark.parametrize("kw, match", [
    ({"retention_probe": "/nonexistent/probe.jsonl"}, r"LLaMA-Factory key `retention_probe`: probe file '/nonexistent"),
    ({"retention_steps": 5}, r"`retention_steps` is set but LLaMA-Factory key `retention_probe` is not"),
    ({"retention_probe": "builtin", "retention_steps": 0}, r"LLaMA-Factory key `retention_steps` must be an integer"),
    ({"retention_probe": "builtin", "stage": "pt"}, r"`retention_probe` needs `stage: sft`"),
])
def test_lf_bad_keys_stop_before_training(smollm2_dir, data_dir, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        parse(smollm2_dir, data_dir, tmp_path, **kw)


def test_lf_malformed_probe_names_the_row(smollm2_dir, data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl row 2: \"prompt\" must be a non-empty string"):
        parse(smollm2_dir, data_dir, tmp_path, retention_probe=str(bad))


# ---------------------------------------------------------------- real runs


@pytest.mark.e2e
def test_llamafactory_cli_plain_sft_logs_retention(smollm2_dir, data_dir, tmp_path, probe):
    out = tmp_path / "sft"
    cfg = train_config(smollm2_dir, data_dir, out, steps=2, eaft=False, cutoff_len=128, retention_probe=probe,
                       retention_steps=1, learning_rate=1e-4)
    proc = run_train(write_yaml(cfg, tmp_path / "sft.yaml"), check=False, capture_output=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-6000:]
    check_curve(log_history(out), 2, out)
    assert "retention curves:" in proc.stdout + proc.stderr


TRL_SCRIPT = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from eaft_plugins.tools import mathgen
model, out, probe, mode = sys.argv[1:5]
rows = [{"prompt": [{"role": "user", "content": r["question"]}],
         "completion": [{"role": "assistant", "content": r["answer"].splitlines()[-2]}]} for r in mathgen.generate(4, seed=2)]
common = dict(output_dir=out, per_device_train_batch_size=2, max_steps=2, logging_steps=1, save_strategy="no",
              report_to="none", use_cpu=True, learning_rate=1e-4, dataloader_num_workers=0)
if mode == "trl":
    args = SFTConfig(**common, max_length=96, loss_type="eaft", retention_probe=probe)   # default interval: logging_steps
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
else:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from eaft_plugins.retention import with_retention
    tok = AutoTokenizer.from_pretrained(model)
    enc = []
    for r in rows:
        p = tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False)
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        c_ids = tok(r["completion"][0]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        enc.append({"input_ids": p_ids + c_ids, "labels": [-100] * len(p_ids) + c_ids})
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                      args=TrainingArguments(**common), train_dataset=Dataset.from_list(enc), processing_class=tok,
                      data_collator=DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100))
    with_retention(trainer, probe=probe, steps=1)
trainer.train()
json.dump(trainer.state.log_history, open(out + "/history.json", "w"))
"""


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["trl", "hf"])
def test_trl_and_plain_trainer_log_retention(smollm2_dir, tmp_path, probe, mode):
    import subprocess

    from eaft_plugins.tools.demo import cli_env

    out = tmp_path / mode
    out.mkdir()
    proc = subprocess.run([sys.executable, "-c", TRL_SCRIPT, str(smollm2_dir), str(out), probe, mode],
                          capture_output=True, text=True, env=cli_env(), timeout=1800, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    history = json.loads((out / "history.json").read_text())
    # TRL: the default interval (logging_steps 1, or the multiple of it the monitor printed); hf: steps=1
    rows = check_curve(history, 2, out, default_steps(proc.stdout + proc.stderr, 2) if mode == "trl" else None)
    if mode == "trl":  # EAFT and the monitor side by side in one entry
        assert "eaft/weight" in rows[1] and "eaft/weight" not in rows[0]


@pytest.mark.e2e
def test_trl_config_refuses_a_missing_probe(tmp_path):
    from trl import SFTConfig

    with pytest.raises(ValueError, match=r"SFTConfig field `retention_probe` \(--retention_probe\): probe file"):
        SFTConfig(output_dir=str(tmp_path), retention_probe=str(tmp_path / "none.jsonl"), use_cpu=True,
                  report_to="none")
