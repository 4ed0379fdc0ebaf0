"""Adding `eaft_*` fields to a framework's argument dataclass in place (ms-swift SftArguments, TRL SFTConfig).

In place, not by subclassing: the frameworks' parsers and subclasses (PretrainArguments,
RLHFArguments, ...) name the class itself, so it must gain the fields before they are created.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional


def add_fields(cls, new: Dict[str, tuple], prepare: Optional[Callable[[type, dict, dict], None]] = None) -> bool:
    """Add `new` ({name: (type, help[, default])}, default None) to dataclass `cls`; False if all are there.

    `prepare(cls, annotations, own_fields)` may edit the class's own annotations before it is re-processed.
    """
    have = {f.name for f in dataclasses.fields(cls)}
    if all(name in have for name in new):
        return False
    annotations = dict(cls.__dict__.get("__annotations__", {}))
    own_fields = cls.__dict__["__dataclass_fields__"]
    # Re-processing rebuilds the fields from the class attributes, which hold plain defaults by now: put
    # the original Field objects back so help texts, choices and default factories survive.
    for name in annotations:
        f = own_fields.get(name)
        if f is not None and f._field_type is dataclasses._FIELD:
            setattr(cls, name, f)
    if prepare is not None:
        prepare(cls, annotations, own_fields)
    for name, (tp, help_text, *default) in new.items():
        annotations[name] = tp
        setattr(cls, name, dataclasses.field(default=default[0] if default else None, metadata={"help": help_text}))
    cls.__annotations__ = annotations
    # dataclass() never overwrites a method already in the class dict: drop the generated ones.
    for name in ("__init__", "__repr__", "__eq__", "__match_args__"):
        member = cls.__dict__.get(name)
        if member is not None and (name == "__match_args__" or _is_generated(member)):
            delattr(cls, name)
    dataclasses.dataclass(cls)
    return True


def _is_generated(member) -> bool:
    code = getattr(member, "__code__", None)
    return code is not None and (code.co_filename == "<string>" or code.co_filename.endswith("dataclasses.py"))
