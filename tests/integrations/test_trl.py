"""TRL: the real `SFTTrainer` with `SFTConfig(loss_type="eaft", ...)` on SmolLM2, CPU, a step or two.

Two TRL releases: the one in `.venv` (0.24.x, pinned by llamafactory 0.9.5) and the newest one in
`.venv-trl` (scripts/setup.sh trl). The scenarios run as subprocesses of this file (`python
tests/integrations/test_trl.py scenarios OUT.json`) under each venv's python, so one pytest process checks both;
the step-1 numbers are compared with a plain-torch recomputation made by the same subprocess on the
untrained model and the batch TRL's own collator builds from the same rows.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IGNORE = -100
TOPK, ALPHA = 10, 0.5  # not the defaults, so the settings provably reach the loss

VENVS = {"trl024": ROOT / ".venv", "trl-newest": ROOT / ".venv-trl"}


# ================================================================================================
# Scenario code: runs inside a venv with TRL (as `python tests/integrations/test_trl.py ...`), prints nothing to
# rely on, writes JSON.
# ================================================================================================


def _rows(n, seed):
    from eaft_plugins.tools import mathgen

    # short rows (a one-word system prompt, the answer's last line): a CPU step stays around a second
    return [{"prompt": [{"role": "system", "content": "Math."}, {"role": "user", "content": r["question"]}],
             "completion": [{"role": "assistant", "content": r["answer"].splitlines()[-2]}]}
            for r in mathgen.generate(n, seed=seed)]


def _config(out, **kw):
    from trl import SFTConfig

    base = dict(output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=1,
                logging_steps=1, save_strategy="no", report_to="none", bf16=False, fp16=False, use_cpu=True,
                dataloader_num_workers=0, learning_rate=5e-4, max_length=128, seed=0)
    base.update(kw)
    return SFTConfig(**base)


def _model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def _trainer(model_dir, out, rows, model=None, **kw):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    peft_config = kw.pop("peft_config", None)
    eval_rows = kw.pop("eval_rows", None)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    return SFTTrainer(model=model if model is not None else _model(model_dir), args=_config(out, **kw),
                      train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_config,
                      eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None)


CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _reference(trainer, topk=TOPK, alpha=ALPHA):
    """Plain torch on the untrained model: the batch TRL's collator builds from every training row."""
    import torch

    from eaft_plugins.ops.dense import eaft_loss

    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    labels = batch["labels"]
    model_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        logits = trainer.model(**model_inputs).logits.float()
    z, y = logits[:, :-1], labels[:, 1:]
    keep = y != IGNORE
    z, y = z[keep], y[keep]
    ce = torch.logsumexp(z, -1) - z.gather(1, y[:, None])[:, 0]
    p = torch.softmax(torch.topk(z, topk, dim=-1).values, -1)
    ent = -(p * torch.log(p)).sum(-1) / math.log(topk)
    w = ent ** alpha
    n = int((labels != IGNORE).sum())  # the trainer's num_items_in_batch (unshifted labels)
    core = eaft_loss(logits, labels, topk=topk, alpha=alpha, num_items_in_batch=n).loss
    return {"loss": float((w * ce).sum() / n), "nll": float(ce.sum() / n), "core": float(core),
            "ce": float(ce.mean()), "entropy": float(ent.mean()), "weight": float(w.mean()),
            "conflict_frac": float(((ent < 0.15) & (torch.exp(-ce) < 0.1)).double().mean()),
            "tokens": int(keep.sum()), "padding_free": "position_ids" in batch and "attention_mask" not in batch,
            "supervised_text": [trainer.processing_class.decode(row[row != IGNORE]) for row in labels]
            if getattr(trainer, "processing_class", None) is not None else None,
            "rows_with_prompt_masked": int((labels[:, 0] == IGNORE).sum()), "rows": int(labels.shape[0])}


# The math table's other losses: one run each, on a tiny random model (SmolLM2's weights are not the point), 2 steps
# of 2 micro-batches x 1 row (both steps see the same 2 rows). TALR runs fused (no logits). (SFTConfig fields, the op's
# options)
METHOD_SCENARIOS = {
    "sft_kl": ({"sft_kl_beta": 0.3, "sft_kl_direction": "reverse"}, {"beta": 0.3, "direction": "reverse"}),
    "flow": ({}, {}),
    "talr": ({"talr_min_weight": 0.05, "talr_fused": True}, {"min_weight": 0.05}),
}


