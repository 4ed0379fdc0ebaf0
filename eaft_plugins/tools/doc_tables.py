"""The option tables in docs/, generated from the option schema (`options.SETTINGS`).

A table sits between `<!-- options table: KIND -->` and `<!-- end of options table -->`;
`python -m eaft_plugins.tools.doc_tables` rewrites them, tests/tools/test_docs.py fails when one drifts.
"""

from __future__ import annotations

import re
import sys
from dataclasses import fields
from pathlib import Path

from ..options import SETTINGS, EAFTOptions

_ALLOWED = {"topk": "integer >= 2, or `full`", "float": "number", "bool": "`true`, `false`", "int": "integer"}
# KIND -> (first column header, how a setting is written there)
KINDS = {
    "loss": ("option", "`{name}`"),
    "llamafactory": ("YAML key", "`{key}`"),
    "swift": ("flag", "`--{key}`"),
    "trl": ("field / flag", "`{key}`"),
}
_BLOCK = re.compile(r"(<!-- options table: (\w+)[^>]*-->\n)(.*?)(<!-- end of options table -->)", re.S)


def _rows(kind: str):
    if kind != "loss":
        return [(s.name, s.key, s.kind, s.default_text, s.choices, s.help) for s in SETTINGS]
    rows = []
    for f in fields(EAFTOptions):
        meta = f.metadata
        default = "full" if f.name == "topk" and f.default is None else str(f.default)
        rows.append((f.name, f"eaft_{f.name}", meta["kind"], default, tuple(meta.get("choices", ())), meta["help"]))
    return rows


def table(kind: str) -> str:
    header, cell = KINDS[kind]
    lines = [f"| {header} | default | allowed | meaning |", "|---|---|---|---|"]
    for name, key, value_kind, default, choices, help_text in _rows(kind):
        allowed = _ALLOWED.get(value_kind) or ", ".join(f"`{c}`" for c in choices)
        lines.append(f"| {cell.format(name=name, key=key)} | `{default}` | {allowed} | {help_text.replace('|', chr(92) + '|')} |")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """`text` with every options table regenerated."""
    return _BLOCK.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


def main(argv=None) -> int:
    root = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "docs"
    for path in sorted(root.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
