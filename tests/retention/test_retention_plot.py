"""`eaft-retention compare` and retention.png: the three log formats, the no-matplotlib note, paired differences
between runs with 95% intervals (checked by hand), seeds as a second source of noise, and the refusal of runs
measured on different probes."""

import json
import math
import statistics
import sys

import pytest

from eaft_plugins.retention.plot import compare_groups, main, plot_runs, read_run
from eaft_plugins.retention.readings import difference, t_quantile


def _row(step, kl):
    return {"retention/kl_base": kl, "retention/text_nll": 2.0 + kl, "retention/text_nll_delta": kl,
            "retention/mc_logp": -3.0 - kl, "retention/mc_logp_delta": -kl}


KINDS = ["prompt", "text", "mc", "mc", "prompt", "text", "mc", "mc"]
BASE = [[0, 5, 0, 0, 0], [20, 10, 0, 0, 0], [-1.0, 0.4, 1, 0.3, 0], [-0.5, 0.6, 1, 0.3, 0],
        [0, 4, 0, 0, 0], [30, 10, 0, 0, 0], [-2.0, 0.1, 0, 0.2, 0], [-1.5, 0.2, 0, 0.3, 1]]


def _run_dir(path, tables, fingerprint="abc", **identity):
    """A run folder as the monitor writes it: retention.jsonl, retention_items.jsonl, retention_probe.json."""
    path.mkdir(parents=True)
    ident = {"fingerprint": fingerprint, "probe": "builtin", "items": {"prompt": 2, "text": 2, "mc": 4},
             "kinds": KINDS, "base": BASE, "tokenizer": "smol", "template_sha1": "t1", **identity}
    (path / "retention_probe.json").write_text(json.dumps(ident))
    (path / "retention_items.jsonl").write_text("".join(json.dumps({"step": s, "table": t}) + "\n"
                                                        for s, t in tables.items()))
    (path / "retention.jsonl").write_text("".join(json.dumps({"step": s, **_row(s, 0.1 * s)}) + "\n" for s in tables))
    return str(path)