def _method_reference(trainer, method, options):
    """Step 1 recomputed with the method's op on the untrained model and the batch TRL's collator builds from every
    training row, one micro-batch (row) at a time with N = the step's supervised tokens. SFT-KL: the starting model
    is the model itself at step 1; FLOW: the weights from the rows' starting losses (tau: their median)."""
    import torch

    from eaft_plugins.ops.flow import flow_loss, flow_weights, sequence_losses
    from eaft_plugins.ops.sft_kl import sft_kl_loss
    from eaft_plugins.ops.talr import talr_loss

    ds = trainer.train_dataset
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    labels = batch["labels"]
    with torch.no_grad():
        logits = trainer.model(**{k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}).logits.float()
    n = int((labels != IGNORE).sum())
    weights = flow_weights(sequence_losses(logits, labels))[0]
    outs = []
    for i in range(labels.shape[0]):
        z, y = logits[i:i + 1], labels[i:i + 1]
        if method == "sft_kl":
            outs.append(sft_kl_loss(z, y, z.clone(), num_items_in_batch=n, **options))
        elif method == "flow":
            outs.append(flow_loss(z, y, weights[i:i + 1], num_items_in_batch=n, **options))
        else:
            outs.append(talr_loss(z, y, num_items_in_batch=n, **options))
    stats = sum((o.stats for o in outs[1:]), outs[0].stats)
    return dict(stats.means(f"{method}/"), loss=sum(o.loss.item() for o in outs))


def _train(trainer):
    trainer.train()
    return [dict(r) for r in trainer.state.log_history]


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is what is checked
        return f"{type(exc).__name__}: {exc}"
    return None


# The retention monitor rides on scenario 1 (SFTTrainer, the default interval) and on the plain-Trainer one-liner.
RETENTION = ['{"prompt": "Name a colour."}', '{"prompt": "Say hello in French."}',
             '{"text": "The Moon is Earth\'s only natural satellite. It causes the tides."}',
             '{"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Madrid"], "answer": 0}']


def _retention(trainer):
    """What a run's retention monitor logged and wrote, and the interval it chose."""
    out = Path(trainer.args.output_dir)
    return {"interval": trainer._retention.interval,
            "jsonl_steps": [json.loads(x)["step"] for x in (out / "retention.jsonl").read_text().splitlines()],
            "png": (out / "retention.png").stat().st_size if (out / "retention.png").exists() else 0}


