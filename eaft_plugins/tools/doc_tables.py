"""The generated tables in docs/: the option tables, from the option schema (`options.SETTINGS`; `methods`: the
SFT-KL / FLOW / TALR keys of `options.METHOD_SETTINGS`), and the
families table, from the stored family sweeps (`eaft_plugins.models.families`, one per transformers release).

An option table sits between `<!-- options table: KIND -->` and `<!-- end of options table -->`, the families
table between `<!-- families table -->` and `<!-- end of families table -->`.
`python -m eaft_plugins.tools.doc_tables [DOCS]` rewrites them (DOCS: the checkout's docs/ by default);
tests/tools/test_docs.py fails when one drifts.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields
from pathlib import Path

from ..options import METHOD_SETTINGS, SETTINGS, EAFTOptions

_ALLOWED = {"topk": "integer >= 2, or `full`", "float": "number", "bool": "`true`, `false`", "int": "integer",
            "tau": "`median`, or a number > 0"}
# KIND -> (first column header, how a setting is written there)
KINDS = {
    "loss": ("option", "`{name}`"),
    "llamafactory": ("YAML key", "`{key}`"),
    "swift": ("flag", "`--{key}`"),
    "trl": ("field / flag", "`{key}`"),
    "methods": ("key (YAML key, `--flag`, SFTConfig field)", "`{key}`"),  # SFT-KL, FLOW, TALR
}
_BLOCK = re.compile(r"(<!-- options table: (\w+)[^>]*-->\n)(.*?)(<!-- end of options table -->)", re.S)
_FAMILIES = re.compile(r"(<!-- families table -->\n)(.*?)(<!-- end of families table -->)", re.S)
DOCS = Path(__file__).resolve().parents[2] / "docs"  # the source checkout's


def _rows(kind: str):
    if kind == "methods":
        return [(s.name, s.key, s.kind, s.default_text, s.choices, s.help)
                for method, group in METHOD_SETTINGS.items() if method != "eaft" for s in group]
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
    """`text` with every options table and the families table regenerated."""
    text = _BLOCK.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)
    if _FAMILIES.search(text):
        from ..models.families import families_table  # torch: only where a page has the table

        text = _FAMILIES.sub(lambda m: m.group(1) + families_table() + m.group(3), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eaft_plugins.tools.doc_tables",
                                 description="Rewrite the generated tables of the docs (options, families).")
    ap.add_argument("docs", nargs="?", default=None, help="the docs folder (default: the checkout's docs/)")
    given = ap.parse_args(argv).docs
    root = Path(given) if given else DOCS
    if not root.is_dir():
        where = "" if given else " (this is not a source checkout)"
        print(f"doc_tables: no docs folder at {root}{where}; pass the docs folder: "
              f"python -m eaft_plugins.tools.doc_tables path/to/docs", file=sys.stderr)
        return 2
    for path in sorted(root.glob("*.md")):
        text = path.read_text(encoding="utf-8")
        new = render(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
