"""Which split and metric can give the paper's published scores? A score over N items is k/N, so a
published percentage p (one decimal) is attainable only if round(100 k / N, 1) == p for some integer k.
(EvalScope rounds a score to 4 decimals first, so p may be up to 0.055 from 100 k / N; ties either way.)
Every row of one benchmark (base, SFT, EAFT, ...) was scored on the same split with the same metric,
so a candidate that cannot give one of them is ruled out. Passing is necessary, not sufficient: any
grid finer than 0.1 point passes everything (noted per candidate).

The published numbers are collect.py's PAPER tables (the authors' README, PRIS-CV/EAFT).
  python recipes/eval/attainable.py            # markdown table (docs/evaluation.md holds its output)
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

_spec = importlib.util.spec_from_file_location("eval_collect", Path(__file__).with_name("collect.py"))
collect = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(collect)

DIGITS = 1  # the paper prints one decimal
# EvalScope stores a score rounded to 4 decimals (0.xxxx, i.e. 2 in percent) before anyone prints it:
# a published value may be off the exact k/N by half a unit of each rounding, ties going either way.
TOLERANCE = Fraction(1, 2 * 10 ** DIGITS) + Fraction(1, 200)
# IFEval: prompts by number of instructions (541 prompts, 834 instructions; the IFEval input file,
# google-research/instruction_following_eval; tests check it against the shared copy).
IFEVAL_INSTRUCTIONS_PER_PROMPT = {1: 305, 2: 179, 3: 57}


class Candidate(NamedTuple):
    key: str  # what the defaults name (prepare_custom.CLUEWSC_SPLIT, collect.DEFAULT_METRIC, ...)
    what: str
    items: int  # N of the k/N grid; for per_prompt, the number of prompts averaged
    per_prompt: Optional[Dict[int, int]] = None  # {denominator: prompts}: a mean of per-prompt fractions


CANDIDATES: Dict[str, List[Candidate]] = {
    "CLUEWSC": [
        Candidate("clue_dev", "CLUEWSC2020 dev (CLUE, Hub `clue`/cluewsc2020 validation)", 304),
        Candidate("clue_test", "CLUEWSC2020 test (= FewCLUE test.json; labels not public)", 290),
        Candidate("fewclue_dev_few_all", "FewCLUE dev_few_all (OpenCompass `cluewsc-dev`)", 159),
        Candidate("fewclue_test_public", "FewCLUE test_public (OpenCompass `cluewsc-test`)", 976),
        Candidate("clue_train", "CLUEWSC2020 train (a training split)", 1244),
    ],
    "IFEval": [
        Candidate("prompt_level_strict", "prompt level, strict or loose (541 prompts)", 541),
        Candidate("inst_level_pooled", "instruction level pooled over 834 instructions (IFEval's own, lm-eval, OpenCompass)", 834),
        Candidate("inst_level_strict", "EvalScope `inst_level_strict` / `_loose`: mean over 541 prompts of each prompt's followed fraction",
                  541, IFEVAL_INSTRUCTIONS_PER_PROMPT),
    ],
    "MMLU": [Candidate("mmlu_test", "MMLU test, 0- or 5-shot (EvalScope: 5), micro mean", 14042)],
    "GSM8K": [Candidate("gsm8k_test", "GSM8K test, 0- or 4-shot (EvalScope: 4)", 1319)],
    "AIME25": [
        Candidate("aime_1", "AIME25, one sample per problem", 30),
        Candidate("aime_8", "AIME25, mean of 8 samples per problem (run_eval.sh AIME_REPEATS)", 240),
    ],
}


def _near(total: Fraction, published: float) -> bool:
    """total (a percentage) can print as `published`, rounded once or twice (see TOLERANCE)."""
    return abs(total - Fraction(str(published))) <= TOLERANCE


def attainable(published: float, n: int) -> bool:
    """Some k in 0..n with 100 k / n printing as `published`."""
    centre = Fraction(str(published)) * n / 100
    return any(0 <= k <= n and _near(Fraction(100 * k, n), published) for k in (math.floor(centre), math.ceil(centre)))


def _reachable_sums(per_prompt: Dict[int, int]) -> Tuple[int, int]:
    """(bitmask of reachable totals, unit): totals of per-prompt fractions k_i / d_i, in units of 1/unit."""
    unit = math.lcm(*per_prompt)
    reach = 1
    for d, count in per_prompt.items():
        step = unit // d
        for _ in range(count):
            reach = reach | _shifts(reach, step, d)
    return reach, unit


def _shifts(reach: int, step: int, d: int) -> int:
    out = 0
    for k in range(1, d + 1):
        out |= reach << (k * step)
    return out


def attainable_mean(published: float, per_prompt: Dict[int, int]) -> bool:
    """Some choice of followed instructions whose mean per-prompt fraction prints as `published`."""
    reach, unit = _reachable_sums(per_prompt)
    scale = Fraction(unit * sum(per_prompt.values()), 100)  # percentage -> total in 1/unit
    low = math.ceil((Fraction(str(published)) - TOLERANCE) * scale)
    high = math.floor((Fraction(str(published)) + TOLERANCE) * scale)
    return any(reach >> t & 1 for t in range(max(low, 0), high + 1))


def fits(candidate: Candidate, published: float) -> bool:
    if candidate.per_prompt is not None:
        return attainable_mean(published, candidate.per_prompt)
    return attainable(published, candidate.items)


def published(benchmark: str) -> List[Tuple[str, float]]:
    """[(row, score)] over every table of collect.PAPER that has the column; a row repeated in
    two tables (the agent table's base model is the math table's) counts once."""
    out = []
    for domain, rows in collect.PAPER.items():
        columns = collect.paper_columns(domain)
        if benchmark not in columns:
            continue
        for name, values in rows.items():
            row = (f"{domain}: {name}", values[columns.index(benchmark)])
            if not any(r[0].split(": ", 1)[1] == name and r[1] == row[1] for r in out):
                out.append(row)
    return out


def base_rows(benchmark: str) -> List[Tuple[str, float]]:
    """The base models' scores (each table's first row)."""
    firsts = {f"{d}: {next(iter(rows))}" for d, rows in collect.PAPER.items()}
    return [r for r in published(benchmark) if r[0] in firsts]


def verdict(benchmark: str, candidate: Candidate) -> dict:
    rows = published(benchmark)
    misses = [v for _, v in rows if not fits(candidate, v)]
    base_misses = [v for _, v in base_rows(benchmark) if not fits(candidate, v)]
    return {"rows": len(rows), "misses": misses, "base": len(base_rows(benchmark)), "base_misses": base_misses}


def consistent(benchmark: str, key: str) -> bool:
    """Every published score of the benchmark is attainable under the candidate `key`."""
    candidate = next(c for c in CANDIDATES[benchmark] if c.key == key)
    return not verdict(benchmark, candidate)["misses"]


def _grid(c: Candidate) -> str:
    if c.per_prompt is None:
        return f"k/{c.items}"
    return f"mean of k_i/n_i, {c.items} prompts"


def table() -> str:
    head = "| Benchmark | Candidate | Grid | Base rows attainable | All rows attainable | Not attainable |"
    lines = [head, "|---|---|---|---|---|---|"]
    for bench, candidates in CANDIDATES.items():
        for c in candidates:
            v = verdict(bench, c)
            missed = ", ".join(f"{m:.1f}" for m in v["misses"]) or "-"
            lines.append(f"| {bench} | {c.what} | {_grid(c)} | {v['base'] - len(v['base_misses'])}/{v['base']} "
                         f"| {v['rows'] - len(v['misses'])}/{v['rows']} | {missed} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args(argv)
    print(table(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
