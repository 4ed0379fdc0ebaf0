"""From per-item values to the logged readings, their standard errors, and differences between runs.

The monitor keeps one row of COLUMNS per probe item (a "unit"): a prompt holds (KL summed over its answer
tokens, answer tokens), a text (NLL summed over its tokens, tokens), a multiple-choice item (log and value of
the right choice's probability normalised among the choices, whether it ranks first, the same two for the
lettered variant). Every reading is a ratio over items, sum(x) / sum(n) (n = 1 for per-item means), whose
standard error over items is the usual ratio (linearisation) estimate
    se = sqrt(m / (m - 1) * sum((x - r n)^2)) / sum(n),
which for n = 1 is the standard deviation over items / sqrt(m). It says how much the reading would move
with another draw of probe items of the same kind, not how much another training seed would move it.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

PREFIX = "retention/"
COLUMNS = 5
# name, item kind, column, ratio (n in column 1), has a change-from-base reading
SERIES = (("kl_base", "prompt", 0, True, False), ("text_nll", "text", 0, True, True),
          ("mc_logp", "mc", 0, False, True), ("mc_prob", "mc", 1, False, True), ("mc_acc", "mc", 2, False, True),
          ("mc_letter_prob", "mc", 3, False, True), ("mc_letter_acc", "mc", 4, False, True))
# The readings runs are compared on: each is 0 for the model before fine-tuning.
CHANGES = ("kl_base", "text_nll_delta", "mc_logp_delta", "mc_prob_delta", "mc_acc_delta", "mc_letter_prob_delta",
           "mc_letter_acc_delta")


def unit_values(kinds: Sequence[str], table, base) -> Dict[str, Tuple[List[float], List[float]]]:
    """{reading: (x per item, n per item)} from the per-item table of a measurement and of the base."""
    table, base = torch.as_tensor(table, dtype=torch.float64), torch.as_tensor(base, dtype=torch.float64)
    out = {}
    for name, kind, col, ratio, delta in SERIES:
        rows = [i for i, k in enumerate(kinds) if k == kind]
        if not rows:
            continue
        x = table[rows, col]
        n = table[rows, 1] if ratio else torch.ones(len(rows), dtype=torch.float64)
        out[name] = (x.tolist(), n.tolist())
        if delta:
            out[name + "_delta"] = ((x - base[rows, col]).tolist(), n.tolist())
    return out


def estimate(x: Sequence[float], n: Sequence[float]) -> Tuple[float, Optional[float]]:
    """sum(x) / sum(n) and its standard error over items (None with fewer than 2 items)."""
    x, n = torch.tensor(x, dtype=torch.float64), torch.tensor(n, dtype=torch.float64)
    total = float(n.sum())
    if total <= 0:
        return float("nan"), None
    r = float(x.sum()) / total
    m = len(x)
    if m < 2:
        return r, None
    return r, math.sqrt(m / (m - 1) * float(((x - r * n) ** 2).sum())) / total


def readings(kinds: Sequence[str], table, base) -> Dict[str, float]:
    """The logged values: retention/<reading> and retention/<reading>_se."""
    out = {}
    for name, (x, n) in unit_values(kinds, table, base).items():
        value, se = estimate(x, n)
        if name == "kl_base":
            value = max(0.0, value)  # float rounding of a KL of 0
        out[PREFIX + name] = value
        if se is not None:
            out[PREFIX + name + "_se"] = se
    return out


# ---- differences between runs


def t_quantile(df: float, p: float = 0.975) -> float:
    """Student's t quantile (Cornish-Fisher expansion around the normal one; within 1% for df >= 2)."""
    z = 1.959963984540054 if p == 0.975 else _normal_quantile(p)
    if not math.isfinite(df) or df > 1e6:
        return z
    df = max(df, 1.0)
    if df < 2:
        return 12.706 if p == 0.975 else z * 6.5  # df = 1: the expansion does not hold
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / df + g2 / df ** 2 + g3 / df ** 3 + g4 / df ** 4


def _normal_quantile(p: float) -> float:
    from statistics import NormalDist

    return NormalDist().inv_cdf(p)


def _mean_over_runs(runs: List[Tuple[List[float], List[float]]]):
    x = torch.tensor([r[0] for r in runs], dtype=torch.float64)  # [runs, items]
    n = torch.tensor([r[1] for r in runs], dtype=torch.float64)
    return x, n


def difference(a_runs, b_runs) -> dict:
    """B minus A for one reading, paired by probe item. a_runs / b_runs: per run (seed) of each arm, (x, n) per
    item on the same probe. Returns the difference, its standard error and a 95% interval:
      * items: the item-level error of the seed-averaged, item-paired difference (ratio estimate);
      * seeds: with 2+ runs in an arm, the spread of the per-run readings over runs (training noise);
      * both together, degrees of freedom by Welch-Satterthwaite.
    Items are paired only when every run has the same n per item (same probe, same base answers); otherwise
    the arms are compared unpaired (each arm's reading and error, combined)."""
    xa, na = _mean_over_runs(a_runs)
    xb, nb = _mean_over_runs(b_runs)
    paired = xa.shape[1] == xb.shape[1] and bool((na == na[:1]).all() and (nb == na[:1]).all())
    per_run_a = (xa.sum(1) / na.sum(1)).tolist()
    per_run_b = (xb.sum(1) / nb.sum(1)).tolist()
    if paired:
        d, se_items = estimate((xb.mean(0) - xa.mean(0)).tolist(), na[0].tolist())
        m = xa.shape[1]
    else:
        (ra, sa), (rb, sb) = estimate(xa.mean(0).tolist(), na.mean(0).tolist()), estimate(xb.mean(0).tolist(),
                                                                                          nb.mean(0).tolist())
        d = rb - ra
        se_items = math.sqrt((sa or 0) ** 2 + (sb or 0) ** 2) if sa is not None and sb is not None else None
        m = min(xa.shape[1], xb.shape[1])
    terms = []  # (variance, degrees of freedom)
    if se_items is not None:
        terms.append((se_items ** 2, m - 1))
    seed_parts = []
    for per_run in (per_run_a, per_run_b):
        k = len(per_run)
        if k >= 2:
            mean = sum(per_run) / k
            var = sum((v - mean) ** 2 for v in per_run) / (k - 1) / k
            terms.append((var, k - 1))
            seed_parts.append(var)
    var = sum(v for v, _ in terms)
    se = math.sqrt(var) if terms else None
    df = var ** 2 / sum(v ** 2 / f for v, f in terms if f > 0) if terms and var > 0 else float("inf")
    half = t_quantile(df) * se if se is not None else None
    return {"diff": d, "se": se, "se_items": se_items,
            "se_seeds": math.sqrt(sum(seed_parts)) if seed_parts else None, "df": df,
            "ci": [d - half, d + half] if half is not None else None,
            "within_noise": half is None or abs(d) <= half, "paired": paired, "items": m,
            "runs": [len(a_runs), len(b_runs)], "a": sum(per_run_a) / len(per_run_a),
            "b": sum(per_run_b) / len(per_run_b)}
