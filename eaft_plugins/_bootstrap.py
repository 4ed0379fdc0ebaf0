"""The `.pth` bootstrap, armed at interpreter start by `eaft_plugins.pth` (hooks.py does the watching).

Cheap and silent: importing this module touches no torch and no framework. When a watched
framework (`llamafactory`, `swift`, ...) is first imported, the integrations named by this
package's `eaft_plugins.frameworks` entry points are activated; they register further hooks
on the submodules they patch. EAFT_PLUGINS_DISABLE=1 (or true / yes) turns all of it off; any
other value, "off" included, leaves it on.
"""

import os
import sys

from .hooks import when_imported

# Top-level modules whose import activates the integration of the same entry-point name.
FRAMEWORK_MODULES = ("llamafactory", "swift", "trl")
DISABLE_WORDS = ("1", "true", "yes")  # the .pth line spells the same tuple


def disabled() -> bool:
    # Only an explicit yes disables: a typo such as "off" must not turn EAFT off silently.
    return os.environ.get("EAFT_PLUGINS_DISABLE", "").strip().lower() in DISABLE_WORDS


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
