"""Ghost batch norm: a batch normalized in virtual batches along dim 0, each with its own
statistics."""

from __future__ import annotations

__all__ = ["ghost_splits"]


def ghost_splits(start: int, rows: int, size: int) -> list[tuple[int, int, bool]]:
    """How ``rows`` rows that begin at row ``start`` of a batch fall into virtual batches of
    ``size``: (offset in these rows, length, whether it begins a virtual batch), in order."""
    out = []
    offset = 0
    while offset < rows:
        fill = (start + offset) % size
        take = min(size - fill, rows - offset)
        out.append((offset, take, fill == 0))
        offset += take
    return out
