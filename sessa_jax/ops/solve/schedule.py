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

Since T is static, the outer levels of the recursion can also run as a static program: with
``static_span`` H (a power of two), the blocks j that are multiples of H (the largest ones)
are left out of the loop's branch table and pushed between the loops with Python-int
offsets (``visit_static``), and the leaves run as ceil(n / H) loops of H leaves (``segments``)
whose blocks never leave their segment. With static offsets the compiler reads the tiles in
place and knows every shape; the loops keep the program small.
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


# The default static program (``auto_static_span``): the wide blocks pushed statically while
# they are at most STATIC_TILES tiles and the leaves at most STATIC_SEGMENTS loops; beyond
# that (long T) the all-loop schedule, so that the program's size stays bounded in T.
STATIC_TILES = 8
STATIC_SEGMENTS = 8


def auto_static_span(num_leaves: int, tile_leaves: int) -> int | None:
    """The default ``static_span``: the smallest power of two >= ``tile_leaves``, which makes
    every wide block static and leaves every narrow one in the loops, when that makes at most
    STATIC_TILES static tiles and STATIC_SEGMENTS loops; None (all in the loop) otherwise, or
    when there are no wide blocks. A fully static schedule (span 1) compiles much slower."""
    if num_leaves <= tile_leaves:
        return None
    span = 1 << (tile_leaves - 1).bit_length()  # wide blocks: lowbit(j) >= tile_leaves, a power of two
    static_tiles = sum(
        (min(lowbit(j), num_leaves - j) // tile_leaves) * (lowbit(j) // tile_leaves)
        for j in range(span, num_leaves, span)
    )
    if static_tiles > STATIC_TILES or -(-num_leaves // span) > STATIC_SEGMENTS:
        return None
    return span


def _wide(j: int, num_leaves: int, tile_leaves: int) -> bool:
    """Whether block j is walked in tiles (at least a tile wide, and n exceeds one tile)."""
    return num_leaves > tile_leaves and lowbit(j) >= tile_leaves


def padded_leaves(num_leaves: int, tile_leaves: int) -> int:
    """Leaf count after padding: a multiple of ``tile_leaves`` when it exceeds it."""
    if num_leaves <= tile_leaves:
        return num_leaves
    return -(-num_leaves // tile_leaves) * tile_leaves


@dataclasses.dataclass(frozen=True)
class PushSchedule:
    """Static push plan for n leaves.

    ``shapes``: the distinct (row_leaves, key_leaves) shapes of the narrow blocks pushed in
    the loops (one switch branch each); ``tile_leaves``: the tile of the wide blocks.
    ``branch``: int32 (n + 1,), entry j = 0 where the loop pushes nothing (j = 0, j = n and
    the static blocks), 1 + index into ``shapes`` for a narrow block, and 1 + len(shapes) for
    a wide one. ``static_span``: H, the blocks j with j % H == 0 are pushed statically
    (``visit_static``) between the loops over ``segments``; num_leaves or more: none.
    """

    num_leaves: int
    tile_leaves: int
    shapes: tuple[tuple[int, int], ...]
    branch: np.ndarray
    static_span: int = 0

    @classmethod
    def make(cls, num_leaves: int, tile_leaves: int | None = None, static_span: int | None = None) -> "PushSchedule":
        """``static_span``: None (every block in the loop) or a power of two H >= 1: the blocks
        j % H == 0 become static pushes (H = 1: the whole schedule is static)."""
        if num_leaves < 1:
            raise ValueError(f"the recursive solve needs at least one leaf; got num_leaves={num_leaves}")
        tile_leaves = num_leaves if tile_leaves is None else tile_leaves
        if num_leaves > tile_leaves and (tile_leaves < 1 or tile_leaves & (tile_leaves - 1)):
            # a wide block (lowbit(j) leaves, a power of two) must be whole tiles, or some pairs are never pushed
            raise ValueError(
                f"tile_leaves must be a power of two >= 1 when num_leaves={num_leaves} exceeds it; got {tile_leaves}"
            )
        if num_leaves > tile_leaves and num_leaves % tile_leaves:
            raise ValueError(
                f"num_leaves={num_leaves} must be a multiple of tile_leaves={tile_leaves} when larger; "
                f"pad it with padded_leaves()"
            )
        span = num_leaves if static_span is None else static_span
        if span < 1 or (span & (span - 1) and span < num_leaves):
            raise ValueError(f"static_span must be a power of two >= 1 (or None); got {static_span}")
        span = min(span, num_leaves)
        shapes: list[tuple[int, int]] = []
        loop_blocks = [j for j in range(1, num_leaves) if j % span]
        for j in loop_blocks:
            if not _wide(j, num_leaves, tile_leaves):
                shape = block_shape(j, num_leaves)
                if shape not in shapes:
                    shapes.append(shape)
        branch = np.zeros(num_leaves + 1, np.int32)
        for j in loop_blocks:
            wide = _wide(j, num_leaves, tile_leaves)
            branch[j] = 1 + len(shapes) if wide else 1 + shapes.index(block_shape(j, num_leaves))
        return cls(num_leaves, tile_leaves, tuple(shapes), branch, span)

    @property
    def has_wide(self) -> bool:
        return bool(np.any(self.branch == 1 + len(self.shapes)))

    @property
    def static_blocks(self) -> tuple[int, ...]:
        """The blocks j pushed with static offsets: 0 < j < n, j a multiple of ``static_span``."""
        return tuple(range(self.static_span, self.num_leaves, self.static_span))

    @property
    def looped(self) -> bool:
        """Whether any leaves run in a loop: False for a fully static program (every segment one
        leaf), where every push's rows and keys are Python integers."""
        return any(count > 1 for _, count in self.segments())

    def segments(self) -> list[tuple[int, int]]:
        """(first leaf, leaf count) of each loop: runs of ``static_span`` leaves, the last one
        shorter where n is not a multiple. Every block of ``branch`` lies inside one segment."""
        h = self.static_span
        return [(a, min(h, self.num_leaves - a)) for a in range(0, self.num_leaves, h)]

    def block_tiles(self, j: int):
        """(j, row_start, rows, key_start, keys) in leaves of the tiles of block j, in order."""
        rows, keys = block_shape(j, self.num_leaves)
        if not _wide(j, self.num_leaves, self.tile_leaves):
            yield j, j, rows, j - keys, keys
            return
        t = self.tile_leaves
        for a in range(rows // t):
            for b in range(keys // t):
                yield j, j + a * t, t, j - keys + b * t, t

    def tiles(self):
        """(j, row_start, rows, key_start, keys) in leaves of every tile visited (loops and
        static pushes alike), in order of j."""
        for j in range(1, self.num_leaves):
            yield from self.block_tiles(j)

    def visit_static(self, j: int, carry, leaf: int, tile_fn, barrier=None):
        """Applies block j (a Python int, one of ``static_blocks``) with static token offsets:
        ``tile_fn(carry, row0, rows, key0, keys)`` for each of its tiles. ``barrier(carry)``,
        if given, runs before every tile: the caller's optimization barrier, which makes each
        tile wait for what came before it, so that the compiler does not compute independent
        tiles side by side (their logits tiles would all be live at once)."""
        for _, r0, rows, k0, keys in self.block_tiles(j):
            if barrier is not None:
                carry = barrier(carry)
            carry = tile_fn(carry, r0 * leaf, rows * leaf, k0 * leaf, keys * leaf)
        return carry

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
                return lax.fori_loop(
                    0,
                    span // t,
                    lambda b, c: tile_fn(c, (j + a * t) * leaf, t * leaf, (j - span + b * t) * leaf, t * leaf),
                    c,
                )

            return lax.fori_loop(0, row_tiles, row_step, c)

        branches = [lambda j, c: c] + [narrow(sh) for sh in self.shapes]
        if self.has_wide:
            branches.append(wide)
        return lax.switch(branch, branches, j, carry)
