from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorRange:
    name: str
    offset: int
    length: int
    itemsize: int

def tensor_ranges(data: bytes | memoryview, fmt: str) -> list[TensorRange]:
    return []
