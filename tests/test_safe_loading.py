"""Files the package reads back are loaded safely (issue #21): nothing in eaft_plugins/ unpickles.

A checkpoint's retention reference, a probe file, an analysis input, a run's logs: a damaged or foreign file must
not run code when read. `torch.load` only with `weights_only=True`; no pickle, dill, joblib, marshal or shelve;
YAML only with a safe loader; numpy without `allow_pickle`. Read from the source (ast), so a new loader anywhere in
the package is caught here, not by a user.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "eaft_plugins"
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "marshal", "shelve"}
UNSAFE_YAML = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str) -> list:
    """'line N: what' for every unsafe load in a module's source."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            problems += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] in UNPICKLERS]
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner, name = ast.unparse(node.func.value), node.func.attr
        keywords = {k.arg: k.value for k in node.keywords}
        if owner == "torch" and name == "load" and not _true(keywords.get("weights_only")):
            problems.append(f"line {node.lineno}: torch.load without weights_only=True")
        if owner == "yaml" and (name in UNSAFE_YAML or name in ("load", "load_all")
                                and "SafeLoader" not in ast.unparse(keywords.get("Loader", ast.Constant(None)))):
            problems.append(f"line {node.lineno}: yaml.{name} (use yaml.safe_load)")
        if owner in ("np", "numpy") and name == "load" and _true(keywords.get("allow_pickle")):
            problems.append(f"line {node.lineno}: numpy.load with allow_pickle=True")
        if name == "read_pickle":
            problems.append(f"line {node.lineno}: {owner}.read_pickle")
    return problems


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_package_never_unpickles(path):
    assert unsafe_loads(path.read_text(encoding="utf-8")) == [], path


@pytest.mark.parametrize("source, found", [
    ("import torch\ntorch.load(p)", "torch.load without weights_only=True"),
    ("import torch\ntorch.load(p, weights_only=False)", "torch.load without weights_only=True"),
    ("import pickle", "imports pickle"),
    ("from joblib import load", "imports joblib"),
    ("import yaml\nyaml.load(text, Loader=yaml.Loader)", "yaml.load"),
    ("import numpy as np\nnp.load(p, allow_pickle=True)", "numpy.load with allow_pickle=True"),
    ("import pandas as pd\npd.read_pickle(p)", "pd.read_pickle"),
])
def test_the_check_finds_each_unsafe_load(source, found):
    assert [p for p in unsafe_loads(source) if found in p], unsafe_loads(source)


def test_the_check_passes_safe_loads():
    assert unsafe_loads("torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(t)\n"
                        "yaml.load(t, Loader=yaml.SafeLoader)\nnp.load(p)\njson.loads(t)") == []
