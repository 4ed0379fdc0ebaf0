"""Post-import hooks: run a callback once a module has been imported, without importing it first.

Cheap and silent (standard library only): the `.pth` bootstrap arms it at every interpreter start.
"""

import importlib.abc
import importlib.util
import sys
import threading

_hooks = {}  # module name -> list of callbacks(module)
_lock = threading.RLock()
_finder = None


def when_imported(name, callback):
    """Run callback(module) once `name` has been imported (now, if it already is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _hooks.setdefault(name, []).append(callback)
            _ensure_finder()
            return
    callback(module)


def _run_hooks(module):
    with _lock:
        callbacks = _hooks.pop(module.__name__, [])
    for callback in callbacks:
        callback(module)


class _HookLoader(importlib.abc.Loader):
    """Delegates to the real loader, then runs the hooks registered for the module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        spec = module.__spec__
        spec.loader = module.__loader__ = self._loader  # later reloads and introspection see the real one
        self._loader.exec_module(module)
        _run_hooks(module)

    def __getattr__(self, item):
        return getattr(self._loader, item)


class _HookFinder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self._busy = set()

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _hooks or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            self._busy.discard(fullname)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _HookLoader(spec.loader)
        return spec


def _ensure_finder():
    global _finder
    if _finder is None:
        _finder = _HookFinder()
        sys.meta_path.insert(0, _finder)
