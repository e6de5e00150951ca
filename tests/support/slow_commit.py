"""`meds serve` whose Redis commits first wait MEDS_TEST_COMMIT_DELAY_S seconds, while the batch's prompt
locks are held: lets a test kill or pause a replica mid-batch. The service itself has no such hook; this
module patches the store class in its own process only, before the server starts."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness.server import ProcessServer

DELAY_ENV = "MEDS_TEST_COMMIT_DELAY_S"
REPO = Path(__file__).resolve().parents[2]


class SlowCommitServer(ProcessServer):
    """A `meds serve` subprocess whose every commit to Redis waits `delay_s` first."""

    def __init__(self, data_dir: Path, delay_s: float, env: dict[str, str] | None = None) -> None:
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        super().__init__(data_dir, {**(env or {}), DELAY_ENV: str(delay_s), "PYTHONPATH": pythonpath})

    def args(self) -> list[str]:
        return [sys.executable, "-m", "tests.support.slow_commit", "serve", "--port", str(self.port)]


def _delayed(commit: Callable[..., None], delay_s: float) -> Callable[..., None]:
    @functools.wraps(commit)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        time.sleep(delay_s)
        commit(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    from meds_service.cli import main
    from meds_service.storage.redis import RedisStore

    RedisStore.commit = _delayed(RedisStore.commit, float(os.environ[DELAY_ENV]))  # type: ignore[method-assign]
    raise SystemExit(main())
