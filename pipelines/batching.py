"""Cutting a sequence into runs bounded by count and size: plan shards into work units, a
long file's segments into pieces."""

from __future__ import annotations


def work_units(sizes: list[int | None], max_rows: int, max_bytes: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive items, each of at most `max_rows` items and
    `max_bytes` of size (an unknown size counts as 0; an item larger than `max_bytes` is a unit
    alone)."""
    units, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        size = size or 0
        if i > start and (i - start >= max_rows or total + size > max_bytes):
            units.append((start, i))
            start, total = i, 0
        total += size
    if start < len(sizes):
        units.append((start, len(sizes)))
    return units
