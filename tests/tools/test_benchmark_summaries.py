"""The method comparison in docs/reproduction.md is derived from the stored runs, not typed in: the summary is
recomputed from benchmarks/results/methods_seeds (the runs' monitor files and target readings, no training) and
must equal the stored one, and the docs' numbers must be its numbers."""

import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "benchmarks" / "results" / "methods_seeds"
ARMS = "sft,sft_kl,flow,dft,talr,eaft"


def _close(a, b, path="") -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_the_method_comparison_is_rederived_from_the_stored_runs(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import retention_seeds

    out = tmp_path / "summary.json"
    assert retention_seeds.main(["--out", str(RUNS), "--arms", ARMS, "--seeds", "0,1", "--summary-only",
                                 "--json", str(out)]) == 0
    new = json.loads(out.read_text())
    stored = json.loads((RUNS.parent / "methods_seeds.json").read_text())
    for key in ("target", "compare_builtin", "compare_builtin-large", "from_base_builtin-large"):
        _close(new[key], stored[key], key)
    docs = (ROOT / "docs" / "reproduction.md").read_text()
    large = new["from_base_builtin-large"]
    for arm, d in new["target"]["from_base"].items():
        row = f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]"
        kl = large[arm]["kl_base"]
        assert row in docs and f"{kl['diff']:+.3f} [{kl['ci'][0]:+.3f}" in docs, (arm, row)
    for arm, d in new["target"]["vs_sft"].items():
        text = new["compare_builtin-large"]["differences"][arm]["text_nll_delta"]
        assert f"{d['diff']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" in docs, arm
        assert f"{text['diff']:+.3f} [{text['ci'][0]:+.3f}, {text['ci'][1]:+.3f}]" in docs, arm


def test_arms_must_start_with_the_sft_baseline(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import retention_seeds

    assert retention_seeds.main(["--out", "/nonexistent", "--arms", "eaft,sft", "--summary-only"]) == 2
    assert "sft first" in capsys.readouterr().err