def scenarios(out_json, with_hf=""):
    import tempfile
    import warnings

    import trl

    from eaft_plugins.tools.smollm2 import local_smollm2

    warnings.filterwarnings("ignore")
    model_dir = local_smollm2()
    tmp = Path(tempfile.mkdtemp())
    probe = tmp / "probe.jsonl"
    probe.write_text("\n".join(RETENTION) + "\n")
    rows, res = _rows(2, seed=3), {"trl": trl.__version__, "seconds": {}}
    res["matplotlib"] = importlib.util.find_spec("matplotlib") is not None  # retention.png is drawn only with it
    clock = [time.perf_counter()]

    def lap(name):
        now = time.perf_counter()
        res["seconds"][name] = round(now - clock[0], 1)
        clock[0] = now
    eaft = dict(loss_type="eaft", eaft_topk=str(TOPK), eaft_alpha=ALPHA)

    # 1. EAFT, 2 steps of 2 micro-batches x 1 row (both steps see the same 2 rows), eval at step 2, the retention
    #    monitor at its default interval
    t = _trainer(model_dir, tmp / "eaft", rows, max_steps=2, eval_rows=rows[:2], eval_strategy="steps", eval_steps=2,
                 per_device_eval_batch_size=2, retention_probe=str(probe), **eaft)
    res["eaft_ref"] = _reference(t)
    res["eaft"] = _train(t)
    res["eaft_args"] = {"loss_type": t.args.loss_type, "eaft_topk": t.args.eaft_topk}
    res["eaft_retention"] = _retention(t)
    lap("eaft")

    # 2. TRL's own nll on the same rows
    t = _trainer(model_dir, tmp / "nll", rows)
    res["nll_ref"] = _reference(t)
    res["nll"] = _train(t)
    lap("nll")

    # 3. LoRA (peft): B = 0 at step 1, so the reference is the base model's
    from peft import LoraConfig

    t = _trainer(model_dir, tmp / "lora", rows, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj",
                 "v_proj"], task_type="CAUSAL_LM"), **eaft)
    res["lora_ref"] = _reference(t)
    res["lora_type"] = type(t.model).__name__
    res["lora"] = _train(t)
    lap("lora")

    # 4. packing (bfd: padding-free, position_ids, one packed row), one micro-batch of everything
    t = _trainer(model_dir, tmp / "packing", rows, packing=True, max_length=512, per_device_train_batch_size=2,
                 gradient_accumulation_steps=1, **eaft)
    res["packing_ref"] = _reference(t)
    res["packing"] = _train(t)
    lap("packing")

    # 5. eaft_fused: the loss from the hidden states and the LM head, no logits
    t = _trainer(model_dir, tmp / "fused", rows, eaft_fused="true", **eaft)
    res["fused_ref"] = _reference(t)
    res["fused"] = _train(t)
    lap("fused")

    # 6. assistant_only_loss on conversational data: a chatml template with {% generation %} markers
    template = tmp / "chatml_generation.jinja"
    template.write_text(CHATML_GENERATION)
    messages = [{"messages": r["prompt"] + r["completion"]} for r in rows]
    t = _trainer(model_dir, tmp / "assistant", messages, assistant_only_loss=True, chat_template_path=str(template),
                 **eaft)
    res["assistant_ref"] = _reference(t)
    res["assistant_contents"] = [r["completion"][0]["content"] for r in rows]
    res["assistant"] = _train(t)
    lap("assistant_only")

    # 7. SFT-KL, FLOW, TALR (METHOD_SCENARIOS)
    sys.path.insert(0, str(ROOT / "tests"))
    from frameworks import tiny_llama

    tiny = tiny_llama(model_dir, tmp / "tiny", head_std=4.0)
    for method, (fields, options) in METHOD_SCENARIOS.items():
        t = _trainer(tiny, tmp / method, rows, max_steps=2, loss_type=method, **fields)
        res[f"{method}_ref"] = _method_reference(t, method, options)
        res[method] = _train(t)
        lap(method)

    # 8. refused settings
    model = _model(model_dir)
    res["errors"] = {
        "topk_over_vocab": _error(lambda: _trainer(model_dir, tmp / "e1", rows, model=model, loss_type="eaft",
                                                   eaft_topk=10 ** 6)),
        "field_without_loss_type": _error(lambda: _config(tmp / "e2", eaft_alpha=1.0)),
        "default_value_without_loss_type": _error(lambda: _config(tmp / "e2", eaft_topk=20)),
        "bad_gate": _error(lambda: _config(tmp / "e3", loss_type="eaft", eaft_gate="sharp")),
        "bad_bool": _error(lambda: _config(tmp / "e3", loss_type="eaft", eaft_fused="maybe")),
        "liger": _error(lambda: _config(tmp / "e4", loss_type="eaft", use_liger_kernel=True)),
        "label_smoothing": _error(lambda: _config(tmp / "e5", loss_type="eaft", label_smoothing_factor=0.1)),
        "compute_loss_func": _error(lambda: _trainer_with_loss_func(model_dir, tmp / "e6", rows, model)),
        "fused_lora_lm_head": _error(lambda: _trainer(
            model_dir, tmp / "e7", rows, model=_model(model_dir), loss_type="eaft", eaft_fused=True,
            peft_config=__import__("peft").LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"],
                                                      task_type="CAUSAL_LM"))),
        "unsupported_version": _unsupported_version(tmp / "e8"),
    }
    lap("errors")
    if with_hf:
        res["hf"] = hf_trainer(model_dir, tmp / "hf", probe)
        lap("hf_trainer")
    Path(out_json).write_text(json.dumps(res))


def _trainer_with_loss_func(model_dir, out, rows, model):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    return SFTTrainer(model=model, args=_config(out, loss_type="eaft"), train_dataset=Dataset.from_list(rows),
                      processing_class=AutoTokenizer.from_pretrained(str(model_dir)),
                      compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.logits.sum())


def _unsupported_version(out):
    from eaft_plugins.integrations import trl as integration

    real = integration.trl_version
    integration.trl_version = lambda: "0.29.1"
    try:
        return _error(lambda: _config(out, loss_type="eaft"))
    finally:
        integration.trl_version = real


