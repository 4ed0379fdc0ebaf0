"""The fast lane's guard: a test without the `e2e` or `dist` mark may not start a framework CLI, a trainer or a
process group (`scripts/test.sh --fast` runs only unmarked tests, so such a test would make it slow, or skip a
scenario CI must run). conftest.py installs `guard(nodeid)` around every unmarked test.

What counts, in this process: building a transformers Trainer (LLaMA-Factory's, ms-swift's and TRL's trainers are
Trainers), `torch.distributed.init_process_group`, `torch.multiprocessing.spawn` / `start_processes`. In a
subprocess: a framework CLI or launcher, or Python code (`-c` or a script) that builds a trainer, trains, or starts
a process group.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path

CLIS = {"llamafactory-cli", "swift", "megatron", "trl", "torchrun", "accelerate", "deepspeed", "eaft-repro"}
MODULES = {"llamafactory.cli", "trl.scripts.sft", "torch.distributed.run", "torch.distributed.launch",
           "eaft_plugins.tools.repro", "eaft_plugins.tools.demo"}
# Python source that builds a trainer, trains, or starts a process group.
HEAVY = re.compile(r"\b(?:\w*Trainer\(|trainer\.train\(|init_process_group\(|deepspeed\.initialize\(|mp\.spawn\(|"
                   r"torch\.multiprocessing\.spawn\(|run_exp\()")


class UnmarkedHeavyTest(RuntimeError):
    pass


def _python_source(argv) -> str:
    """The code a Python command line runs (`-c CODE`, or a script file), '' when there is none."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-c" and i + 1 < len(argv):
            return argv[i + 1]
        if arg == "-m":
            return ""
        if not arg.startswith("-"):
            path = Path(arg)
            return path.read_text(errors="replace") if path.suffix == ".py" and path.is_file() else ""
    return ""


def heavy_command(argv) -> str:
    """What a subprocess command line starts that needs a mark ('' when nothing)."""
    argv = [str(a) for a in ([argv] if isinstance(argv, (str, os.PathLike)) else argv)]
    if not argv:
        return ""
    name = Path(argv[0]).name
    if name in CLIS:
        return f"the `{name}` CLI"
    if not name.startswith("python"):
        return ""
    if "-m" in argv[:-1] and argv[argv.index("-m") + 1] in MODULES:
        return f"`python -m {argv[argv.index('-m') + 1]}`"
    match = HEAVY.search(_python_source(argv))
    return f"Python code calling `{match.group(0)}`" if match else ""


@contextlib.contextmanager
def guard(nodeid: str):
    """Within the block, starting anything heavy raises UnmarkedHeavyTest naming the test and what it started."""

    def refuse(what):
        raise UnmarkedHeavyTest(f"{nodeid} starts {what} but has no @pytest.mark.e2e (framework CLI, trainer) or "
                                "@pytest.mark.dist (process group) mark: mark it, so `scripts/test.sh --fast` stays "
                                "fast and CI's e2e lane runs it")

    def popen_init(self, args, *a, **kw):
        what = heavy_command(args)
        if what:
            refuse(what)
        return real_popen_init(self, args, *a, **kw)

    patches = [(subprocess.Popen, "__init__", popen_init)]
    real_popen_init = subprocess.Popen.__init__
    import torch.distributed as dist
    import torch.multiprocessing as mp

    for owner, name, what in ((dist, "init_process_group", "a process group (init_process_group)"),
                              (mp, "spawn", "processes (torch.multiprocessing.spawn)"),
                              (mp, "start_processes", "processes (torch.multiprocessing.start_processes)")):
        patches.append((owner, name, lambda *a, _what=what, **kw: refuse(_what)))
    trainer = _trainer_class()
    if trainer is not None:
        patches.append((trainer, "__init__", lambda *a, **kw: refuse("a transformers Trainer")))
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


def _trainer_class():
    try:
        from transformers.trainer import Trainer
    except Exception:  # transformers absent or broken: nothing to guard there
        return None
    return Trainer
