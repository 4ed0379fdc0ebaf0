"""`eaft-retention compare` and retention.png from the three log formats, and the no-matplotlib note."""

import json
import sys

import pytest

from eaft_plugins.retention.plot import main, plot_runs, read_run


def _row(step, kl):
    return {"retention/kl_base": kl, "retention/text_nll": 2.0 + kl, "retention/text_nll_delta": kl,
            "retention/mc_logp": -3.0 - kl, "retention/mc_logp_delta": -kl}


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


def test_compare_cli_draws_one_figure(runs, capsys):
    out = runs / "cmp.png"
    assert main(["compare", str(runs / "sft"), str(runs / "eaft"), "--labels", "SFT,EAFT", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "SFT: 3 points, last step 2: kl_base=0.3000" in text and "EAFT: 3 points" in text
    assert out.stat().st_size > 1000
    assert main(["compare", str(runs / "sft"), str(runs / "nope")]) == 2


def test_without_matplotlib_a_note_not_a_crash(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot_runs({"x": read_run(runs / "sft")}, runs / "r.png") is None
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (runs / "r.png").exists()
