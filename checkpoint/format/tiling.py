"""Do a tensor's chunks tile it exactly once? (pure; used to validate every manifest)

A chunk is a box: `offsets` and `shape` in the global tensor. Chunks tile the tensor when
each lies inside it, no two share an element, and their element counts add up to the
tensor's: without overlap, the count leaves no room for a gap. Overlap is found with a
sweep along the dimension the chunks split most (sorted by start, only chunks still open
at a start are compared), so row-, column- and grid-sharded tensors cost a sort and a few
comparisons per chunk, not the n² of comparing every pair nor a bitmap of every element.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, shape)


def tiling_problem(shape: tuple[int, ...], boxes: Sequence[Box]) -> str | None:
    """Why `boxes` do not tile a tensor of `shape` exactly once, or None when they do."""
    for i, (offsets, size) in enumerate(boxes):
        inside = len(offsets) == len(size) == len(shape) and all(
            0 <= o and 0 <= n and o + n <= d for o, n, d in zip(offsets, size, shape)
        )
        if not inside:
            return f"chunk {i} (offsets {offsets}, shape {size}) lies outside the tensor shape {shape}"
    clash = _first_overlap(boxes)
    if clash is not None:
        a, b = clash
        return (f"chunks {a} and {b} overlap (offsets {boxes[a][0]}, shape {boxes[a][1]} and "
                f"offsets {boxes[b][0]}, shape {boxes[b][1]})")
    covered, total = sum(math.prod(size) for _, size in boxes), math.prod(shape)
    if covered != total:
        return f"the chunks cover {covered} of {total} elements"
    return None


def _first_overlap(boxes: Sequence[Box]) -> tuple[int, int] | None:
    """Indices of two boxes that share an element, or None. Empty boxes share nothing."""
    full = [i for i, (_, size) in enumerate(boxes) if all(size)]
    if not full:
        return None
    ndim = len(boxes[full[0]][0])
    if ndim == 0:  # scalars: any two chunks are the same element
        return (full[0], full[1]) if len(full) > 1 else None
    axis = max(range(ndim), key=lambda d: len({boxes[i][0][d] for i in full}))
    open_: list[int] = []
    for i in sorted(full, key=lambda i: boxes[i][0][axis]):
        start = boxes[i][0][axis]
        open_ = [j for j in open_ if boxes[j][0][axis] + boxes[j][1][axis] > start]
        for j in open_:
            if _intersect(boxes[i], boxes[j]):
                return (min(i, j), max(i, j))
        open_.append(i)
    return None


def _intersect(a: Box, b: Box) -> bool:
    return all(ao < bo + bn and bo < ao + an for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1]))
