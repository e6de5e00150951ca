"""The engine: a run's error memory (scoring, refits, stats) over storage Protocols."""

from .memory import ErrorMemory
from .scheduler import RefitScheduler

__all__ = ["ErrorMemory", "RefitScheduler"]
