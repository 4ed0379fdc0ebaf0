"""A tiny MoE (Qwen3-MoE) and a tiny soft-capped model (Gemma2) through the real `llamafactory-cli train`.

Step 1's logged loss is recomputed independently: LLaMA-Factory's own tokenisation of the first batch,
the untouched saved model run on the padded batch, `eaft_loss` on its (soft-capped) logits plus
`router_aux_loss_coef * aux_loss` from the model's own forward. Dense EAFT (compute_loss_func, where HF
Trainer itself would drop the router loss) and fused EAFT must both log it.
"""

import json
import math
import subprocess
import sys

import pytest

from eaft_plugins.tools.demo import cli_env, train_config, write_dataset
from frameworks import TESTS, lf_train, save_with_tokenizer

pytest.importorskip("llamafactory", reason="SKIPPED: llamafactory is not installed in this environment")

COEF = 0.5
BATCH = 4

# One process for every model's reference: {kind: its config (with `coef`)} -> {kind: {eaft, aux}}.
REFERENCE = """
import json, sys
jobs = json.loads(sys.argv[1])
sys.path.insert(0, jobs.pop("tests"))
import torch
from eaft_plugins import eaft_loss
from frameworks import sft_rows
from transformers import AutoModelForCausalLM

out = {}
for kind, job in jobs.items():
    rows = sft_rows(job["cfg"], job["batch"])
    width = max(len(r["input_ids"]) for r in rows)
    pad = lambda seq, value: list(seq) + [value] * (width - len(seq))
    ids = torch.tensor([pad(r["input_ids"], 0) for r in rows])
    mask = torch.tensor([pad([1] * len(r["input_ids"]), 0) for r in rows])
    labels = torch.tensor([pad(r["labels"], -100) for r in rows])
    model = AutoModelForCausalLM.from_pretrained(job["cfg"]["model_name_or_path"], dtype=torch.float32).eval()
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, output_router_logits=job["coef"] is not None)
        aux = getattr(res, "aux_loss", None)
        out[kind] = {"eaft": eaft_loss(res.logits, labels).loss.item(), "aux": None if aux is None else float(aux)}
print("REFERENCE", json.dumps(out))
"""


def tiny_model(kind, smollm2_dir, path):
    import torch
    import transformers

    vocab = 49152  # the SmolLM2 tokenizer's
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    if kind == "moe":
        config = transformers.Qwen3MoeConfig(**common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.Gemma2Config(**common, final_logit_softcapping=2.0)
        model = transformers.Gemma2ForCausalLM(config)
        with torch.no_grad():  # logits of a few units, so the soft-cap bends them
            model.lm_head.weight.normal_(0, 0.5)
    return save_with_tokenizer(model, smollm2_dir, path)


@pytest.fixture(scope="module")
def setup(smollm2_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_softcap")
    data = write_dataset(root / "data", 8, seed=3)
    models = {kind: tiny_model(kind, smollm2_dir, root / kind) for kind in ("moe", "softcap")}
    return root, data, models


def lf_config(setup, kind, name, **overrides):
    root, data, models = setup
    return train_config(models[kind], data, root / name, steps=2, cutoff_len=64, per_device_train_batch_size=BATCH,
                        **overrides)


def first_step(setup, kind, name, **overrides):
    rows = lf_train(lf_config(setup, kind, name, **overrides)).steps
    assert len(rows) == 2 and all(row["loss"] == row["loss"] and abs(row["loss"]) < 1e6 for row in rows)  # finite
    return rows[0]


@pytest.fixture(scope="module")
def references(setup):
    """Step 1 of both models recomputed in one process: eaft_loss on the saved model's logits over LLaMA-Factory's
    own first batch, and (MoE) the aux_loss its forward returns."""
    jobs = {kind: {"cfg": lf_config(setup, kind, f"{kind}_ref"), "batch": BATCH, "coef": COEF if kind == "moe" else None}
            for kind in ("moe", "softcap")}
    proc = subprocess.run([sys.executable, "-c", REFERENCE, json.dumps({**jobs, "tests": str(TESTS)})],
                          capture_output=True, text=True, env=cli_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.split("REFERENCE", 1)[1])


@pytest.mark.e2e
@pytest.mark.parametrize("fused", [False, True])
def test_moe_step_one_loss_includes_the_router_loss(setup, references, fused):
    row = first_step(setup, "moe", f"moe_{'fused' if fused else 'dense'}", moe_aux_loss_coef=COEF, eaft_fused=fused)
    ref = references["moe"]
    assert ref["aux"] is not None and COEF * ref["aux"] > 1e-3 * abs(ref["eaft"])  # large enough to tell
    assert row["loss"] == pytest.approx(ref["eaft"] + COEF * ref["aux"], rel=1e-4)
    assert row["loss"] != pytest.approx(ref["eaft"], rel=1e-4)


@pytest.mark.e2e
def test_softcapped_family_fused_step_one_loss(setup, references):
    row = first_step(setup, "softcap", "softcap_fused", eaft_fused=True)
    ref = references["softcap"]
    assert row["loss"] == pytest.approx(ref["eaft"], rel=1e-4)


# ---- the real `swift sft` (its own venv): dense and fused EAFT log the same step 1, router loss included

@pytest.mark.e2e
@pytest.mark.parametrize("kind, model_type, extra", [
    ("moe", "qwen3_moe", ("--router_aux_loss_coef", str(COEF))),
    ("softcap", "gemma2", ()),
])
def test_swift_fused_equals_dense(setup, kind, model_type, extra):
    """ms-swift adds its router loss after the loss function on the dense path; the fused path adds the same."""
    from test_swift_e2e import swift_sft, write_rows

    root, _, models = setup
    data = root / f"swift_{kind}.jsonl"
    write_rows(data, 8, seed=5)
    runs = {}
    for fused in ("false", "true"):
        _, rows = swift_sft(models[kind], data, root / f"swift_{kind}_{fused}", "--model_type", model_type,
                            "--loss_type", "eaft", "--eaft_fused", fused, *extra)
        assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
        runs[fused] = rows
    assert runs["true"][0]["loss"] == pytest.approx(runs["false"][0]["loss"], rel=1e-4)
    if kind == "moe":
        assert "aux_loss" in runs["true"][0] and runs["true"][0]["aux_loss"] > 0
