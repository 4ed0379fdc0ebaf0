"""Probe data of the retention monitor: a builtin preset or a user JSONL file, checked row by row.

`retention_probe` takes `builtin` (DEFAULT rows of each kind, for live monitoring), `builtin-large` (LARGE of
each, for an end-of-run or offline reading), or the path of a JSONL file; `:exact` after any of them stores
the base's full distribution for the exact KL (memory permitting) instead of its top-k + tail.

A row is one of (docs/retention.md, "Probe files")
    {"text": "..."}                                     scored: NLL of the text
    {"prompt": "..."}                                   scored: KL(base || current) along the base's greedy answer
    {"question": "...", "choices": [...], "answer": i}  scored: every choice, the right one normalised among them
each optionally with "id" and "source" (strings: where the item comes from). Every problem (missing file, a
directory, bad JSON, an unknown or missing field, a value of the wrong type, an item longer than the model's
context) is a ValueError naming the key, the file, the 1-based row and the field, raised before training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

DATA = Path(__file__).resolve().parents[1] / "data"
BUILTIN = "builtin"
PRESETS = {"builtin": 12, "builtin-large": 64}  # rows of each kind (prompt, text, mc)
EXACT = ":exact"
KINDS = ("prompt", "text", "mc")
SHAPES = '{"text"}, {"prompt"} or {"question", "choices", "answer"} (each optionally with "id", "source")'
OPTIONAL = ("id", "source")


@dataclass(frozen=True)
class Row:
    kind: str  # "prompt", "text" or "mc"
    text: str  # the prompt, the text, or the question
    choices: tuple = ()
    answer: int = -1
    where: str = ""  # "FILE row N", for errors
    id: str = ""
    source: str = ""


@dataclass(frozen=True)
class Probe:
    """A parsed `retention_probe` value."""

    name: str  # builtin, builtin-large, or the file's path as given
    rows: tuple
    exact: bool = False  # store the full base distribution (exact KL)


def _jsonl(path: Path, shown: str) -> List[Row]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} row {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{shown}: {where} is not valid JSON ({exc.msg}); each line must be one of {SHAPES}") from None
        rows.append(parse_row(obj, where, shown))
    return rows


def builtin_rows(preset: str = BUILTIN) -> List[Row]:
    """The first PRESETS[preset] rows of each kind from the package's probe files (eaft_plugins/data/README.md),
    interleaved (prompt, text, mc, prompt, ...). Texts alternate between the two text sources."""
    n = PRESETS[preset]
    arc = _jsonl(DATA / "probe_arc.jsonl", preset)
    ifeval, pubmed = _jsonl(DATA / "probe_ifeval.jsonl", preset), _jsonl(DATA / "probe_pubmedqa.jsonl", preset)
    texts = [r for pair in zip(ifeval, pubmed) for r in pair]
    lists = [[r for r in arc if r.kind == "prompt"][:n], texts[:n], [r for r in arc if r.kind == "mc"][:n]]
    return [x[i] for i in range(n) for x in lists if i < len(x)]


def read_rows(path, shown: str = "retention_probe") -> List[Row]:
    """Rows of a user JSONL probe file; ValueError naming the file and row on any problem."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{shown}: {str(path)!r} is a directory; give a JSONL file of {SHAPES} rows "
                         f"(or one of {', '.join(PRESETS)})")
    if not p.is_file():
        raise ValueError(f"{shown}: probe file {str(path)!r} does not exist (use `builtin`, `builtin-large` or a "
                         f"JSONL file of {SHAPES} rows)")
    rows = _jsonl(p, shown)
    if not rows:
        raise ValueError(f"{shown}: probe file {p} is empty; give at least one row of {SHAPES}")
    return rows


def _text(obj, key: str, bad: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{bad}: \"{key}\" must be a non-empty string, got {value!r}")
    return value


def parse_row(obj, where: str, shown: str = "retention_probe") -> Row:
    bad = f"{shown}: {where}"
    if not isinstance(obj, dict):
        raise ValueError(f"{bad} is a {type(obj).__name__}, expected an object {SHAPES}")
    extra = {k: _text(obj, k, bad) for k in OPTIONAL if k in obj}
    keys = set(obj) - set(OPTIONAL)
    if keys == {"text"} or keys == {"prompt"}:
        kind = "text" if "text" in keys else "prompt"
        return Row(kind, _text(obj, kind, bad), where=where, **extra)
    if keys == {"question", "choices", "answer"}:
        q, choices, answer = _text(obj, "question", bad), obj["choices"], obj["answer"]
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise ValueError(f"{bad}: \"choices\" must be a list of at least 2 non-empty strings, got {choices!r}")
        if len(set(choices)) != len(choices):
            raise ValueError(f"{bad}: \"choices\" has the same choice twice: {choices!r}")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{bad}: \"answer\" must be the index (0..{len(choices) - 1}) or the text of the "
                             f"right choice, got {answer!r}")
        return Row("mc", q, tuple(choices), answer, where, **extra)
    mc = {"question", "choices", "answer"}
    if keys & mc and keys <= mc:
        missing = sorted(mc - keys)
        raise ValueError(f"{bad}: a multiple-choice row needs field{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(repr(m) for m in missing)}; expected {SHAPES}")
    unknown = sorted(keys - mc - {"text", "prompt"})
    if unknown:
        raise ValueError(f"{bad}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"expected exactly one of {SHAPES}")
    raise ValueError(f"{bad} has fields {sorted(keys)}; expected exactly one of {SHAPES}")


def parse_probe(probe, shown: str = "retention_probe") -> Probe:
    """`builtin`, `builtin-large` or a JSONL path, optionally followed by `:exact`."""
    if not isinstance(probe, str) or not probe.strip():
        raise ValueError(f"{shown} must be `builtin`, `builtin-large` or the path of a JSONL file (optionally "
                         f"followed by `{EXACT}`), got {probe!r}")
    name, exact = probe.strip(), False
    if name.endswith(EXACT) and not Path(name).expanduser().is_file():
        name, exact = name[:-len(EXACT)].strip(), True
    rows = builtin_rows(name) if name in PRESETS else read_rows(name, shown)
    return Probe(name, tuple(rows), exact)


def load_rows(probe: str, shown: str = "retention_probe") -> List[Row]:
    """The rows of a `retention_probe` value."""
    try:
        return list(parse_probe(probe, shown).rows)
    except (OSError, RuntimeError, UnicodeDecodeError) as exc:  # too long a name, no permission, unknown ~user, binary
        raise ValueError(f"{shown}: cannot read the probe file {probe!r} ({getattr(exc, 'strerror', None) or exc}); "
                         "use `builtin` or a readable UTF-8 JSONL file") from None


def parse_steps(value, shown: str = "retention_steps") -> Optional[int]:
    """None (the default interval) or an integer >= 1 (strings from YAML / the command line accepted)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = int(value)  # what int() reads, as argparse does ("+5"; not "²", which isdigit() passes)
        except ValueError:
            pass  # refused below
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{shown} must be an integer >= 1 (optimizer steps between two probes), got {value!r}")
    return value


def counts(rows) -> Tuple[int, int, int]:
    return tuple(sum(r.kind == k for r in rows) for k in KINDS)
