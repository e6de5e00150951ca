"""Small records at the seams between the engine and the stores, besides the core types.

`KeyHead` is the one model of a memory key's counters: the engine's cache and the SQLite catalog extend it,
and the stores answer with it; the rules "a newer fit wins" and "a key is stale" live here and nowhere else
in Python (the Redis store repeats them inside its Lua scripts, which must decide atomically).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..core.config import RunConfig


class RunRecord(NamedTuple):
    name: str
    config: RunConfig
    created_at: float


class RunCounts(NamedTuple):
    keys: int
    vectors: int
    rollouts: int


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """Where a store lives: enough for another process (a refit worker) to open its own view of it.

    `backend` names an entry of the store registry (`storage.open_store`); `location` is what that backend
    needs to find the data: the data folder of `sqlite`, the URL of `redis` and `redis-cluster`.
    """

    backend: str
    location: str


@dataclass(slots=True)
class KeyHead:
    """A key's counters: live sequence numbers start..n; the last fit covers fit_start..fitted_upto."""

    start: int = 0
    n: int = 0
    fit_start: int = 0
    fitted_upto: int = 0

    @property
    def live(self) -> int:
        """How many vectors the key holds."""
        return self.n - self.start

    @property
    def stale(self) -> bool:
        """Whether the key holds vectors its last fit does not cover exactly (it is pending a refit)."""
        return self.n > 0 and (self.fit_start != self.start or self.fitted_upto != self.n)

    @property
    def has_fit(self) -> bool:
        """Whether the last fit still covers some live vector."""
        return self.fitted_upto > max(self.fit_start, self.start)

    def admits(self, fit_start: int, fitted_upto: int) -> bool:
        """A newer fit wins: one that covers no fewer vectors at either end than the fit held."""
        return fitted_upto >= self.fitted_upto and fit_start >= self.fit_start

    def same_fit(self, other: KeyHead) -> bool:
        return (self.fit_start, self.fitted_upto) == (other.fit_start, other.fitted_upto)