def dist(out_dir):
    """Under torchrun (2 CPU processes, gloo): one step over 4 rows = 2 ranks x 2 micro-batches x 1 row."""
    import warnings

    import torch.distributed as tdist

    from eaft_plugins.tools.smollm2 import local_smollm2

    warnings.filterwarnings("ignore")
    out_dir = Path(out_dir)
    model_dir = local_smollm2()
    rows = _rows(4, seed=7)
    t = _trainer(model_dir, out_dir / "run", rows, ddp_backend="gloo", loss_type="eaft", eaft_weight_norm="none")
    rank = tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", 0))
    ref = _reference(t, topk=20, alpha=1.0) if rank == 0 else None
    seen = []
    own = t.compute_loss

    def counting(model, inputs, *a, **kw):
        seen.append(int((inputs["labels"][:, 1:] != IGNORE).sum()))
        return own(model, inputs, *a, **kw)

    t.compute_loss = counting
    logs = _train(t)
    world = tdist.get_world_size() if tdist.is_initialized() else 1
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"seen": seen, "logs": logs, "world": world, "ref": ref}))


def hf_trainer(model_dir, out, probe):
    """A plain transformers.Trainer made EAFT by the documented one-liner, its retention monitor by the other one."""
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from eaft_plugins.integrations.hf_trainer import with_eaft, with_loss
    from eaft_plugins.retention import with_retention

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    encoded = []
    for row in _rows(2, seed=5):
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        c_ids = tok(row["completion"][0]["content"] + tok.eos_token, add_special_tokens=False)["input_ids"]
        encoded.append({"input_ids": p_ids + c_ids, "labels": [IGNORE] * len(p_ids) + c_ids})
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             max_steps=2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                             learning_rate=5e-4, seed=0)
    collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
    trainer = Trainer(model=_model(model_dir), args=args, train_dataset=Dataset.from_list(encoded),
                      data_collator=collator, processing_class=tok)
    trainer = with_eaft(trainer, eaft_topk=TOPK, eaft_alpha=str(ALPHA))  # the documented one-liner
    with_retention(trainer, probe=str(probe), steps=1)
    ref = _reference(trainer)
    logs = _train(trainer)
    bad = _error(lambda: with_eaft(Trainer(model=_model(model_dir), args=args, data_collator=collator),
                                   eaft_gate="sharp"))
    res = {"ref": ref, "logs": logs, "bad": bad, "retention": _retention(trainer)}
    # with_loss for the methods that hold starting-model state (SFT-KL's frozen copy, FLOW's weights pass)
    for method in ("sft_kl", "flow"):
        args.output_dir = str(out / method)
        t = with_loss(Trainer(model=_model(model_dir), args=args, train_dataset=Dataset.from_list(encoded),
                              data_collator=collator, processing_class=tok), method)
        res[f"{method}_ref"] = _method_reference(t, method, {})
        res[method] = _train(t)
    return res


# ================================================================================================
# The tests (pytest, in .venv).
# ================================================================================================


def _python(venv):
    python = VENVS[venv] / "bin" / "python"
    if not python.exists():
        setup = "scripts/setup.sh trl" if venv == "trl-newest" else "scripts/setup.sh"
        pytest.skip(f"SKIPPED: {VENVS[venv].name} is missing (TRL {venv}): run {setup}")
    probe = subprocess.run([str(python), "-c", "import trl, peft; print(trl.__version__)"], capture_output=True,
                           text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"SKIPPED: {python} cannot import trl / peft: {probe.stderr[-300:]}")
    return str(python)


def _env(threads=2):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "EAFT_PLUGINS_DISABLE"):
        env.pop(key, None)
    return env


def _run(cmd, timeout=900, threads=2):
    proc = subprocess.run(cmd, env=_env(threads), capture_output=True, text=True, timeout=timeout, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="module", params=list(VENVS))
def run(request, smollm2_dir, tmp_path_factory):
    python = _python(request.param)
    out = tmp_path_factory.mktemp(f"trl_{request.param}") / "result.json"
    # the plain-Trainer one-liner runs beside TRL 0.24 (its transformers is LLaMA-Factory's)
    _run([python, str(Path(__file__)), "scenarios", str(out), "hf" if request.param == "trl024" else ""])
    result = json.loads(out.read_text())
    if request.param == "trl-newest":
        assert not result["trl"].startswith("0."), result["trl"]
    else:
        assert result["trl"].startswith("0.24."), result["trl"]
    return result


def _steps(logs):
    return [r for r in logs if "loss" in r and "eval_loss" not in r and "train_runtime" not in r]


