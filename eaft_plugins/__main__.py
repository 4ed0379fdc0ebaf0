"""`python -m eaft_plugins doctor`: what was found, what was patched, and why anything was not."""

from __future__ import annotations

import argparse
import importlib
import os
import site
import sys
from pathlib import Path

from . import __version__
from .activation import ENTRY_POINT_GROUP, distribution_version, entry_points, status

PTH_NAME = "eaft_plugins.pth"
# entry-point name -> distribution name on PyPI
DISTRIBUTIONS = {"llamafactory": "llamafactory", "swift": "ms-swift", "trl": "trl"}


def _pth_files():
    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    return [p for d in dirs if (p := Path(d) / PTH_NAME).exists()]


def doctor() -> int:
    from . import _bootstrap

    print(f"eaft-plugins {__version__}  (python {sys.version.split()[0]}, {sys.executable})")
    print(f"torch: {distribution_version('torch') or 'not installed'}")
    pth = _pth_files()
    print(f".pth bootstrap: {', '.join(map(str, pth)) if pth else 'NOT FOUND (use eaft_plugins.install())'}")
    if _bootstrap.disabled():
        print("EAFT_PLUGINS_DISABLE is set: the bootstrap does nothing in this environment.")
    eps = entry_points()
    if not eps:
        print(f"no '{ENTRY_POINT_GROUP}' entry points found: is eaft-plugins installed (pip install)?")
        return 1
    bad = 0
    for name, ep in sorted(eps.items()):
        dist = DISTRIBUTIONS.get(name, name)
        version = distribution_version(dist)
        print(f"\n[{name}] entry point {ep.value}")
        if version is None:
            print(f"  {dist} is not installed: nothing to patch")
            continue
        print(f"  {dist} {version} installed")
        if name not in sys.modules and not _bootstrap.disabled():
            try:
                importlib.import_module(name)
            except Exception as exc:
                print(f"  importing {name} failed: {exc!r}")
        integration = None
        try:
            integration = importlib.import_module(ep.module)
            # Frameworks that import lazily are patched when these submodules load.
            for sub in getattr(integration, "DOCTOR_IMPORTS", ()) if not _bootstrap.disabled() else ():
                importlib.import_module(sub)
        except Exception as exc:
            print(f"  loading the integration failed: {exc!r}")
        st = status(name)
        print(f"  activated: {'yes' if st.activated else 'no'}")
        for problem in getattr(integration, "runtime_problems", lambda: [])():
            bad += 1
            print(f"  CANNOT RUN: {problem}")
        for what in st.patched:
            print(f"  patched: {what}")
        for what in st.errors:
            bad += 1
            print(f"  NOT patched: {what}")
    return 1 if bad else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eaft_plugins")
    parser.add_argument("command", choices=["doctor"], help="doctor: report frameworks, versions and patches")
    args = parser.parse_args(argv)
    if args.command == "doctor":
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        return doctor()
    return 2


if __name__ == "__main__":
    sys.exit(main())
