"""patches/: the LLaMA-Factory entry-point loader applies to the 0.9.5 source and activates the plugin."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCH = ROOT / "patches" / "llamafactory-0.9.5-plugin-entry-points.patch"
# Whether FinetuningArguments gained our keys (the plugin adds them in place).
CODE = ("import dataclasses, llamafactory.hparams.parser as p; "
        "print('eaft_topk' in {f.name for f in dataclasses.fields(p.FinetuningArguments)})")


@pytest.fixture
def patched_source(tmp_path):
    """The released 0.9.5 wheel's sources in the repository layout (src/llamafactory), patched."""
    import importlib.metadata

    if importlib.metadata.version("llamafactory") != "0.9.5":
        pytest.skip("SKIPPED: the patch targets llamafactory 0.9.5, which is not the installed release")
    import llamafactory

    shutil.copytree(Path(llamafactory.__file__).parent, tmp_path / "src" / "llamafactory",
                    ignore=shutil.ignore_patterns("__pycache__"))
    dry = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(PATCH)], cwd=tmp_path, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "FAILED" not in dry.stdout and "offset" not in dry.stdout and "fuzz" not in dry.stdout, dry.stdout
    subprocess.run(["patch", "-p1", "-i", str(PATCH)], cwd=tmp_path, check=True, capture_output=True)
    return tmp_path / "src"


def run(src, **env_extra):
    import os

    env = dict(os.environ, PYTHONPATH=str(src), EAFT_PLUGINS_DISABLE="1", **env_extra)
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


@pytest.mark.e2e
def test_patch_applies_cleanly_and_activates_without_the_pth(patched_source):
    # The .pth bootstrap is disabled: only the patched loader can activate the plugin.
    assert run(patched_source) == "True"


@pytest.mark.e2e
def test_patched_loader_can_be_disabled(patched_source):
    assert run(patched_source, LLAMAFACTORY_DISABLE_PLUGINS="1") == "False"
