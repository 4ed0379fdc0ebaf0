"""Probe data of the retention monitor: the builtin general set or a user JSONL file, checked row by row.

A row is one of
    {"text": "..."}                                   scored: NLL of the text
    {"prompt": "..."}                                 scored: KL(base || current) along the base's greedy answer
    {"question": "...", "choices": [...], "answer": i}  scored: log-prob of the right choice (index, or its text)
Every problem (missing / empty file, bad JSON, unknown shape, an item longer than the model's context)
is a ValueError naming the file and the 1-based row, raised before training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

DATA = Path(__file__).resolve().parents[1] / "data"
BUILTIN = "builtin"
KINDS = ("prompt", "text", "mc")
SHAPES = '{"text"}, {"prompt"} or {"question", "choices", "answer"}'


@dataclass(frozen=True)
class Row:
    kind: str  # "prompt", "text" or "mc"
    text: str  # the prompt, the text, or the question
    choices: tuple = ()
    answer: int = -1
    where: str = ""  # "FILE row N", for errors


def builtin_rows() -> List[Row]:
    """The package's general set, interleaved (prompt, text, mc, prompt, ...) so a budget takes some of each."""
    prompts = json.loads((DATA / "general_prompts.json").read_text())
    texts = json.loads((DATA / "general_texts.json").read_text())
    mc = json.loads((DATA / "general_mc.json").read_text())
    src = "eaft_plugins/data"
    lists = [
        [Row("prompt", p, where=f"{src}/general_prompts.json item {i + 1}") for i, p in enumerate(prompts)],
        [Row("text", t, where=f"{src}/general_texts.json item {i + 1}") for i, t in enumerate(texts)],
        [Row("mc", m["question"], tuple(m["choices"]), m["answer"], f"{src}/general_mc.json item {i + 1}")
         for i, m in enumerate(mc)],
    ]
    out = []
    for i in range(max(len(x) for x in lists)):
        out.extend(x[i] for x in lists if i < len(x))
    return out


def read_rows(path, shown: str = "retention_probe") -> List[Row]:
    """Rows of a user JSONL probe file; ValueError naming the file and row on any problem."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"{shown}: probe file {str(path)!r} does not exist (use `builtin` or a JSONL file of "
                         f"{SHAPES} rows)")
    rows = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p} row {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{shown}: {where} is not valid JSON ({exc.msg}); each line must be one of {SHAPES}") from None
        rows.append(parse_row(obj, where, shown))
    if not rows:
        raise ValueError(f"{shown}: probe file {p} is empty; give at least one row of {SHAPES}")
    return rows


def parse_row(obj, where: str, shown: str = "retention_probe") -> Row:
    bad = f"{shown}: {where}"
    if not isinstance(obj, dict):
        raise ValueError(f"{bad} is a {type(obj).__name__}, expected an object {SHAPES}")
    keys = set(obj)
    if keys == {"text"} or keys == {"prompt"}:
        kind = "text" if "text" in keys else "prompt"
        value = obj[kind]
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{bad}: \"{kind}\" must be a non-empty string, got {value!r}")
        return Row(kind, value, where=where)
    if keys == {"question", "choices", "answer"}:
        q, choices, answer = obj["question"], obj["choices"], obj["answer"]
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{bad}: \"question\" must be a non-empty string, got {q!r}")
        if (not isinstance(choices, list) or len(choices) < 2
                or not all(isinstance(c, str) and c.strip() for c in choices)):
            raise ValueError(f"{bad}: \"choices\" must be a list of at least 2 non-empty strings, got {choices!r}")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{bad}: \"answer\" must be the index (0..{len(choices) - 1}) or the text of the right "
                             f"choice, got {answer!r}")
        return Row("mc", q, tuple(choices), answer, where)
    raise ValueError(f"{bad} has keys {sorted(keys)}; expected exactly one of {SHAPES}")


def load_rows(probe: str, shown: str = "retention_probe") -> List[Row]:
    """`builtin` or a JSONL path."""
    if not isinstance(probe, str) or not probe.strip():
        raise ValueError(f"{shown} must be `builtin` or the path of a JSONL file, got {probe!r}")
    return builtin_rows() if probe.strip() == BUILTIN else read_rows(probe.strip(), shown)


def parse_steps(value, shown: str = "retention_steps") -> Optional[int]:
    """None (the default interval) or an integer >= 1 (strings from YAML / the command line accepted)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{shown} must be an integer >= 1 (optimizer steps between two probes), got {value!r}")
    return value
