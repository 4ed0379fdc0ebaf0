"""Post-import hooks, armed at interpreter start by `eaft_plugins.pth`.

Cheap and silent: importing this module touches no torch and no framework. When a watched
framework (`llamafactory`, `swift`, ...) is first imported, the integrations named by this
package's `eaft_plugins.frameworks` entry points are activated; they register further hooks
on the submodules they patch. EAFT_PLUGINS_DISABLE=1 (or true / yes) turns all of it off; any
other value, "off" included, leaves it on.
"""

import importlib.abc
import importlib.util
import os
import sys
import threading

# Top-level modules whose import activates the integration of the same entry-point name.
FRAMEWORK_MODULES = ("llamafactory", "swift", "trl")

_hooks = {}  # module name -> list of callbacks(module)
_lock = threading.RLock()
_finder = None


DISABLE_WORDS = ("1", "true", "yes")  # the .pth line spells the same tuple


def disabled() -> bool:
    # Only an explicit yes disables: a typo such as "off" must not turn EAFT off silently.
    return os.environ.get("EAFT_PLUGINS_DISABLE", "").strip().lower() in DISABLE_WORDS


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


def _activate_framework(module):
    try:
        from eaft_plugins.activation import activate

        activate(module.__name__)
    except Exception as exc:  # the bootstrap never breaks the user's import
        try:
            from eaft_plugins.activation import record_error

            record_error(module.__name__, f"activation failed: {exc!r}")
        except Exception:
            pass
        print(f"[eaft_plugins] could not activate the {module.__name__} integration: {exc!r}", file=sys.stderr)


_armed = False


def arm():
    """Called from the .pth line: watch the framework modules. Never raises.

    Idempotent: site processes the .pth once per site-packages path, and a venv's lib64 -> lib
    symlink makes that twice.
    """
    global _armed
    try:
        if disabled() or _armed:
            return
        _armed = True
        for name in FRAMEWORK_MODULES:
            when_imported(name, _activate_framework)
    except Exception:
        pass
