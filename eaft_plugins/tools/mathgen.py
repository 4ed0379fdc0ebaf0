"""Offline default data: arithmetic word problems with worked answers, GSM8K style ("#### N").

Deterministic for a seed, so runs on a fresh clone need no download. Each item is
{"question", "answer", "final"} where answer ends with "#### <final>".
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Dict, List

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jade", "Kofi", "Lena", "Mo", "Nina"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "shells", "stamps", "cards", "beads"]


def _buy_more(r: random.Random) -> Dict[str, object]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    a, bags, per = r.randint(2, 40), r.randint(2, 9), r.randint(2, 12)
    more = bags * per
    return {
        "question": f"{name} has {a} {item}. {name} buys {bags} bags with {per} {item} in each bag. "
        f"How many {item} does {name} have now?",
        "answer": f"{name} buys {bags} * {per} = {more} {item}.\n{name} now has {a} + {more} = {a + more} {item}.\n#### {a + more}",
        "final": a + more,
    }


def _share(r: random.Random) -> Dict[str, object]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    friends, each, left = r.randint(2, 8), r.randint(2, 15), r.randint(0, 9)
    total = friends * each + left
    return {
        "question": f"{name} had {total} {item} and gave {each} to each of {friends} friends. "
        f"How many {item} does {name} have left?",
        "answer": f"{name} gave away {friends} * {each} = {friends * each} {item}.\n"
        f"{name} has {total} - {friends * each} = {left} {item} left.\n#### {left}",
        "final": left,
    }


def _price(r: random.Random) -> Dict[str, object]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, price, paid_extra = r.randint(2, 12), r.randint(2, 20), r.randint(1, 50)
    cost = n * price
    paid = cost + paid_extra
    return {
        "question": f"{name} buys {n} {item} at ${price} each and pays with ${paid}. How much change does {name} get?",
        "answer": f"The {item} cost {n} * {price} = ${cost}.\nThe change is {paid} - {cost} = ${paid_extra}.\n#### {paid_extra}",
        "final": paid_extra,
    }


def _week(r: random.Random) -> Dict[str, object]:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    per_day, days, lost = r.randint(2, 15), r.randint(3, 7), r.randint(1, 9)
    made = per_day * days
    return {
        "question": f"{name} collects {per_day} {item} every day for {days} days, then loses {lost} of them. "
        f"How many {item} does {name} have?",
        "answer": f"{name} collects {per_day} * {days} = {made} {item}.\nAfter losing {lost}, {name} has {made} - {lost} = {made - lost} {item}.\n#### {made - lost}",
        "final": made - lost,
    }


TEMPLATES = (_buy_more, _share, _price, _week)


def generate(n: int, seed: int = 0) -> List[Dict[str, object]]:
    r = random.Random(seed)
    return [r.choice(TEMPLATES)(r) for _ in range(n)]


def final_answer(text: str):
    """The number after the last '####' (or the last number in the text), as a string, or None."""
    import re

    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", tail)
    return nums[-1].replace(",", "") if nums else None


def write_alpaca(items, path: "str | Path") -> Path:
    """LLaMA-Factory alpaca format: instruction / input / output."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": it["question"], "input": "", "output": it["answer"]} for it in items]
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_messages(items, path: "str | Path") -> Path:
    """ms-swift messages format, one JSON object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for it in items:
            msgs = [{"role": "user", "content": it["question"]}, {"role": "assistant", "content": it["answer"]}]
            fh.write(json.dumps({"messages": msgs}) + "\n")
    return path