def _moved(kl, nll, prob):
    """BASE moved: KL sums, text NLL sums and right-choice probabilities changed by the given amounts per item."""
    t = [list(r) for r in BASE]
    for i, k in enumerate(KINDS):
        if k == "prompt":
            t[i][0] = kl[i // 4] * t[i][1]
        elif k == "text":
            t[i][0] += nll[i // 4]
        else:
            t[i][1] += prob[i % 2 + 2 * (i // 4)]
            t[i][0] = math.log(t[i][1])
    return t


@pytest.fixture
def runs(tmp_path):
    hf = tmp_path / "sft"  # transformers / TRL / LLaMA-Factory: trainer_state.json
    hf.mkdir()
    history = [{"step": 0, **_row(0, 0.0)}, {"step": 1, "loss": 1.0, **_row(1, 0.1)}, {"step": 1, "loss": 1.0},
               {"step": 2, "loss": 0.9, **_row(2, 0.3)}]
    (hf / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    swift = tmp_path / "eaft" / "v0-20260101-000000"  # ms-swift: logging.jsonl in a version folder
    swift.mkdir(parents=True)
    lines = [{"global_step/max_steps": f"{s}/2", **_row(s, kl)} for s, kl in ((0, 0.0), (1, 0.05), (2, 0.1))]
    (swift / "logging.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    own = tmp_path / "own"  # the monitor's own file wins
    own.mkdir()
    (own / "retention.jsonl").write_text(json.dumps({"step": 0, **_row(0, 0.0)}) + "\n")
    (own / "trainer_state.json").write_text(json.dumps({"log_history": []}))
    return tmp_path


def test_read_run_from_each_format(runs):
    assert [r["step"] for r in read_run(runs / "sft")] == [0, 1, 2]
    assert [r["step"] for r in read_run(runs / "eaft")] == [0, 1, 2]
    assert read_run(runs / "eaft")[2]["retention/kl_base"] == 0.1
    assert len(read_run(runs / "own")) == 1
    (runs / "empty").mkdir()
    with pytest.raises(ValueError, match="no retention/\\* values"):
        read_run(runs / "empty")


def test_without_matplotlib_a_note_not_a_crash(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot_runs({"x": read_run(runs / "sft")}, runs / "r.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (runs / "r.png").exists()


def test_t_quantiles():
    for df, t in ((2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (30, 2.042), (float("inf"), 1.960)):
        assert t_quantile(df) == pytest.approx(t, rel=0.01)


def test_paired_difference_by_hand(tmp_path):
    a = _run_dir(tmp_path / "a", {0: BASE, 10: _moved([0.2, 0.4], [1.0, 2.0], [0.1, 0.0, 0.1, 0.2])})
    b = _run_dir(tmp_path / "b", {0: BASE, 10: _moved([0.1, 0.1], [0.5, 2.5], [0.1, 0.1, 0.0, 0.2])})
    got = compare_groups({"A": [a], "B": [b]})["differences"]["B"]
    assert got["kl_base"]["paired"] and got["kl_base"]["items"] == 2
    # KL: per-item sums (0.1-0.2)*5 and (0.1-0.4)*4 over 9 tokens; its ratio error with 1 degree of freedom
    x, n = [-0.5, -1.2], [5, 4]
    d = sum(x) / sum(n)
    se = math.sqrt(2 * sum((xi - d * ni) ** 2 for xi, ni in zip(x, n))) / sum(n)
    assert got["kl_base"]["diff"] == pytest.approx(d) and got["kl_base"]["se"] == pytest.approx(se)
    assert got["kl_base"]["ci"] == pytest.approx([d - 12.706 * se, d + 12.706 * se], rel=1e-3)
    # p(right choice): per-item changes B - A
    deltas = [0.0, 0.1, -0.1, 0.0]
    assert got["mc_prob_delta"]["diff"] == pytest.approx(statistics.mean(deltas))
    assert got["mc_prob_delta"]["se"] == pytest.approx(statistics.stdev(deltas) / 2)
    assert got["mc_prob_delta"]["within_noise"]


def test_seeds_add_their_spread(tmp_path):
    a = [_run_dir(tmp_path / f"a{s}", {0: BASE, 5: _moved([0.2 + 0.05 * s, 0.4], [1, 2], [0.1, 0, 0.1, 0.2])})
         for s in range(3)]
    b = [_run_dir(tmp_path / f"b{s}", {0: BASE, 5: _moved([0.1, 0.1 + 0.02 * s], [1, 2], [0.1, 0, 0.1, 0.2])})
         for s in range(3)]
    got = compare_groups({"A": a, "B": b})["differences"]["B"]["kl_base"]
    assert got["runs"] == [3, 3] and got["se_seeds"] > 0
    assert got["se"] == pytest.approx(math.sqrt(got["se_items"] ** 2 + got["se_seeds"] ** 2))
    per_run_a = [(0.2 + 0.05 * s) * 5 / 9 + 0.4 * 4 / 9 for s in range(3)]
    per_run_b = [0.1 * 5 / 9 + (0.1 + 0.02 * s) * 4 / 9 for s in range(3)]
    want = statistics.variance(per_run_a) / 3 + statistics.variance(per_run_b) / 3
    assert got["se_seeds"] == pytest.approx(math.sqrt(want))
    assert got["diff"] == pytest.approx(statistics.mean(per_run_b) - statistics.mean(per_run_a))


def test_compare_cli_reports_intervals_and_draws(tmp_path, capsys):
    a = _run_dir(tmp_path / "a", {0: BASE, 4: _moved([0.2, 0.3], [1.0, 1.2], [0.0, 0.0, 0.0, 0.0])})
    b = _run_dir(tmp_path / "b", {0: BASE, 4: _moved([0.9, 1.0], [3.0, 3.1], [0.1, 0.0, 0.1, 0.2])})
    out = tmp_path / "cmp.png"
    assert main(["compare", a, b, "--labels", "SFT,EAFT", "--out", str(out), "--json", str(tmp_path / "d.json")]) == 0
    text = capsys.readouterr().out
    assert "SFT: 2 points, last step 4" in text and "differences at step 4 against SFT" in text
    assert "EAFT higher" in text  # text NLL change: +2 and +1.9 per text, tight
    assert "within noise (the interval holds 0)" in text
    assert json.loads((tmp_path / "d.json").read_text())["differences"]["EAFT"]["text_nll_delta"]["diff"] > 0
    try:
        import matplotlib  # noqa: F401  (absent in some venvs: then the note, tested above)
    except ImportError:
        return
    assert out.stat().st_size > 1000


def test_compare_refuses_different_probes_and_unknown_ones(tmp_path, capsys):
    a = _run_dir(tmp_path / "a", {0: BASE})
    b = _run_dir(tmp_path / "b", {0: BASE}, fingerprint="xyz", template_sha1="t2")
    assert main(["compare", a, b, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "were measured on different probes" in err and "template_sha1: 't1' vs 't2'" in err
    c = tmp_path / "c"  # a run without the monitor's identity file (trainer_state.json only)
    c.mkdir()
    (c / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 0, **_row(0, 0.0)}]}))
    assert main(["compare", a, str(c), "--out", str(tmp_path / "x.png")]) == 2
    assert "no retention_probe.json" in capsys.readouterr().err
    assert main(["compare", a, a, "--step", "7", "--out", str(tmp_path / "x.png")]) == 2
    assert "step 7 was not measured in every run" in capsys.readouterr().err


def test_unpaired_when_items_differ():
    same = difference([([1.0, 2.0], [1, 1])], [([2.0, 3.0], [1, 1])])
    assert same["paired"] and same["se"] == 0.0 and not same["within_noise"]
    other = difference([([1.0, 2.0], [2, 2])], [([2.0, 3.0], [3, 3])])  # other answer lengths: not paired
    assert not other["paired"] and other["se"] > 0
