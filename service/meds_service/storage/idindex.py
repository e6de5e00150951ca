"""An exact in-memory set of 64-bit rollout hashes with a value each, vectorised with numpy.

Open addressing with linear probing over two flat arrays (16 bytes a slot, at most half full), so that a
batch of thousands of ids is looked up or inserted in a few numpy operations. Hash 0 marks an empty slot.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

_MIN_CAPACITY = 1024


class IdIndex:
    """hash -> int64 value; lookups and inserts take whole arrays."""

    def __init__(self, capacity: int = _MIN_CAPACITY) -> None:
        size = _MIN_CAPACITY
        while size < 2 * capacity:
            size *= 2
        self._keys = np.zeros(size, dtype=np.uint64)
        self._values = np.zeros(size, dtype=np.int64)
        self._count = 0
        self._largest = 0  # the most hashes one insert added

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return int(self._keys.nbytes + self._values.nbytes)

    def lookup(self, hashes: NDArray[np.uint64]) -> NDArray[np.int64]:
        """Values of the given hashes, -1 where absent."""
        mask = np.uint64(len(self._keys) - 1)
        found = np.full(len(hashes), -1, dtype=np.int64)
        active = np.arange(len(hashes))
        slots = hashes & mask
        while len(active):
            stored = self._keys[slots]
            hit = stored == hashes[active]
            found[active[hit]] = self._values[slots[hit]]
            going = ~hit & (stored != 0)
            active, slots = active[going], (slots[going] + np.uint64(1)) & mask
        return found

    def insert(self, hashes: NDArray[np.uint64], values: NDArray[np.int64]) -> None:
        """Add hashes that are not present yet (and distinct among themselves)."""
        if self._count + len(hashes) > len(self._keys) // 2:
            self._grow(self._count + len(hashes))
        self._place(hashes, values)
        self._count += len(hashes)
        self._largest = max(self._largest, len(hashes))

    @property
    def capacity(self) -> int:
        """Slots of the table (it holds at most half as many hashes before it grows)."""
        return len(self._keys)

    def grow_ahead(self, inserts: int = 4) -> bool:
        """Double the table now if `inserts` more inserts as large as the largest so far would make it grow: a
        growth places every hash again (tens of ms at 10^5 hashes), which the owner runs between requests
        rather than inside the insert that crosses the bound. One doubling per call, so that one large insert
        does not reserve room for several more at once. Returns whether it grew."""
        if self._count + inserts * self._largest <= len(self._keys) // 2:
            return False
        self._grow(len(self._keys) // 2 + 1)
        return True

    def _place(self, hashes: NDArray[np.uint64], values: NDArray[np.int64]) -> None:
        mask = np.uint64(len(self._keys) - 1)
        pending = np.arange(len(hashes))
        slots = hashes & mask
        while len(pending):
            free = self._keys[slots] == 0
            # Of the pending hashes probing the same free slot, the first takes it; the rest probe on.
            candidates = np.flatnonzero(free)
            _, first = np.unique(slots[candidates], return_index=True)
            winners = candidates[first]
            self._keys[slots[winners]] = hashes[pending[winners]]
            self._values[slots[winners]] = values[pending[winners]]
            placed = np.zeros(len(pending), dtype=bool)
            placed[winners] = True
            moving = ~placed & ~free  # losers of a contested free slot retry it (now taken: they move on next)
            slots = np.where(moving, (slots + np.uint64(1)) & mask, slots)
            pending, slots = pending[~placed], slots[~placed]

    def _grow(self, needed: int) -> None:
        """Double the table until `needed` fit at most half full, and place every entry again in one pass."""
        keys, values = self._keys, self._values
        size = len(keys)
        while size < 2 * needed:
            size *= 2
        self._keys = np.zeros(size, dtype=np.uint64)
        self._values = np.zeros(size, dtype=np.int64)
        live = keys != 0
        self._rebuild(keys[live], values[live])

    def _rebuild(self, hashes: NDArray[np.uint64], values: NDArray[np.int64]) -> None:
        """Place distinct hashes into the empty table without probing: in order of home slot, each takes the
        first slot after the previous one's, or its home when that is further on. Every slot between a hash's
        home and its own is then taken, which is all linear probing asks. The few pushed past the end wrap
        around through `_place`."""
        home = (hashes & np.uint64(len(self._keys) - 1)).astype(np.int64)
        order = np.argsort(home, kind="stable")
        home, hashes, values = home[order], hashes[order], values[order]
        rank = np.arange(len(home), dtype=np.int64)
        slots = np.maximum.accumulate(home - rank) + rank if len(home) else home
        inside = slots < len(self._keys)
        self._keys[slots[inside]] = hashes[inside]
        self._values[slots[inside]] = values[inside]
        if not inside.all():
            self._place(hashes[~inside], values[~inside])
