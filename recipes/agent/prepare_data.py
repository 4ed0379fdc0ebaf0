"""Tool-use SFT data for the agent recipe, in LLaMA-Factory and ms-swift formats.

The paper does not name its agent training set (it evaluates on BFCL v3). We use
llamafactory/glaive_toolcall_en (Glaive function-calling v2, converted by LLaMA-Factory to its
sharegpt tool format, Apache-2.0): public, multi-turn with real tool results, and already in the
format LLaMA-Factory's qwen3 templates render with Qwen's native <tool_call> syntax. BFCL itself
must not be trained on. Salesforce/xlam-function-calling-60k is closer to BFCL's single-turn
categories but gated; ms-swift registers it as `Salesforce/xlam-function-calling-60k`.

LLaMA-Factory reads the Hub dataset directly (recipes/agent/data/dataset_info.json). ms-swift needs
its own roles, so this script converts each conversation:
  human -> user, gpt -> assistant, function_call -> tool_call, observation -> tool_response,
  tools (JSON string) -> tools
Outputs are named after their source and limit: the Hub set -> glaive_toolcall_en.{json,jsonl} (what
the recipes train on); --input PATH -> PATH's stem (the demo file -> glaive_toolcall_en_demo.*);
--limit N adds _first<N> (a part of the set never takes the training name).
  python recipes/agent/prepare_data.py                               # Hub -> recipes/agent/data/generated/
  python recipes/agent/prepare_data.py --input ../shared/data/toolcall/glaive_toolcall_en_demo.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List

NAME = "glaive_toolcall_en"  # the Hub set, and the file the recipes train on
HUB = ("llamafactory/glaive_toolcall_en", "train")
ROLES = {"human": "user", "gpt": "assistant", "function_call": "tool_call", "observation": "tool_response", "system": "system"}


def to_swift(row: dict) -> dict:
    msgs = []
    for turn in row["conversations"]:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"unknown sharegpt role {turn['from']!r}; known: {sorted(ROLES)}")
        msgs.append({"role": role, "content": turn["value"]})
    out = {"messages": msgs}
    tools = row.get("tools")
    if tools:
        out["tools"] = tools if isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)
    return out


def load(input_path: "Path | None") -> List[dict]:
    """The Hub split, or a local file shaped like it (a JSON list of {conversations, tools}) read
    through the same loader."""
    from datasets import load_dataset

    if input_path is not None:
        return list(load_dataset("json", data_files=str(input_path), split="train"))
    hub_id, split = HUB
    return list(load_dataset(hub_id, split=split))


def output_name(input_path: "Path | None", limit: "int | None" = None) -> str:
    name = NAME if input_path is None else Path(input_path).stem
    return name if limit is None else f"{name}_first{limit}"


def write_outputs(rows: List[dict], out_dir: Path, name: str) -> Dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    lf, sw = out_dir / f"{name}.json", out_dir / f"{name}.jsonl"
    lf.write_text(json.dumps([{"conversations": r["conversations"], "tools": r.get("tools", "")} for r in rows],
                             ensure_ascii=False, indent=1))
    with sw.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(to_swift(r), ensure_ascii=False) + "\n")
    return {"llamafactory": lf, "swift": sw}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", type=Path, default=None, help="local LLaMA-Factory sharegpt tool JSON (default: the Hub set)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--out-dir", type=Path, default=Path("recipes/agent/data/generated"))
    ap.add_argument("--name", default=None, help="output file name (default: after the source and limit)")
    args = ap.parse_args(argv)
    rows = load(args.input)[: args.limit]
    paths = write_outputs(rows, args.out_dir, args.name or output_name(args.input, args.limit))
    print(f"{len(rows)} conversations -> {paths['llamafactory']} , {paths['swift']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
