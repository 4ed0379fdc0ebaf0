"""The fast lane's guard refuses, in an unmarked test, what only e2e / dist tests may start."""

import subprocess
import sys

import pytest

from lanes import UnmarkedHeavyTest, guard, heavy_command


@pytest.mark.parametrize("argv, what", [
    (["/venv/bin/llamafactory-cli", "train", "x.yaml"], "the `llamafactory-cli` CLI"),
    (["swift", "sft", "--model", "m"], "the `swift` CLI"),
    ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "x.py"], "`python -m torch.distributed.run`"),
    ([sys.executable, "-c", "from trl import SFTTrainer\nt = SFTTrainer(model=m)"], "Python code calling `SFTTrainer(`"),
    ([sys.executable, "-c", "import torch.distributed as d; d.init_process_group('gloo')"], "`init_process_group(`"),
])
def test_heavy_commands_are_recognised(argv, what):
    assert what in heavy_command(argv)


@pytest.mark.parametrize("argv", [
    [sys.executable, "-c", "print('started')"], [sys.executable, "-m", "eaft_plugins", "doctor"], ["bash", "-n", "x.sh"],
    "ls",
])
def test_light_commands_pass(argv):
    assert heavy_command(argv) == ""


def test_a_script_is_read_for_what_it_starts(tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text("def run(t):\n    trainer.train()\n")
    assert "trainer.train(" in heavy_command([sys.executable, str(script), "scenarios"])


def test_the_guard_refuses_and_restores():
    import torch.distributed as dist
    from transformers import Trainer

    real = dist.init_process_group
    with guard("tests/x.py::t"):
        with pytest.raises(UnmarkedHeavyTest, match=r"tests/x.py::t starts a process group .* no @pytest.mark.e2e"):
            dist.init_process_group("gloo")
        with pytest.raises(UnmarkedHeavyTest, match="a transformers Trainer"):
            Trainer(model=None)
        with pytest.raises(UnmarkedHeavyTest, match="the `torchrun` CLI"):
            subprocess.run(["torchrun", "x.py"])
        assert subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, text=True).stdout == "1\n"
    assert dist.init_process_group is real
