"""`evalscope eval` with two checks the recipes need (run_eval.sh calls this instead of `evalscope`):

* the installed EvalScope / bfcl-eval are within the pins of recipes/eval/requirements.txt;
* --thinking: the server keeps a thinking model's reasoning apart from its answer. EvalScope scores
  `output.completion`, the message's text without its `reasoning_content`; its multiple-choice
  adapters (MedMCQA, MedQA, MMLU, CLUEWSC) read that completion directly, never the filtered text, so
  the separation must happen at the server: run_eval.sh serves thinking models with vLLM's
  `--reasoning-parser deepseek_r1` (everything before the first `</think>` is reasoning, with or
  without an opening tag; no `</think>` = no answer). One short request checks it before the run.

  python recipes/eval/evalscope_run.py [--thinking] eval --model ... --api-url ... --datasets ... [--dataset-args JSON]
"""

from __future__ import annotations

import json
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Dict, List

REQUIREMENTS = Path(__file__).with_name("requirements.txt")


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


REASONING_FIELDS = ("reasoning_content", "reasoning")  # vLLM's name, before and after v0.11


def check_reasoning_separated(api_url: str, model: str, api_key: str = "EMPTY", timeout: float = 600) -> None:
    """SystemExit unless the server returns a thinking model's reasoning in its own field: without
    that, EvalScope would score the reasoning chain (an early "ANSWER: A" beats the final "ANSWER: B")."""
    import urllib.request

    body = {"model": model, "messages": [{"role": "user", "content": "What is 1 + 1?"}], "max_tokens": 16}
    req = urllib.request.Request(api_url.rstrip("/") + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        message = json.loads(resp.read())["choices"][0]["message"]
    if not any(message.get(f) for f in REASONING_FIELDS):
        raise SystemExit(f"{api_url} returned the thinking model's reasoning inside the answer (no "
                         f"{' / '.join(REASONING_FIELDS)} field): serve it with `vllm serve ... --reasoning-parser "
                         "deepseek_r1` (recipes/eval/run_eval.sh does), or EvalScope scores the reasoning")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    thinking = "--thinking" in argv[:1]
    args = argv[1:] if thinking else argv
    if not args or args[0] != "eval":
        print(__doc__, file=sys.stderr)
        return 2
    check_versions(_option(args, "--datasets"))
    if thinking:
        check_reasoning_separated(_option(args, "--api-url")[0], _option(args, "--model")[0],
                                  (_option(args, "--api-key") or ["EMPTY"])[0])
    from evalscope.cli.cli import run_cmd

    sys.argv = ["evalscope", *args]
    run_cmd()
    return 0


if __name__ == "__main__":
    sys.exit(main())
