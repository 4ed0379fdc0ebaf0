"""add_fields: the in-place dataclass extension used for ms-swift's SftArguments and TRL's SFTConfig."""

import dataclasses
from typing import List, Optional

from eaft_plugins.integrations.fields import add_fields


def test_fields_are_added_and_the_class_keeps_its_own():
    @dataclasses.dataclass
    class Args:
        x: int = dataclasses.field(default=1, metadata={"help": "x help"})
        ys: List[int] = dataclasses.field(default_factory=lambda: [1, 2])  # re-processing used to break this

        def __post_init__(self):
            self.seen = True

    assert add_fields(Args, {"eaft_topk": (Optional[str], "top-K help")}) is True
    assert add_fields(Args, {"eaft_topk": (Optional[str], "top-K help")}) is False  # once
    fields = {f.name: f for f in dataclasses.fields(Args)}
    assert fields["x"].metadata["help"] == "x help" and fields["eaft_topk"].metadata["help"] == "top-K help"
    a, b = Args(eaft_topk="7"), Args()
    assert (a.x, a.eaft_topk, a.seen, b.eaft_topk) == (1, "7", True, None)
    a.ys.append(3)
    assert b.ys == [1, 2]  # still a fresh list per instance