def _check_step1(row, ref, rel=2e-4):
    assert row["loss"] == pytest.approx(ref["loss"], rel=rel)
    for key in ("ce", "entropy", "weight"):
        assert row[f"eaft/{key}"] == pytest.approx(ref[key], rel=rel), key
    assert row["eaft/conflict_frac"] == pytest.approx(ref["conflict_frac"], abs=1e-6)
    assert row["eaft/tokens"] == ref["tokens"]


@pytest.mark.e2e
def test_step1_loss_and_metrics_equal_recomputation(run):
    ref = run["eaft_ref"]
    assert ref["rows"] == 2 and ref["rows_with_prompt_masked"] == 2  # completion-only labels (prompt masked)
    assert ref["core"] == pytest.approx(ref["loss"], rel=1e-5)  # the core op agrees with the plain formula
    steps = _steps(run["eaft"])
    assert len(steps) == 2, run["eaft"]
    _check_step1(steps[0], ref)
    assert steps[1]["loss"] != pytest.approx(steps[0]["loss"], rel=1e-3)  # the update changed the model
    # TRL's own metrics are still there, from the same forward
    assert "mean_token_accuracy" in steps[0] and "num_tokens" in steps[0] and "entropy" in steps[0]
    assert run["eaft_args"] == {"loss_type": "eaft", "eaft_topk": str(TOPK)}


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(METHOD_SCENARIOS))
def test_each_method_trains_and_its_step_one_loss_is_the_op(run, method):
    from frameworks import check_method_steps

    steps = _steps(run[method])
    check_method_steps(steps, run[f"{method}_ref"], method, rel=2e-4)
    if method == "talr":
        assert "mean_token_accuracy" not in steps[0]  # fused: no logits were built


@pytest.mark.e2e
def test_eval_loss_is_eaft_with_eval_metrics(run):
    evals = [r for r in run["eaft"] if "eval_loss" in r]
    assert len(evals) == 1, run["eaft"]
    ev = evals[0]
    for key in ("eval_eaft/ce", "eval_eaft/weight", "eval_eaft/entropy", "eval_eaft/conflict_frac"):
        assert key in ev
    assert ev["eval_eaft/tokens"] > 0
    assert 0 < ev["eval_eaft/weight"] < 1
    assert ev["eval_loss"] < ev["eval_eaft/ce"]  # weighted by Htilde ** 0.5 < 1: not the plain CE


@pytest.mark.e2e
def test_nll_differs_and_equals_plain_ce(run):
    nll = _steps(run["nll"])[0]
    assert not any(k.startswith("eaft/") for k in nll)
    assert nll["loss"] == pytest.approx(run["nll_ref"]["nll"], rel=2e-4)
    eaft = _steps(run["eaft"])[0]["loss"]
    assert abs(nll["loss"] - eaft) > 0.05 * nll["loss"]


@pytest.mark.e2e
def test_lora(run):
    assert run["lora_type"].startswith("Peft")
    _check_step1(_steps(run["lora"])[0], run["lora_ref"])


@pytest.mark.e2e
def test_packing_padding_free(run):
    ref = run["packing_ref"]
    assert ref["padding_free"] and ref["rows"] == 1  # one packed row, position_ids, no attention mask
    _check_step1(_steps(run["packing"])[0], ref, rel=1e-3)
    # the packed rows score the same tokens as the padded batch of the first run, with the same numbers
    assert ref["tokens"] == run["eaft_ref"]["tokens"]
    assert ref["loss"] == pytest.approx(run["eaft_ref"]["loss"], rel=1e-3)


@pytest.mark.e2e
def test_fused(run):
    row = _steps(run["fused"])[0]
    _check_step1(row, run["fused_ref"], rel=1e-4)
    assert "mean_token_accuracy" not in row  # no logits were built


@pytest.mark.e2e
def test_assistant_only_loss(run):
    ref = run["assistant_ref"]
    # exactly the assistant turns (content + end of turn) are supervised: TRL's assistant masks reached the loss
    assert ref["supervised_text"] == [c + "<|im_end|>" for c in run["assistant_contents"]]
    _check_step1(_steps(run["assistant"])[0], ref)


