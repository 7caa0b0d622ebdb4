"""Array sizes read off HLO text (compiled programs' ``as_text()``): shared by the benchmarks."""

from __future__ import annotations

import re

BYTES = {"f64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "s8": 1, "u8": 1, "pred": 1,
         "s64": 8, "u64": 8, "s16": 2, "u16": 2, "f8e4m3fn": 1, "f8e5m2": 1}
ARRAY = re.compile(r"\b(" + "|".join(BYTES) + r")\[([0-9,]*)\]")


def _size(match) -> int:
    n = BYTES[match.group(1)]
    for d in match.group(2).split(","):
        n *= int(d) if d else 1
    return n


def nbytes(type_text: str) -> int:
    """Bytes of every array named in an HLO type (tuples summed)."""
    return sum(_size(m) for m in ARRAY.finditer(type_text))


def dims(type_text: str) -> list[int]:
    """Dimensions of the first array named in an HLO type ([] if none)."""
    m = ARRAY.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def largest_array(hlo_text: str) -> tuple[int, str]:
    """(bytes, shape) of the largest array named in HLO text."""
    return max(((_size(m), m.group(0)) for m in ARRAY.finditer(hlo_text)), default=(0, ""))
