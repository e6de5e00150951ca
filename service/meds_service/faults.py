"""Fault-injection points: named places where a test can make the service SIGKILL itself.

A point is a one-line call, `faults.point("sqlite.commit.after_write")`, at a moment where a crash is the
worst case for durability (inside a commit, between a commit and its answer). It does nothing unless the
process was armed at start from `MEDS_FAULT_POINTS`, a comma-separated list of `point:rule`:

    sqlite.commit.after_write:0.3     SIGKILL on each hit with probability 0.3
    score.before_ack:@2               SIGKILL on exactly the 2nd hit since the process started

`MEDS_FAULT_SEED` makes the draws repeatable (each point draws from its own stream of that seed); without
it they differ at every start. Tests only: settings refuse `MEDS_FAULT_POINTS` with `MEDS_ENV=production`,
and `arm` refuses it too. Unarmed, a point costs one module-level check.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

POINTS: Mapping[str, str] = {
    "sqlite.commit.after_write": "SQLite: a batch's rows are written, its COMMIT not yet run",
    "sqlite.commit.after_commit": "SQLite: right after a batch's COMMIT, before the in-memory catalog has it",
    "redis.commit.before_script": "Redis: a batch is built, its commit script not yet sent",
    "redis.commit.after_script": "Redis: right after the commit script, before the kept texts are written",
    "score.before_ack": "a score request's batch is remembered, its answer not yet sent",
}
"""Every point in the code, with the moment it marks (a test holds the calls and this list equal)."""


class FaultSpecError(ValueError):
    """`MEDS_FAULT_POINTS` names an unknown point or a rule that is not a probability or `@N`."""


@dataclass(frozen=True)
class Trigger:
    """When an armed point fires: with `probability` on each hit, or on hit number `on_hit` only."""

    probability: float = 0.0
    on_hit: int = 0


@dataclass
class _Armed:
    trigger: Trigger
    rng: random.Random
    hits: int = 0

    def fires(self) -> bool:
        self.hits += 1
        if self.trigger.on_hit:
            return self.hits == self.trigger.on_hit
        return self.rng.random() < self.trigger.probability


@dataclass
class FaultPlan:
    """The armed points of this process and their hit counts."""

    triggers: Mapping[str, Trigger]
    seed: int | None = None
    _armed: dict[str, _Armed] = field(init=False)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._armed = {
            name: _Armed(trigger, random.Random() if self.seed is None else random.Random(f"{self.seed}:{name}"))
            for name, trigger in self.triggers.items()
        }

    def fires(self, name: str) -> int:
        """Count a hit of `name`; the hit's number when the point fires on it, else 0."""
        armed = self._armed.get(name)
        if armed is None:
            return 0
        with self._lock:  # points are hit from threadpool threads
            return armed.hits if armed.fires() else 0


def parse(spec: str) -> dict[str, Trigger]:
    """`point:rule,...` -> triggers; FaultSpecError on an unknown point, a bad rule or a point named twice."""
    triggers: dict[str, Trigger] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, rule = item.partition(":")
        name, rule = name.strip(), rule.strip()
        if name not in POINTS:
            raise FaultSpecError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
        if name in triggers:
            raise FaultSpecError(f"fault point {name!r} is named twice")
        triggers[name] = _trigger(name, rule)
    return triggers


def _trigger(name: str, rule: str) -> Trigger:
    problem = f"fault point {name!r} needs a rule: a probability in (0, 1] or @N (the Nth hit), not {rule!r}"
    try:
        if rule.startswith("@"):
            on_hit = int(rule[1:])
            if on_hit >= 1:
                return Trigger(on_hit=on_hit)
        else:
            probability = float(rule)
            if 0.0 < probability <= 1.0:
                return Trigger(probability=probability)
    except ValueError:
        pass
    raise FaultSpecError(problem)


_plan: FaultPlan | None = None


def check(spec: str, env: str) -> dict[str, Trigger]:
    """The triggers of `spec`; FaultSpecError when it is malformed, or names any point in production."""
    triggers = parse(spec)
    if triggers and env == "production":
        raise FaultSpecError("MEDS_FAULT_POINTS kills the service on purpose (tests only); refused in production")
    return triggers


def arm(spec: str, *, seed: int | None = None, env: str = "dev") -> None:
    """Arm the points that `spec` names for this process (an empty spec disarms them all)."""
    global _plan
    triggers = check(spec, env)
    _plan = FaultPlan(triggers, seed) if triggers else None


def disarm() -> None:
    global _plan
    _plan = None


def armed() -> bool:
    return _plan is not None


def point(name: str) -> None:
    """A fault-injection point: SIGKILL this process here when `name` is armed and fires on this hit."""
    if _plan is None:
        return
    hit = _plan.fires(name)
    if hit:
        # One line on stderr says which point killed the process; SIGKILL runs no cleanup of any kind.
        with contextlib.suppress(OSError):  # no stderr must not save the process
            os.write(2, f"meds: fault point {name} fired on hit {hit}: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
