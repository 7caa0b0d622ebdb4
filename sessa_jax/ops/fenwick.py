"""The push schedule of the recursive feedback solve: which off-diagonal blocks, in what order.

Time is cut into n leaves of Cs rows. The strictly lower part of the leaf-block matrix is
covered by one power-of-two block per j = 1 .. n-1 (Fenwick order, which is the
divide-and-conquer recursion written as a loop):
    keys  K_j = leaves [j - lowbit(j), j)
    rows  R_j = leaves [j, min(j + lowbit(j), n))
Every leaf pair (row r, key k < r) lies in exactly one block: j is r with its bits below the
highest bit where r and k differ cleared. The forward pushes block j right after solving leaf
j - 1 (all its keys are solved, none of its rows is); the backward pushes it right after
solving leaf j in the reverse sweep (all its rows are solved, none of its keys is).

Blocks come in few distinct (row leaves, key leaves) shapes: one per power of two below n,
plus the clipped ones along n's binary digits. Each shape is one branch of a ``lax.switch``
inside a single loop, so the program size grows with log n, not n.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def lowbit(j: int) -> int:
    """Largest power of two dividing j (j >= 1)."""
    return j & -j


@dataclasses.dataclass(frozen=True)
class PushSchedule:
    """Static push plan for n leaves.

    ``shapes``: the distinct (row_leaves, key_leaves) block shapes, in order of first use.
    ``branch``: int32 (n + 1,), entry j = index into ``shapes`` of block j, or -1 where there
    is no block (j = 0 and j = n).
    """

    num_leaves: int
    shapes: tuple[tuple[int, int], ...]
    branch: np.ndarray

    @classmethod
    def make(cls, num_leaves: int) -> "PushSchedule":
        if num_leaves < 1:
            raise ValueError(f"the recursive solve needs at least one leaf; got num_leaves={num_leaves}")
        shapes: list[tuple[int, int]] = []
        branch = np.full(num_leaves + 1, -1, np.int32)
        for j in range(1, num_leaves):
            shape = block_shape(j, num_leaves)
            if shape not in shapes:
                shapes.append(shape)
            branch[j] = shapes.index(shape)
        return cls(num_leaves, tuple(shapes), branch)

    def blocks(self):
        """(j, row_start, row_leaves, key_start, key_leaves) in leaves, for j = 1 .. n-1."""
        for j in range(1, self.num_leaves):
            rows, keys = self.shapes[self.branch[j]]
            yield j, j, rows, j - keys, keys


def block_shape(j: int, num_leaves: int) -> tuple[int, int]:
    """(row leaves, key leaves) of block j among ``num_leaves`` leaves."""
    h = lowbit(j)
    return min(h, num_leaves - j), h
