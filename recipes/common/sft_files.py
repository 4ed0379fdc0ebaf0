"""The two training files every prompt/response data builder writes: LLaMA-Factory alpaca JSON and ms-swift
messages JSONL (recipes/<domain>/data/dataset_info.json registers the first, the swift launchers read the second)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List


def write_outputs(rows: List[dict], out_dir: Path, name: str) -> Dict[str, Path]:
    """rows of {"prompt", "response"} -> out_dir/NAME.json (instruction/input/output) and NAME.jsonl (messages)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lf, sw = out_dir / f"{name}.json", out_dir / f"{name}.jsonl"
    lf.write_text(json.dumps([{"instruction": r["prompt"], "input": "", "output": r["response"]} for r in rows],
                             ensure_ascii=False, indent=1))
    with sw.open("w") as fh:
        for r in rows:
            msgs = [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}]
            fh.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return {"llamafactory": lf, "swift": sw}
