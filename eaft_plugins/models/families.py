"""Which causal LM families fused EAFT runs, per transformers release: the sweep over every family, and the
families table of docs/performance.md built from its stored results.

    python -m eaft_plugins.models.families            # sweep the installed transformers: a line per family, counts
    python -m eaft_plugins.models.families --write    # ... and store the result in sweeps/ (the docs table's source)
    python -m eaft_plugins.models.families --json -   # ... the result as JSON on stdout (tests/models/test_sweep.py)

Every `*ForCausalLM` / `*LMHeadModel` class that transformers exports and whose default config builds (on the
meta device) is patched there: `refused` (a ValueError, with its reason) or accepted. An accepted family runs as
a tiny float64 model (models/tiny.py): `verified` when the fused loss and every gradient equal the dense EAFT on
its own logits plus its router loss; `not exercised`, with the reason, where no tiny version builds generically;
`FAILED` otherwise (an error inside the fused forward, a different loss or gradient). One stored result per
release the test venvs carry (`sweeps/transformers-<version>.json`); `python -m eaft_plugins.tools.doc_tables`
writes the docs table from them.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path

SWEEPS = Path(__file__).resolve().parent / "sweeps"
VERIFIED, NOT_EXERCISED, REFUSED, FAILED, NO_BUILD = "verified", "not exercised", "refused", "FAILED", "no build"
STATUSES = (VERIFIED, NOT_EXERCISED, REFUSED, FAILED, NO_BUILD)

# The rows of the docs table, in its order.
TABLE_FAMILIES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "MixtralForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Glm4ForCausalLM", "Phi3ForCausalLM",
    "CohereForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM", "Olmo2ForCausalLM", "GPT2LMHeadModel",
    "GPTNeoXForCausalLM", "MambaForCausalLM", "Mamba2ForCausalLM", "BartForCausalLM",
)


def model_classes(transformers) -> list:
    names = dir(transformers)
    return sorted(n for n in names if n.endswith(("ForCausalLM", "LMHeadModel")) and not n.startswith("Auto"))


def sweep(names=None, out=None) -> dict:
    """{class name: {"status", "transform", "router_loss", "reason"}} for the installed transformers; `out`: a
    stream for one line per family as it is done."""
    import torch
    import transformers

    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)  # tiny matmuls: threads cost more than they give
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results = {}
            for name in names or model_classes(transformers):
                start = time.perf_counter()
                results[name] = r = check_family(getattr(transformers, name))
                if out is not None:
                    print(f"{r['status']:<13} {name:<40} {time.perf_counter() - start:5.2f}s  {r['reason']}",
                          file=out, flush=True)
        return results
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)


def check_family(cls) -> dict:
    import torch

    from .patch import patch_model_for_fused_eaft
    from .tiny import NotExercised, compare, short_error, tiny_model

    result = {"status": "", "transform": "", "router_loss": "", "reason": ""}
    try:
        with torch.device("meta"):
            model = cls(cls.config_class())
    except Exception as exc:  # noqa: BLE001  (the family's own code, not what is checked)
        return dict(result, status=NO_BUILD, reason=f"its default config does not build ({short_error(exc)})")
    try:
        plan = patch_model_for_fused_eaft(model).plan
    except ValueError as exc:
        return dict(result, status=REFUSED, reason=_refusal(exc))
    router = f"`{plan.aux_coef} * aux_loss`" if plan.aux_coef else "none"
    result.update(transform=str(plan.transform), router_loss=router)
    try:
        dense_model, batch = tiny_model(cls)
    except NotExercised as exc:
        return dict(result, status=NOT_EXERCISED, reason=str(exc))
    try:
        compare(dense_model, batch)
    except Exception as exc:  # noqa: BLE001  (what the sweep is for)
        return dict(result, status=FAILED, reason=short_error(exc))
    return dict(result, status=VERIFIED)


def _refusal(exc: ValueError) -> str:
    text = str(exc)
    return text.split(": ", 1)[-1] if "does not support" in text else text.split("forward: ", 1)[-1]


def counts(results: dict) -> dict:
    found = dict.fromkeys(STATUSES, 0)
    for r in results.values():
        found[r["status"]] += 1
    return found


# ---- stored results and the docs table


def record_path(version: str) -> Path:
    return SWEEPS / f"transformers-{version}.json"


def load_records() -> list:
    """The stored sweeps, oldest transformers first."""
    records = [json.loads(p.read_text()) for p in SWEEPS.glob("transformers-*.json")]
    return sorted(records, key=lambda r: tuple(int(n) for n in re.findall(r"\d+", r["transformers"])[:3]))


def families_table(records=None) -> str:
    """Markdown: the counts per release, the accepted families no tiny model exercised, and the TABLE_FAMILIES rows."""
    records = load_records() if records is None else records
    if not records:
        raise FileNotFoundError(f"no stored sweep in {SWEEPS}: run `python -m eaft_plugins.models.families --write` "
                                f"in each test venv")
    releases = [f"{r['transformers']} (`{r['venv']}`)" for r in records]
    lines = [f"Swept with transformers {', '.join(releases[:-1])}{' and ' if len(releases) > 1 else ''}{releases[-1]}: "
             f"every `*ForCausalLM` / `*LMHeadModel` class whose default config builds, run as a tiny float64 model "
             f"where it is accepted (`python -m eaft_plugins.models.families`, `tests/models/test_sweep.py`).", "",
             "| transformers | classes | fused, loss and gradients verified | accepted, not exercised | refused |",
             "|---|---|---|---|---|"]
    for r in records:
        n = counts(r["families"])
        lines.append(f"| {r['transformers']} | {n[VERIFIED] + n[NOT_EXERCISED] + n[REFUSED] + n[FAILED]} | "
                     f"{n[VERIFIED]} | {n[NOT_EXERCISED]} | {n[REFUSED]} |")
    idle = sorted({name for r in records for name, f in r["families"].items() if f["status"] == NOT_EXERCISED})
    if idle:
        lines += ["", "Accepted, but no tiny model of them builds and runs generically (not exercised):"]
        lines += [f"* `{name}`: {_per_release(records, name, _reason)}" for name in idle]
    lines += ["", "| family | logit transform (default config) | MoE router loss | fused EAFT |", "|---|---|---|---|"]
    for name in TABLE_FAMILIES:
        accepted = [r for r in records if r["families"].get(name, {}).get("status") in (VERIFIED, NOT_EXERCISED)]
        transform = _per_release(accepted, name, lambda f: f["transform"]) if accepted else ""
        router = _per_release(accepted, name, lambda f: f["router_loss"]) if accepted else ""
        lines.append(f"| `{name}` | {transform} | {router} | {_per_release(records, name, _status)} |")
    return "\n".join(lines) + "\n"


def _reason(found: dict) -> str:
    return found["reason"] if found["status"] == NOT_EXERCISED else _status(found)


def _status(found: dict) -> str:
    return {VERIFIED: "supported (verified)", NOT_EXERCISED: "supported (not exercised)",
            REFUSED: f"refused: {found['reason']}", FAILED: f"FAILED: {found['reason']}",
            NO_BUILD: found["reason"]}[found["status"]]


def _per_release(records, name: str, cell) -> str:
    """`cell` of the family, or "5.6.0: x; 5.19.0, 5.24.0: y" where releases differ."""
    groups = {}
    for r in records:
        found = r["families"].get(name)
        groups.setdefault(cell(found) if found else "absent", []).append(r["transformers"])
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{', '.join(versions)}: {value}" for value, versions in groups.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eaft_plugins.models.families",
                                     description="Check fused EAFT on every causal LM family of this transformers.")
    parser.add_argument("names", nargs="*", help="only these classes (default: every causal LM class)")
    parser.add_argument("--json", metavar="PATH", help="write the result as JSON there (- for stdout)")
    parser.add_argument("--write", action="store_true", help=f"store the result in {SWEEPS}")
    args = parser.parse_args(argv)
    if args.write and args.names:
        parser.error("--write stores a whole sweep: name no classes")
    import transformers

    start = time.perf_counter()
    results = sweep(args.names or None, out=sys.stderr)
    found = counts(results)
    print(f"transformers {transformers.__version__}: " + ", ".join(f"{n} {s}" for s, n in found.items())
          + f" ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    record = {"transformers": transformers.__version__, "venv": Path(sys.prefix).name, "families": results}
    text = json.dumps(record, indent=1, sort_keys=True) + "\n"
    if args.json == "-":
        sys.stdout.write(text)
    elif args.json:
        Path(args.json).write_text(text)
    if args.write:
        SWEEPS.mkdir(exist_ok=True)
        record_path(transformers.__version__).write_text(text)
    return 1 if found[FAILED] else 0


if __name__ == "__main__":
    sys.exit(main())
