"""`--help` of every command this package touches or provides exits 0, in each venv (issue #21).

A help text argparse cannot format (the bare `3% of` in the retention_steps help) crashed `llamafactory-cli train
--help` and `trl sft --help` as soon as eaft-plugins was installed. Two guards:

* fast lane: every setting's help, as the frameworks get it (adapter.setting_fields), formats in an argparse parser;
* e2e: each framework command's --help, each of our tools' --help and `python -m eaft_plugins doctor`, in every venv
  where it is installed, two at a time: exit 0 (doctor: 0 or 1, a report) and no traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- fast lane: the help texts themselves


def format_fields(fields: dict) -> str:
    """--help of a parser with one option per field {key: (type, help, default)}, as HfArgumentParser builds it
    (argparse %-formats every help text, and the defaults formatter appends ' (default: %(default)s)')."""
    parser = argparse.ArgumentParser(prog="x", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for key, (_, help_text, default) in fields.items():
        parser.add_argument(f"--{key}", default=default, help=help_text)
    return parser.format_help()


def spellings() -> dict:
    from eaft_plugins.integrations.hf_trainer import SPELLING as HF
    from eaft_plugins.integrations.llamafactory import SPELLING as LF
    from eaft_plugins.integrations.swift.args import SPELLING as SWIFT
    from eaft_plugins.integrations.trl import SPELLING as TRL

    return {"llamafactory": LF, "swift": SWIFT, "trl": TRL, "with_eaft": HF}


@pytest.mark.parametrize("framework", ["llamafactory", "swift", "trl", "with_eaft"])
def test_every_setting_help_formats(framework):
    from eaft_plugins.integrations import adapter
    from eaft_plugins.options import USER_SETTINGS

    text = "".join(format_fields(adapter.setting_fields(spellings()[framework])).split())
    for s in USER_SETTINGS:
        assert f"--{s.key}" in text
        assert "".join(s.help.split()) in text, f"{s.key}: the help does not print as written"


# The retention_steps help before commit 4b0bb84 (eaft_plugins/retention/keys.py), with its bare "3% of".
OLD_STEPS_HELP = ("optimizer steps between two retention probes (default: the logging interval, else the eval "
                  "interval, else once per epoch, lengthened to a multiple of it if a probe would take more than 3% of "
                  "the training time; printed at the first interval); needs retention_probe")


def test_the_check_catches_the_old_help_text():
    """What `llamafactory-cli train --help` hit: TypeError: %o format: an integer is required, not dict."""
    with pytest.raises(TypeError, match="%o format"):
        format_fields({"retention_steps": (int, OLD_STEPS_HELP, None)})


# ---------------------------------------------------------------- e2e: the commands, in each venv

WORKERS = 2  # the CI machine has 2 cores
VENVS = {".venv": "scripts/setup.sh", ".venv-swift": "scripts/setup.sh swift", ".venv-trl": "scripts/setup.sh trl",
         ".venv-lf094": "scripts/setup.sh lf094"}
# `swift sft --help` prints only ms-swift's unsloth pre-parser; this is the parser `swift sft` then runs (our flags).
SWIFT_PARSER = "from swift.pipelines import sft_main; sft_main(['--help'])"
SUBCOMMANDS = {("eaft-retention", "--help"): {"compare"}, ("python", "-m", "eaft_plugins", "--help"): {"doctor"}}


@dataclass(frozen=True)
class Command:
    venv: str
    argv: tuple  # argv[0]: a program in the venv's bin/
    codes: tuple = (0,)
    host: bool = False  # a framework command skipped (loudly) when it cannot start without eaft-plugins either

    def __str__(self) -> str:
        return f"{self.venv}: {' '.join(self.argv if self.argv[1] != '-c' else self.argv[:2] + ('...',))}"


TOOLS = [("eaft-analyze", "--help"), ("eaft-retention", "--help"), ("eaft-retention", "compare", "--help"),
         ("eaft-repro", "--help"), ("python", "-m", "eaft_plugins", "--help"),
         ("python", "-m", "eaft_plugins", "doctor", "--help")]
# Slowest first, so two workers finish together.
COMMANDS = (
    [Command(v, ("python", "-m", "eaft_plugins", "doctor"), codes=(0, 1)) for v in VENVS]  # 0 or 1: a report
    + [Command(".venv-swift", ("python", "-c", SWIFT_PARSER)),
       Command(".venv-lf094", ("llamafactory-cli", "train", "--help")),
       Command(".venv-swift", ("megatron", "sft", "--help"), host=True),
       Command(".venv", ("llamafactory-cli", "train", "--help")),
       # TRL 0.24's `trl` command imports every trainer (mergekit needed): its sft script is the same parser.
       Command(".venv", ("python", "-m", "trl.scripts.sft", "--help")),
       Command(".venv-trl", ("trl", "sft", "--help")),
       Command(".venv-swift", ("swift", "sft", "--help"))]
    + [Command(v, argv) for v in VENVS for argv in TOOLS])


@dataclass(frozen=True)
class Result:
    rc: int
    output: str
    seconds: float


def run(command: Command, disable: bool = False):
    """The command's Result, or the reason it is skipped (a string)."""
    venv = ROOT / command.venv
    if not venv.is_dir():
        return f"SKIPPED: {command.venv} is not built (bash {VENVS[command.venv]})"
    program = venv / "bin" / command.argv[0]
    if not program.exists():
        return f"SKIPPED: {command.argv[0]} is not installed in {command.venv}"
    env = {k: v for k, v in os.environ.items() if k != "EAFT_PLUGINS_DISABLE"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if disable:
        env["EAFT_PLUGINS_DISABLE"] = "1"
    start = time.monotonic()
    proc = subprocess.run([str(program), *command.argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    return Result(proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start)


def run_checked(command: Command):
    """`run`; a host command first runs without eaft-plugins: when that fails too, it is skipped with the reason."""
    if command.host:
        bare = run(command, disable=True)
        if isinstance(bare, Result) and bare.rc != 0:
            last = bare.output.strip().splitlines()[-1] if bare.output.strip() else f"exit {bare.rc}"
            return (f"SKIPPED: `{' '.join(command.argv)}` cannot start in {command.venv} even with "
                    f"EAFT_PLUGINS_DISABLE=1 (not ours to fix): {last}")
        if not isinstance(bare, Result):
            return bare
    return run(command)


@pytest.fixture(scope="module")
def help_runs(request):
    """Every selected command, WORKERS at a time; prints the total wall time."""
    chosen = [item.callspec.params["command"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_help_exits_0"]
    start = time.monotonic()
    with ThreadPoolExecutor(WORKERS) as pool:
        results = dict(zip(chosen, pool.map(run_checked, chosen)))
    times = sorted(((r.seconds, str(c)) for c, r in results.items() if isinstance(r, Result)), reverse=True)
    print(f"\n{len(chosen)} --help runs in {time.monotonic() - start:.0f} s, {WORKERS} at a time "
          f"({sum(t for t, _ in times):.0f} s one after another); slowest: "
          + ", ".join(f"{name} {seconds:.0f} s" for seconds, name in times[:5]))
    return results


def failure(command: Command, result: Result) -> str:
    return (f"{command} exited {result.rc} after {result.seconds:.0f} s (allowed: {list(command.codes)}, no "
            f"traceback); output tail:\n{result.output[-4000:]}")


@pytest.mark.e2e
@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_help_exits_0(command, help_runs):
    result = help_runs[command]
    if isinstance(result, str):
        pytest.skip(result)
    if result.rc not in command.codes or "Traceback" in result.output:
        pytest.fail(failure(command, result), pytrace=False)
    want = SUBCOMMANDS.get(command.argv)
    if want is not None:  # a new subcommand needs its own --help run above
        usage = re.search(r"\{([\w,-]+)\}", result.output)
        if not usage or set(usage.group(1).split(",")) != want:
            pytest.fail(f"subcommands other than {sorted(want)}: " + failure(command, result), pytrace=False)
