"""Activation without a fork: the installed .pth bootstrap, EAFT_PLUGINS_DISABLE, install(), the
version guard and `python -m eaft_plugins doctor`, each in a fresh interpreter of this venv."""

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Whether LLaMA-Factory's FinetuningArguments gained our keys (in place) in that interpreter.
PARSER_MODULE = ("import dataclasses, llamafactory.hparams.parser as p; "
                 "print('eaft_topk' in {f.name for f in dataclasses.fields(p.FinetuningArguments)})")
PATCHED = "True"
UPSTREAM = "False"


def python(code, *, pythonpath=None, args=(), **env_extra):
    env = {k: v for k, v in os.environ.items() if k != "EAFT_PLUGINS_DISABLE"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **env_extra)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, *(["-c", code] if code else []), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def needs_llamafactory():
    pytest.importorskip("llamafactory", reason="SKIPPED: llamafactory is not installed in this environment")


def test_pth_is_installed_next_to_the_packages():
    found = [Path(d) / "eaft_plugins.pth" for d in site.getsitepackages() if (Path(d) / "eaft_plugins.pth").exists()]
    assert found, f"eaft_plugins.pth missing from {site.getsitepackages()}: reinstall eaft-plugins"
    assert found[0].read_text() == (ROOT / "eaft_plugins.pth").read_text()


def test_interpreter_start_arms_the_hook_without_importing_torch_or_frameworks():
    code = "import sys; print(sorted(m for m in ('eaft_plugins._bootstrap', 'torch', 'llamafactory', 'swift') if m in sys.modules))"
    assert python(code).stdout.strip() == "['eaft_plugins._bootstrap']"
    assert python(code, EAFT_PLUGINS_DISABLE="1").stdout.strip() == "[]"
    for word in ("true", "YES"):
        assert python(code, EAFT_PLUGINS_DISABLE=word).stdout.strip() == "[]"
    for word in ("off", "0", "false", "disable"):  # only 1 / true / yes disable: a typo never turns EAFT off
        assert python(code, EAFT_PLUGINS_DISABLE=word).stdout.strip() == "['eaft_plugins._bootstrap']", word


def test_a_broken_eaft_plugins_never_breaks_interpreter_start(tmp_path):
    broken = tmp_path / "eaft_plugins"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('broken install')\n")
    out = python("print('started')", pythonpath=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "started", out.stderr


def test_when_imported_runs_after_the_submodule_loads_and_at_once_if_loaded(tmp_path):
    pkg = tmp_path / "eaftdemo_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sub.py").write_text("VALUE = 1\n")
    code = textwrap.dedent("""
        import sys
        from eaft_plugins import hooks
        seen = []
        hooks.when_imported("eaftdemo_pkg.sub", lambda m: seen.append(("late", m.VALUE)))
        assert seen == []
        import eaftdemo_pkg.sub
        hooks.when_imported("eaftdemo_pkg.sub", lambda m: seen.append(("now", m.VALUE)))
        print(seen, type(eaftdemo_pkg.sub.__loader__).__name__)
    """)
    out = python(code, pythonpath=tmp_path)
    assert out.stdout.strip() == "[('late', 1), ('now', 1)] SourceFileLoader", out.stderr


@pytest.mark.e2e
def test_importing_llamafactory_patches_it_and_disable_turns_that_off():
    needs_llamafactory()
    assert python(PARSER_MODULE).stdout.strip() == PATCHED
    assert python(PARSER_MODULE, EAFT_PLUGINS_DISABLE="1").stdout.strip() == UPSTREAM


@pytest.mark.e2e
def test_install_activates_explicitly_when_the_bootstrap_is_off():
    needs_llamafactory()
    code = "import eaft_plugins; eaft_plugins.install(['llamafactory']); " + PARSER_MODULE
    out = python(code, EAFT_PLUGINS_DISABLE="1")
    assert out.stdout.strip() == PATCHED, out.stderr[-2000:]


@pytest.mark.e2e
def test_doctor_when_disabled_says_so_and_patches_nothing():
    needs_llamafactory()
    out = python(None, args=["-m", "eaft_plugins", "doctor"], EAFT_PLUGINS_DISABLE="1")
    assert "EAFT_PLUGINS_DISABLE is set" in out.stdout
    assert "patched:" not in out.stdout


@pytest.fixture
def fake_release(tmp_path):
    """Metadata claiming llamafactory 0.9.3, found before the real 0.9.5 on sys.path."""
    info = tmp_path / "llamafactory-0.9.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: llamafactory\nVersion: 0.9.3\n")
    return tmp_path


@pytest.mark.e2e
def test_unsupported_release_is_named_by_doctor_and_refused_when_eaft_is_requested(fake_release, smollm2_dir):
    needs_llamafactory()
    doctor = python(None, args=["-m", "eaft_plugins", "doctor"], pythonpath=fake_release)
    assert "llamafactory 0.9.3 installed" in doctor.stdout
    assert "NOT patched: eaft-plugins supports llamafactory 0.9.4, 0.9.5; found 0.9.3" in doctor.stdout
    assert doctor.returncode == 1

    code = textwrap.dedent(f"""
        from llamafactory.hparams import get_train_args
        cfg = dict(model_name_or_path={str(smollm2_dir)!r}, stage="sft", do_train=True, finetuning_type="lora",
                   dataset="x", template="chatml", output_dir="unused", use_cpu=True, report_to="none")
        try:
            get_train_args(dict(cfg, use_eaft_loss=True))
        except ValueError as exc:
            print("REFUSED:", exc)
    """)
    out = python(code, pythonpath=fake_release)
    assert "REFUSED: eaft-plugins supports llamafactory 0.9.4, 0.9.5; found 0.9.3. Install one of those" in out.stdout, (
        out.stdout + out.stderr[-3000:]
    )