@pytest.mark.e2e
def test_refused_settings_name_the_field(run):
    e = run["errors"]
    assert "SFTConfig field `eaft_topk` (--eaft_topk)" in e["topk_over_vocab"] and "vocabulary" in e["topk_over_vocab"]
    assert "SFTConfig field `eaft_alpha` (--eaft_alpha) set but loss_type='nll'" in e["field_without_loss_type"]
    assert 'only apply with loss_type="eaft"' in e["field_without_loss_type"]
    assert "SFTConfig field `eaft_topk` (--eaft_topk) set but loss_type='nll'" in e["default_value_without_loss_type"]
    assert "SFTConfig field `eaft_gate` (--eaft_gate) 'sharp' is invalid" in e["bad_gate"]
    assert "['soft', 'hard', 'shuffle']" in e["bad_gate"]
    assert "eaft_fused" in e["bad_bool"] and "'maybe'" in e["bad_bool"]
    assert "use_liger_kernel" in e["liger"] and "eaft_fused=True" in e["liger"]
    assert "label_smoothing_factor" in e["label_smoothing"]
    assert "compute_loss_func" in e["compute_loss_func"]
    assert "eaft_fused=True" in e["fused_lora_lm_head"] and "lm_head" in e["fused_lora_lm_head"]
    assert "0.24.x" in e["unsupported_version"] and "1.16.x" in e["unsupported_version"]
    assert "found trl 0.29.1" in e["unsupported_version"]


@pytest.mark.e2e
@pytest.mark.dist
def test_torchrun_two_processes_reduce_metrics(smollm2_dir, tmp_path):
    from frameworks import free_port

    python = _python("trl024")
    _run([python, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
          str(free_port()), str(Path(__file__)), "dist", str(tmp_path)], threads=1)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert len(r0["seen"]) == len(r1["seen"]) == 2  # two micro-batches each
    ref = r0["ref"]
    total = sum(r0["seen"]) + sum(r1["seen"])
    assert total == ref["tokens"] and 0 < sum(r0["seen"]) < total
    for logs in (r0["logs"], r1["logs"]):  # every rank logs the same reduced numbers
        step = _steps(logs)[0]
        assert step["eaft/tokens"] == total
        assert step["eaft/ce"] == pytest.approx(ref["ce"], rel=2e-4)
        assert step["eaft/entropy"] == pytest.approx(ref["entropy"], rel=2e-4)
    # the loss of the step: each rank's sum over the global token count, averaged by DDP and logged from rank 0
    assert _steps(r0["logs"])[0]["loss"] == pytest.approx(ref["loss"], rel=5e-3)


