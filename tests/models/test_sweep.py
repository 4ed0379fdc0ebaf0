"""The family sweep (eaft_plugins/models/families.py) under the transformers of every test venv: each causal LM
class is refused when patching, or fuses with the dense loss and gradients on a tiny model, or is listed as not
exercised with the reason; never an error inside the fused forward. The stored sweep that the docs table of
docs/performance.md is built from must be what the sweep finds now.

`.venv` (the one running pytest) is swept in-process; `.venv-swift` and `.venv-trl` as a subprocess with their
own python (about 30 s each on a 2-core machine).
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from eaft_plugins.models import families

ROOT = Path(__file__).resolve().parents[2]
# The other venvs, as scripts/setup.sh names them.
OTHER_VENVS = {"swift": os.environ.get("EAFT_SWIFT_VENV", ".venv-swift"),
               "trl": os.environ.get("EAFT_TRL_VENV", ".venv-trl")}


def check(record: dict) -> None:
    results = record["families"]
    failed = {name: r["reason"] for name, r in results.items() if r["status"] == families.FAILED}
    assert not failed, f"transformers {record['transformers']}: fused EAFT fails on {failed}"
    assert families.counts(results)[families.VERIFIED] > 50, "the sweep verified almost nothing"
    path = families.record_path(record["transformers"])
    regenerate = (f"run `python -m eaft_plugins.models.families --write` with that venv's python, then "
                  "`python -m eaft_plugins.tools.doc_tables`")
    assert path.is_file(), f"no stored sweep for transformers {record['transformers']}: {regenerate}"
    stored = json.loads(path.read_text())["families"]
    changed = {name: (stored.get(name, {}).get("status"), results.get(name, {}).get("status"))
               for name in sorted(set(stored) | set(results)) if stored.get(name) != results.get(name)}
    assert not changed, f"the stored sweep of transformers {record['transformers']} is stale " \
                        f"(stored, found: {changed}); {regenerate}"


def test_the_sweep_in_this_venv():
    import transformers

    check({"transformers": transformers.__version__, "families": families.sweep()})


@pytest.mark.e2e
@pytest.mark.parametrize("setup_name", sorted(OTHER_VENVS))
def test_the_sweep_in_the_other_venvs(setup_name):
    python = ROOT / OTHER_VENVS[setup_name] / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"SKIPPED: {OTHER_VENVS[setup_name]} is absent, so its transformers is not swept "
                    f"(`bash scripts/setup.sh {setup_name}` builds it)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([str(python), "-m", "eaft_plugins.models.families", "--json", "-"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.stdout, f"the sweep did not finish (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    record = json.loads(proc.stdout)
    assert record["venv"] == Path(OTHER_VENVS[setup_name]).name  # its sys.prefix: it ran in that venv
    check(record)
