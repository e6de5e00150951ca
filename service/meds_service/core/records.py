"""Small records the stores return besides the core types."""

from __future__ import annotations

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


class KeyHead(NamedTuple):
    """A key's counters: live sequence numbers start..n, last fit covering fit_start..fitted_upto."""

    start: int
    n: int
    fit_start: int
    fitted_upto: int

    @property
    def live(self) -> int:
        """How many vectors the key holds."""
        return self.n - self.start

    @property
    def stale(self) -> bool:
        """Whether the key holds vectors its last fit does not cover exactly."""
        return self.n > 0 and (self.fit_start, self.fitted_upto) != (self.start, self.n)