def _cli_config(tmp_path, model_dir, loss: str) -> Path:
    """A `trl sft` YAML config (2 steps of 1 row, CPU) over 2 rows, with `loss` (YAML lines) choosing the loss."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(2, seed=9)))
    config = tmp_path / "sft.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\ndataset_name: {data}\noutput_dir: {tmp_path / 'out'}\n{loss}"
        "max_steps: 2\nper_device_train_batch_size: 1\nmax_length: 128\n"
        "logging_steps: 1\nsave_strategy: 'no'\nreport_to: none\nbf16: false\nuse_cpu: true\n")
    return config


@pytest.mark.e2e
@pytest.mark.parametrize("venv", list(VENVS))
def test_trl_sft_cli_with_yaml_config(venv, smollm2_dir, tmp_path):
    python = _python(venv)
    # `trl sft` parses the flags with TrlParser, then runs trl/scripts/sft.py under `accelerate launch`. TRL 0.24's
    # `trl` command imports every trainer first, and its DPO trainer needs `mergekit`, which .venv lacks (it fails
    # the same without eaft-plugins): there the script runs directly, as the launcher would run it.
    cli = [str(Path(python).with_name("trl")), "sft"] if venv == "trl-newest" else [python, "-m", "trl.scripts.sft"]
    config = _cli_config(tmp_path, smollm2_dir, "loss_type: eaft\neaft_alpha: 0.5\n")
    proc = _run([*cli, "--config", str(config), "--eaft_topk", "12",
                 "--dataloader_num_workers", "0"])
    text = proc.stdout + proc.stderr
    logged = [line for line in text.splitlines() if "eaft/ce" in line]
    assert len(logged) == 2, text[-4000:]
    assert "eaft/conflict_frac" in logged[0]
    # a bad flag value stops the CLI before the model is loaded, naming the field
    bad = subprocess.run([*cli, "--config", str(config), "--eaft_gate", "sharp"], env=_env(),
                         capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
    assert bad.returncode != 0
    assert "SFTConfig field `eaft_gate` (--eaft_gate) 'sharp' is invalid" in bad.stderr


CLI_METHODS = {"sft_kl": ("--sft_kl_beta", "0.1", "sft_kl/kl"), "flow": ("--flow_tau", "2.0", "flow/weight"),
               "talr": ("--talr_min_weight", "0.05", "talr/weight")}


@pytest.mark.e2e
@pytest.mark.parametrize("method", list(CLI_METHODS))
def test_trl_sft_cli_runs_each_method(method, smollm2_dir, tmp_path):
    """`trl sft` (the newest TRL) with loss_type <method> from the YAML and one <method>_* flag: parsed by TrlParser,
    trained, logged. The scenarios above check each method's numbers; this is the CLI's route, on a tiny model."""
    from frameworks import tiny_llama

    flag, value, metric = CLI_METHODS[method]
    python = _python("trl-newest")
    config = _cli_config(tmp_path, tiny_llama(smollm2_dir, tmp_path / "tiny"), f"loss_type: {method}\n")
    proc = _run([str(Path(python).with_name("trl")), "sft", "--config", str(config), flag, value,
                 "--dataloader_num_workers", "0"])
    text = proc.stdout + proc.stderr
    assert len([line for line in text.splitlines() if metric in line]) == 2, text[-4000:]
    if method == "flow":
        assert "tau = 2 (given)" in text


# The plain-Trainer one-liners run beside TRL 0.24's scenarios (LLaMA-Factory's transformers): that instance only.
@pytest.mark.e2e
@pytest.mark.parametrize("run", ["trl024"], indirect=True)
def test_hf_trainer_one_liner(run):
    res = run["hf"]
    _check_step1(_steps(res["logs"])[0], res["ref"])
    assert "`eaft_gate` 'sharp' is invalid" in res["bad"]


@pytest.mark.e2e
@pytest.mark.parametrize("run", ["trl024"], indirect=True)
@pytest.mark.parametrize("method", ["sft_kl", "flow"])
def test_with_loss_on_a_plain_trainer(run, method):
    from frameworks import check_method_steps

    res = run["hf"]
    check_method_steps(_steps(res[method]), res[f"{method}_ref"], method, rel=2e-4)


def _retention_rows(logs, steps):
    rows = [r for r in logs if "retention/kl_base" in r]
    assert [r["step"] for r in rows] == steps
    keys = ("retention/kl_base", "retention/text_nll", "retention/text_nll_delta", "retention/mc_logp",
            "retention/mc_logp_delta")
    assert all(set(keys) <= set(r) for r in rows)
    assert rows[0]["retention/kl_base"] == 0.0 and rows[-1]["retention/kl_base"] > 0  # training moved the model
    assert all("loss" in r for r in rows[1:])  # in the step's own training entry
    return rows


@pytest.mark.e2e
def test_retention_monitor_beside_eaft_at_the_default_interval(run):
    ret = run["eaft_retention"]
    n = ret["interval"]  # the logging interval (1), or the multiple of it the monitor chose to stay under 3%
    steps = [0] + [s for s in (1, 2) if s % n == 0 or s == 2]
    rows = _retention_rows([r for r in run["eaft"] if "eval_loss" not in r], steps)
    assert ret["jsonl_steps"] == steps and (ret["png"] > 1000 or not _has_matplotlib(run))
    assert "eaft/weight" in rows[1] and "eaft/weight" not in rows[0]  # EAFT and the monitor in one entry


@pytest.mark.e2e
@pytest.mark.parametrize("run", ["trl024"], indirect=True)
def test_with_retention_on_a_plain_trainer(run):
    ret = run["hf"]["retention"]
    _retention_rows(run["hf"]["logs"], [0, 1, 2])
    assert ret["jsonl_steps"] == [0, 1, 2] and ret["png"] > 1000


def _has_matplotlib(run):
    return run["matplotlib"]


def test_sft_config_fields_come_from_the_schema():
    """In this interpreter (.venv, TRL 0.24): the fields exist, default None, help from Setting.help."""
    dataclasses = pytest.importorskip("dataclasses")
    pytest.importorskip("trl")
    from trl import SFTConfig

    from eaft_plugins.options import SETTINGS

    fields = {f.name: f for f in dataclasses.fields(SFTConfig)}
    for s in SETTINGS:
        assert fields[s.key].default is None
        assert s.help in fields[s.key].metadata["help"]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    {"scenarios": scenarios, "dist": dist}[sys.argv[1]](*sys.argv[2:])
