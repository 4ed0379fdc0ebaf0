"""`evalscope eval` with two checks the recipes need (run_eval.sh calls this instead of `evalscope`):

* the installed EvalScope / bfcl-eval are within the pins of recipes/eval/requirements.txt;
* --thinking: every dataset's predictions are cut to the answer after `</think>` before scoring.
  A Thinking-2507 chat template opens `<think>` in the prompt, so the output has no opening tag and
  EvalScope's own `<think>...</think>` stripping does not fire: PubMedQA would find yes/no/maybe
  anywhere in the reasoning and IFEval would check the reasoning's format. The server returns raw
  text (no vLLM reasoning parser), so this filter is the one place the rule lives.

  python recipes/eval/evalscope_run.py [--thinking] eval --model ... --datasets ... [--dataset-args JSON]
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
THINK_END = "</think>"
FILTER_NAME = "eaft_answer_after_think"


def answer_after_think(text: str) -> str:
    """The answer after the (first) `</think>`, with or without an opening tag. No `</think>` means the
    reasoning never finished: there is no answer (as vLLM's deepseek_r1 parser leaves no content)."""
    _, end, answer = (text or "").partition(THINK_END)
    return answer.strip() if end else ""


def with_think_filter(dataset_args: Dict, datasets: List[str]) -> Dict:
    """dataset_args with the answer filter first in every dataset's filters."""
    out = json.loads(json.dumps(dataset_args))
    for ds in datasets:
        args = out.setdefault(ds, {})
        args["filters"] = {FILTER_NAME: None, **(args.get("filters") or {})}
    return out


def pins() -> Dict[str, str]:
    """{distribution: specifier} from requirements.txt (unpinned lines are left out)."""
    out = {}
    for line in REQUIREMENTS.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*([<>=!~].*)$", line.split("#")[0].strip())
        if m:
            out[m.group(1).lower()] = m.group(3).replace(" ", "")
    return out


def check_versions(datasets: List[str], version=metadata.version) -> None:
    """SystemExit with the pin when an installed version is outside it (bfcl-eval only for BFCL)."""
    from packaging.specifiers import SpecifierSet

    for dist, spec in pins().items():
        if dist == "bfcl-eval" and not any(d.startswith("bfcl") for d in datasets):
            continue
        try:
            got = version(dist)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{dist} is not installed: pip install -r {REQUIREMENTS}")
        if got not in SpecifierSet(spec):
            raise SystemExit(f"{dist} {got} is outside {spec} (recipes/eval/requirements.txt says why): "
                             f"pip install -r {REQUIREMENTS}")


def _option(args: List[str], flag: str) -> List[str]:
    """The values after `flag` up to the next --option."""
    if flag not in args:
        return []
    i = args.index(flag) + 1
    vals = []
    while i < len(args) and not args[i].startswith("--"):
        vals.append(args[i])
        i += 1
    return vals


def evalscope_argv(args: List[str], thinking: bool) -> List[str]:
    """The evalscope arguments, with the answer filter added to --dataset-args for a thinking model."""
    if not thinking:
        return list(args)
    datasets = _option(args, "--datasets")
    given = _option(args, "--dataset-args")
    dataset_args = with_think_filter(json.loads(given[0]) if given else {}, datasets)
    out = list(args)
    if given:
        i = out.index("--dataset-args")
        del out[i:i + 2]
    return out + ["--dataset-args", json.dumps(dataset_args, ensure_ascii=False)]


def register_filter() -> None:
    from evalscope.api.filter import Filter
    from evalscope.api.registry import FILTER_REGISTRY, register_filter as register

    if FILTER_NAME in FILTER_REGISTRY:
        return

    @register(FILTER_NAME)
    class AnswerAfterThink(Filter):
        def apply(self, instance):
            return [answer_after_think(r) for r in instance]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    thinking = "--thinking" in argv[:1]
    args = argv[1:] if thinking else argv
    if not args or args[0] != "eval":
        print(__doc__, file=sys.stderr)
        return 2
    check_versions(_option(args, "--datasets"))
    register_filter()
    from evalscope.cli.cli import run_cmd

    sys.argv = ["evalscope", *evalscope_argv(args, thinking)]
    run_cmd()
    return 0


if __name__ == "__main__":
    sys.exit(main())
