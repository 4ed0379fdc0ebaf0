"""`swift sft --retention_probe` (the real ms-swift 4.6 CLI, .venv-swift), and `megatron sft` refusing it."""

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SWIFT = os.environ.get("EAFT_SWIFT_BIN") or (
    str(ROOT / ".venv-swift" / "bin" / "swift") if (ROOT / ".venv-swift" / "bin" / "swift").exists()
    else shutil.which("swift", path=str(Path(sys.executable).parent)))


def test_megatron_and_rlhf_refuse_the_probe():
    from eaft_plugins.integrations.swift.args import check_retention

    MegatronSftArguments = type("MegatronSftArguments", (types.SimpleNamespace,), {})
    with pytest.raises(ValueError, match=r"--retention_probe is not supported by `megatron sft`"):
        check_retention(MegatronSftArguments(retention_probe="builtin", retention_steps=None))
    with pytest.raises(ValueError, match=r"not rlhf \(--rlhf_type dpo\)"):
        check_retention(types.SimpleNamespace(retention_probe="builtin", retention_steps=None, rlhf_type="dpo"))
    with pytest.raises(ValueError, match=r"--retention_steps is set but --retention_probe is not"):
        check_retention(types.SimpleNamespace(retention_probe=None, retention_steps=3))
    assert not check_retention(types.SimpleNamespace(retention_probe=None, retention_steps=None))


@pytest.mark.e2e
def test_swift_sft_logs_retention_without_eaft(smollm2_dir, tmp_path):
    if SWIFT is None:
        pytest.skip("SKIPPED: no `swift` CLI: run scripts/setup.sh swift (builds .venv-swift) or set EAFT_SWIFT_BIN")
    from eaft_plugins.tools import mathgen

    data = tmp_path / "train.jsonl"
    mathgen.write_messages(mathgen.generate(8, seed=4), data)
    probe = tmp_path / "probe.jsonl"
    probe.write_text('{"prompt": "Name a colour."}\n{"text": "Bees make honey from the nectar of flowers."}\n'
                     '{"question": "2 + 2 = ?", "choices": ["3", "4"], "answer": 1}\n')
    out = tmp_path / "out"
    cmd = [SWIFT, "sft", "--model", str(smollm2_dir), "--model_type", "llama", "--template", "chatml",
           "--tuner_type", "full", "--dataset", str(data), "--max_length", "128", "--per_device_train_batch_size", "2",
           "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--output_dir", str(out),
           "--add_version", "false", "--torch_dtype", "float32", "--fp16", "false", "--bf16", "false",
           "--report_to", "none", "--dataloader_num_workers", "0", "--check_model", "false", "--dataset_num_proc", "1",
           "--learning_rate", "1e-4", "--retention_probe", str(probe)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="2")
    env.pop("NPROC_PER_NODE", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=2400, check=False)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    rows = [json.loads(x) for x in (out / "logging.jsonl").read_text().splitlines()]
    ret = [r for r in rows if "retention/kl_base" in r]
    # The default interval: logging_steps 1, or the multiple of it the monitor printed (a probe over 3% of a step)
    line = next(x for x in (proc.stdout + proc.stderr).splitlines() if "measuring every" in x)
    n = int(line.split("measuring every ")[1].split()[0])
    steps = [0] + [s for s in (1, 2) if s % n == 0 or s == 2]
    assert len(ret) == len(steps) and "--retention_steps not set" in line
    assert ret[0]["retention/kl_base"] == 0.0 and ret[-1]["retention/kl_base"] > 0
    assert all("loss" in r for r in ret[1:]) and "retention/mc_logp_delta" in ret[-1]
    assert (out / "retention.png").exists()
    from eaft_plugins.retention.plot import read_run

    assert [r["step"] for r in read_run(out)] == steps
