"""eaft-repro: statistics helpers against plain references, and quick real runs on SmolLM2."""

import json
import random
import subprocess
import sys

import pytest

from eaft_plugins.tools import repro as repro_module
from frameworks import tiny_llama
from eaft_plugins.tools.evaluation import bootstrap_ci, paired_delta_ci


def test_bootstrap_ci_constructed():
    # 100 Bernoulli items, 50 ones: the normal-approximation 95% interval is 0.5 +- 1.96 * 0.05.
    vals = [1.0] * 50 + [0.0] * 50
    mean, lo, hi = bootstrap_ci(vals, n_boot=4000, seed=1)
    assert mean == 0.5
    assert lo == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02)
    assert hi == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)
    assert bootstrap_ci([3.0] * 7) == (3.0, 3.0, 3.0)
    # Independent percentile bootstrap written plainly, same resampling stream.
    r, n = random.Random(5), len(vals)
    means = sorted(sum(vals[r.randrange(n)] for _ in range(n)) / n for _ in range(1000))
    assert bootstrap_ci(vals, n_boot=1000, seed=5)[1:] == (means[25], means[974])


def test_paired_delta_ci():
    base = [random.Random(i).random() for i in range(40)]
    tuned = [b + 0.25 for b in base]
    d, lo, hi = paired_delta_ci(tuned, base)
    assert (d, lo, hi) == pytest.approx((0.25, 0.25, 0.25))
    with pytest.raises(ValueError):
        paired_delta_ci([1.0], [1.0, 2.0])


def test_summarize_metric_averages_seeds_per_item():
    per_seed = [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    base = [0.0, 0.0, 0.0, 1.0]
    m = repro_module.summarize_metric(per_seed, base)
    assert m["mean"] == pytest.approx(0.625)
    assert m["delta"] == pytest.approx(0.375)
    assert m["per_seed"] == [0.75, 0.5]
    assert m["ci"][0] <= m["mean"] <= m["ci"][1]


def test_mean_eaft_weight_is_token_weighted():
    hist = [{"loss": 1.0, "step": 1}, {"eaft/weight": 0.2, "eaft/tokens": 100.0, "step": 1},
            {"eaft/weight": 0.5, "eaft/tokens": 300.0, "step": 2}]
    assert repro_module.mean_eaft_weight(hist) == pytest.approx((0.2 * 100 + 0.5 * 300) / 400)
    with pytest.raises(RuntimeError, match="eaft_log_metrics"):
        repro_module.mean_eaft_weight([{"loss": 1.0}])


@pytest.fixture(scope="module")
def repro(smollm2_dir, tmp_path_factory):
    """One quick run of every control arm (sft, eaft, step-matched SFT, weight_norm=mean, shuffled gate) on a tiny
    random Llama: the tool's training, evaluation and statistics are the point here, not SmolLM2's weights."""
    root = tmp_path_factory.mktemp("repro")
    model = tiny_llama(smollm2_dir, root / "tiny", head_std=4.0)  # peaked: EAFT weights well below 1, as on SmolLM2
    out = root / "out"
    cmd = [sys.executable, "-m", "eaft_plugins.tools.repro", "--quick", "--controls", "--model", str(model),
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return json.loads((out / "results.json").read_text()), r.stdout, out


def _check_entry(e, n_items):
    for k in repro_module.METRICS:
        m = e[k]
        assert m["n_items"] == n_items[k]
        assert m["ci"][0] <= m["mean"] + 1e-12 and m["mean"] <= m["ci"][1] + 1e-12, k
        assert m["delta_ci"][0] <= m["delta"] + 1e-12 <= m["delta_ci"][1] + 2e-12, k
    assert 0 <= e["target_acc"]["mean"] <= 1 and 0 <= e["mc_acc"]["mean"] <= 1
    assert e["kl"]["mean"] > 0 and e["target_nll"]["mean"] > 0 and e["text_nll"]["mean"] > 0
    assert e["mc_logprob"]["mean"] < 0


@pytest.mark.e2e
def test_repro_quick(repro):
    res, stdout, out = repro
    assert set(res["arms"]) == {f"lr=0.0002 {a}" for a in repro_module.CONTROL_ARMS}
    n_items = {"target_acc": 4, "target_nll": 4, "mc_acc": 6, "mc_logprob": 6, "kl": 3, "text_nll": 3}
    assert res["base"]["kl"]["mean"] == 0.0
    for e in res["arms"].values():
        _check_entry(e, n_items)
    assert {r["lr_used"] for r in res["runs"].values() if r["arm"] in ("sft", "eaft")} == {2e-4}
    assert all(len(r["train_loss"]) == 2 for r in res["runs"].values())
    # Training really happened: the runs moved the model away from the base.
    assert res["arms"]["lr=0.0002 sft"]["text_nll"]["delta"] != 0.0
    for f in ("results.json", "table.md", "repro_bars.png", "repro_weight.png"):
        assert (out / f).stat().st_size > 0
    assert "base" in stdout and "eaft" in stdout


@pytest.mark.e2e
def test_repro_controls(repro):
    res, _, out = repro
    w = res["arms"]["lr=0.0002 eaft"]["mean_eaft_weight"]
    assert 0 < w < 1
    assert res["arms"]["lr=0.0002 sft_stepmatched"]["lr_used"] == [pytest.approx(2e-4 * w)]
    # weight_norm=mean divides by the previous step's global mean weight (the first step: its own),
    # so the first step's logged mean weight is exactly 1 and later ones stay near 1, far above EAFT's.
    hist = json.loads((out / "runs" / "lr0.0002_s0_eaft_meannorm" / "eval.json").read_text())["result"]["_history"]
    logged = [h["eaft/weight"] for h in hist if "eaft/weight" in h]
    assert logged[0] == pytest.approx(1.0, abs=1e-5)
    assert all(0.5 < x < 2.0 for x in logged)
    assert res["arms"]["lr=0.0002 eaft_meannorm"]["mean_eaft_weight"] > 2 * w
    # the shuffled gate keeps the weight distribution: its mean is still below 1
    assert 0 < res["arms"]["lr=0.0002 eaft_shuffle"]["mean_eaft_weight"] < 1


def test_choice_logprobs_match_plain_scoring(smollm2_dir):
    """The shared-prompt KV-cache path equals scoring each prompt + choice sequence on its own."""
    from eaft_plugins.tools.evaluation import (choice_logprobs, encode_pair, end_token, load_model, render_prompt,
                                         sequence_logprobs)

    model, tok = load_model(smollm2_dir, "cpu")
    q, choices = "Which planet is closest to the Sun?", ["Mercury", "The planet Venus", "Mars"]
    got = choice_logprobs(model, tok, q, choices)
    seqs = [encode_pair(tok, render_prompt(tok, q), c + end_token(tok), 512) for c in choices]
    want = [lp for lp, _ in sequence_logprobs(model, tok, seqs, batch_size=1)]
    assert got == pytest.approx(want, abs=2e-3)
