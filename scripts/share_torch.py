"""Give a new venv the torch build another venv already has, as hard links: one ~5.4 GB copy on disk
instead of one per venv (four CUDA-torch venvs filled CI's disk).

    python scripts/share_torch.py SRC_VENV DST_VENV

Shares torch and what only torch pulls in (triton, nvidia-*, cuda-*): every file its RECORD lists is
hard-linked into DST's site-packages with its .dist-info, so pip in DST sees the same release as
installed and leaves it; torch's small pure-Python requirements are installed by pip as usual. The
console scripts (torchrun, ...) are written for DST's python. Does nothing (exit 0, says why) when SRC
has no torch, when DST already has one, or when the two venvs are on different filesystems.
"""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

SHARED = re.compile(r"^(torch|triton|nvidia_[a-z0-9_]+|cuda_[a-z0-9_]+)-[^-]+\.dist-info$")


def site_packages(venv: Path) -> Path:
    out = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def main(src: str, dst: str) -> int:
    src_venv, dst_venv = Path(src).resolve(), Path(dst).resolve()
    if not (src_venv / "bin" / "python").exists():
        print(f"share_torch: no venv at {src_venv}; installing torch normally")
        return 0
    s, d = site_packages(src_venv), site_packages(dst_venv)
    dists = sorted(p for p in s.iterdir() if SHARED.match(p.name))
    if not any(p.name.startswith("torch-") for p in dists):
        print(f"share_torch: {src_venv} has no torch; installing torch normally")
        return 0
    if any(p.name.startswith("torch-") for p in d.iterdir()):
        print(f"share_torch: {dst_venv} already has torch; left as it is")
        return 0
    if os.stat(s).st_dev != os.stat(d).st_dev:
        print("share_torch: the venvs are on different filesystems; installing torch normally")
        return 0
    linked = 0
    for info in dists:
        for line in (info / "RECORD").read_text().splitlines():
            rel = line.rsplit(",", 2)[0]
            if not rel or rel.startswith(".."):  # scripts in bin/ are written below for DST's python
                continue
            target, source = d / rel, s / rel
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target)
                linked += 1
        scripts = configparser.ConfigParser(delimiters=("=",))
        scripts.optionxform = str
        if (info / "entry_points.txt").is_file():
            scripts.read(info / "entry_points.txt")
        for name, spec in (scripts["console_scripts"].items() if scripts.has_section("console_scripts") else []):
            module, _, attr = spec.strip().partition(":")
            path = dst_venv / "bin" / name
            path.write_text(f"#!{dst_venv / 'bin' / 'python'}\nimport sys\nfrom {module} import {attr.split('.')[0]}\n"
                            f"sys.exit({attr}())\n")
            path.chmod(0o755)
    print(f"share_torch: {len(dists)} distributions ({linked} files) hard-linked from {src_venv}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
