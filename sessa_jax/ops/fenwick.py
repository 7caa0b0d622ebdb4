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

Blocks narrower than a tile (``tile_leaves`` leaves) come in few distinct shapes, one
``lax.switch`` branch each. Wider blocks share one branch that walks them in tiles of
tile x tile leaves with loops whose trip counts are computed from j; for that, n is a
multiple of ``tile_leaves`` whenever it exceeds it (the caller pads). So the program has at
most log2(tile_leaves) + 2 branches whatever T is, and every tile is a large matrix product.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jax import lax


def lowbit(j: int) -> int:
    """Largest power of two dividing j (j >= 1)."""
    return j & -j


def block_shape(j: int, num_leaves: int) -> tuple[int, int]:
    """(row leaves, key leaves) of block j among ``num_leaves`` leaves."""
    h = lowbit(j)
    return min(h, num_leaves - j), h


def padded_leaves(num_leaves: int, tile_leaves: int) -> int:
    """Leaf count after padding: a multiple of ``tile_leaves`` when it exceeds it."""
    if num_leaves <= tile_leaves:
        return num_leaves
    return -(-num_leaves // tile_leaves) * tile_leaves


@dataclasses.dataclass(frozen=True)
class PushSchedule:
    """Static push plan for n leaves.

    ``shapes``: the distinct (row_leaves, key_leaves) shapes of the narrow blocks (one switch
    branch each); ``tile_leaves``: the tile of the wide blocks. ``branch``: int32 (n + 1,),
    entry j = 0 where there is no block (j = 0 and j = n), 1 + index into ``shapes`` for a
    narrow block, and 1 + len(shapes) for a wide one.
    """

    num_leaves: int
    tile_leaves: int
    shapes: tuple[tuple[int, int], ...]
    branch: np.ndarray

    @classmethod
    def make(cls, num_leaves: int, tile_leaves: int | None = None) -> "PushSchedule":
        if num_leaves < 1:
            raise ValueError(f"the recursive solve needs at least one leaf; got num_leaves={num_leaves}")
        tile_leaves = num_leaves if tile_leaves is None else tile_leaves
        if num_leaves > tile_leaves and num_leaves % tile_leaves:
            raise ValueError(
                f"num_leaves={num_leaves} must be a multiple of tile_leaves={tile_leaves} when larger; "
                f"pad it with padded_leaves()"
            )
        shapes: list[tuple[int, int]] = []
        wide = []
        for j in range(1, num_leaves):
            if num_leaves > tile_leaves and lowbit(j) >= tile_leaves:
                wide.append(j)
                continue
            shape = block_shape(j, num_leaves)
            if shape not in shapes:
                shapes.append(shape)
        branch = np.zeros(num_leaves + 1, np.int32)
        for j in range(1, num_leaves):
            branch[j] = 1 + len(shapes) if j in wide else 1 + shapes.index(block_shape(j, num_leaves))
        return cls(num_leaves, tile_leaves, tuple(shapes), branch)

    @property
    def has_wide(self) -> bool:
        return bool(np.any(self.branch == 1 + len(self.shapes)))

    def tiles(self):
        """(j, row_start, rows, key_start, keys) in leaves of every tile visited, in order."""
        for j in range(1, self.num_leaves):
            rows, keys = block_shape(j, self.num_leaves)
            if self.branch[j] <= len(self.shapes):
                yield j, j, rows, j - keys, keys
                continue
            t = self.tile_leaves
            for a in range(rows // t):
                for b in range(keys // t):
                    yield j, j + a * t, t, j - keys + b * t, t

    def visit(self, branch, j, carry, leaf: int, tile_fn):
        """Applies block j to ``carry`` inside a traced loop (``branch`` = self.branch[j]).

        ``tile_fn(carry, row0, rows, key0, keys)`` gets token offsets (traced) and static
        sizes; every key of a tile precedes every row.
        """
        def narrow(shape):
            rows_l, keys_l = shape
            return lambda j, c: tile_fn(c, j * leaf, rows_l * leaf, (j - keys_l) * leaf, keys_l * leaf)

        def wide(j, c):
            t = self.tile_leaves
            span = j & -j
            row_tiles = lax.min(span, self.num_leaves - j) // t

            def row_step(a, c):
                return lax.fori_loop(0, span // t, lambda b, c: tile_fn(
                    c, (j + a * t) * leaf, t * leaf, (j - span + b * t) * leaf, t * leaf), c)

            return lax.fori_loop(0, row_tiles, row_step, c)

        branches = [lambda j, c: c] + [narrow(sh) for sh in self.shapes]
        if self.has_wide:
            branches.append(wide)
        return lax.switch(branch, branches, j, carry)
