"""Entry-point discovery of framework integrations, and a record of what each one patched."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import metadata
from typing import Dict, List, Optional

ENTRY_POINT_GROUP = "eaft_plugins.frameworks"


@dataclass
class FrameworkStatus:
    name: str
    version: Optional[str] = None
    activated: bool = False
    patched: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)


_status: Dict[str, FrameworkStatus] = {}


def status(name: str) -> FrameworkStatus:
    return _status.setdefault(name, FrameworkStatus(name))


def record_patch(name: str, what: str) -> None:
    status(name).patched.append(what)


def record_error(name: str, what: str) -> None:
    status(name).errors.append(what)


def guarded(name: str, what: str, callback):
    """An import-hook callback that never breaks the user's import: a failure is recorded (doctor
    shows it) and printed."""

    def run(module):
        try:
            callback(module)
        except Exception as exc:
            record_error(name, f"{what}: {exc!r}")
            print(f"[eaft_plugins] {name}: {what} failed: {exc!r}", file=sys.stderr)

    return run


def entry_points() -> Dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def distribution_version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def activate(name: str) -> bool:
    """Run the `activate()` of the integration registered under entry-point name `name` (once)."""
    st = status(name)
    if st.activated:
        return True
    eps = entry_points()
    if name not in eps:
        record_error(name, f"no '{ENTRY_POINT_GROUP}' entry point named {name!r} (is eaft-plugins installed?)")
        return False
    eps[name].load()()
    st.activated = True
    return True


def activate_llamafactory() -> None:
    """Entry point of the `llamafactory.plugins` group that patches/ adds to LLaMA-Factory."""
    activate("llamafactory")


def install(frameworks=None) -> Dict[str, FrameworkStatus]:
    """Explicit activation, for environments without the .pth bootstrap (or with it disabled).

    Arms the import hooks for the named frameworks (default: all registered ones); a framework
    that is already imported is patched at once.
    """
    from .hooks import when_imported

    names = list(frameworks) if frameworks is not None else list(entry_points())
    for name in names:
        if name in sys.modules:
            activate(name)
        else:
            when_imported(name, lambda module: activate(module.__name__))
    return {n: status(n) for n in names}
