"""Real runs more than one test file checks: one 2-process DDP `llamafactory-cli train` run serves the DDP tests of
test_llamafactory.py (metrics reduced over ranks, the weight_norm divisor reduced over ranks) and the baseline that
test_zero3.py compares ZeRO-3 with (and the retention monitor under both)."""

import pytest

from eaft_plugins.tools.demo import write_dataset
from frameworks import DDP_PROBE, ddp_config, lf_train, torchrun_env


@pytest.fixture(scope="session")
def ddp_setup(smollm2_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    probe = base / "retention.jsonl"
    probe.write_text(DDP_PROBE)
    return {"base": base, "data": write_dataset(base / "data", 8, seed=1), "probe": probe, "model": smollm2_dir}


@pytest.fixture(scope="session")
def ddp_run(ddp_setup):
    s = ddp_setup
    return lf_train(ddp_config(s["model"], s["data"], s["base"] / "ddp", retention_probe=str(s["probe"]), retention_steps=1),
                    env=torchrun_env())
