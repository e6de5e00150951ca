"""Client configuration: named defaults and the retry policy.

Every default is a named constant so that trainers can read and override them from their own config.
"""

from __future__ import annotations

import email.utils
import os
import random
import time
from dataclasses import dataclass
from typing import Literal

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
"""Used when neither `base_url=` nor the MEDS_URL environment variable is given."""
BASE_URL_ENV = "MEDS_URL"
API_KEY_ENV = "MEDS_API_KEY"

DEFAULT_TIMEOUT = 60.0
"""Seconds for each of connect, read, write and pool; well below trainer-level timeouts."""
DEFAULT_SCORE_DEADLINE = 10.0
"""Seconds one `score` call may take in all, retries and chunks included; then it fails (or, with
on_error="zero", answers penalty 0 with status "error"). A hanging service costs a step this much."""
DEFAULT_MAX_RETRIES = 3
DEFAULT_INITIAL_RETRY_DELAY = 0.5
DEFAULT_MAX_RETRY_DELAY = 8.0
DEFAULT_MAX_RETRY_AFTER = 60.0
DEFAULT_RETRY_JITTER = 0.25
DEFAULT_MAX_BATCH_ROLLOUTS = 8192
"""Rollouts per score request; larger batches are split (by prompt) and reassembled in order."""
DEFAULT_MAX_BATCH_BYTES = 16 * 1024 * 1024
"""Estimated request body size per score request; half the service's default 32 MiB limit."""

OnError = Literal["raise", "zero"]
"""What `score` does when the service fails after retries: raise, or return penalty 0 with status "error"."""
Wire = Literal["auto", "json", "msgpack"]
"""Score request encoding: the compact msgpack columns when msgpack is installed (`auto`), or forced."""

RETRYABLE_STATUS_CODES = frozenset({408, 429})
"""Besides these, every 5xx is retried. Other 4xx mean the request itself is wrong."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter.

    Attempt n (0-based) waits `min(initial_delay * 2**n, max_delay)`, shortened by up to `jitter` of
    itself at random so that many trainer ranks do not retry in lockstep. A `Retry-After` header of at
    most `max_retry_after` seconds replaces that delay.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = DEFAULT_INITIAL_RETRY_DELAY
    max_delay: float = DEFAULT_MAX_RETRY_DELAY
    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    jitter: float = DEFAULT_RETRY_JITTER

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be within [0, 1]")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number `attempt + 1`, without any Retry-After."""
        # The exponent is capped: 2.0 ** 1024 overflows a float, and a client with many retries gets there.
        delay = min(self.initial_delay * 2.0 ** min(attempt, 64), self.max_delay)
        return delay * (1.0 - self.jitter * random.random())

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait before the next attempt: the server's Retry-After when sane, else backoff."""
        retry_after = parse_retry_after(response) if response is not None else None
        if retry_after is not None and 0.0 <= retry_after <= self.max_retry_after:
            return retry_after
        return self.backoff(attempt)


def is_retryable_status(status_code: int) -> bool:
    """Whether an error status is worth resending unchanged (408, 429, 5xx)."""
    return status_code in RETRYABLE_STATUS_CODES or status_code >= 500


def parse_retry_after(response: httpx.Response) -> float | None:
    """Seconds from `Retry-After` (delta-seconds or HTTP-date) or `retry-after-ms`; None when absent."""
    headers = response.headers
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return float(milliseconds) / 1000.0
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return float(email.utils.mktime_tz(parsed)) - time.time()


def resolve_base_url(base_url: str | None) -> str:
    """`base_url`, else $MEDS_URL, else the local default; without a trailing slash."""
    url = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    """`api_key`, else $MEDS_API_KEY, else None (a service without auth)."""
    return api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None


def resolve_retries(retries: int | RetryPolicy) -> RetryPolicy:
    """Accept a bare retry count (like httpx accepts a bare timeout) or a full policy."""
    return retries if isinstance(retries, RetryPolicy) else RetryPolicy(max_retries=retries)


def resolve_timeout(timeout: float | httpx.Timeout) -> httpx.Timeout:
    return timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)


def resolve_deadline(deadline: float | None) -> float | None:
    """A positive, finite number of seconds, or None for no deadline."""
    if deadline is not None and not (isinstance(deadline, (int, float)) and 0.0 < deadline < float("inf")):
        raise ValueError(f"deadline must be a positive number of seconds or None, got {deadline!r}")
    return None if deadline is None else float(deadline)


def timeout_within(timeout: httpx.Timeout, seconds_left: float) -> httpx.Timeout:
    """`timeout` with each of its parts cut to the time left before a deadline."""

    def cut(value: float | None) -> float:
        return seconds_left if value is None else min(value, seconds_left)

    return httpx.Timeout(
        connect=cut(timeout.connect), read=cut(timeout.read), write=cut(timeout.write), pool=cut(timeout.pool)
    )
