"""Retry policy arithmetic, Retry-After parsing and the exception tree."""

from __future__ import annotations

import email.utils
import time

import httpx
import pytest

import meds_client
from meds_client import RetryPolicy
from meds_client._config import is_retryable_status, parse_retry_after
from meds_client._exceptions import make_status_error, status_error_class


def test_backoff_doubles_from_half_a_second_to_eight_with_jitter() -> None:
    policy = RetryPolicy()
    for attempt, nominal in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]):
        delays = [policy.backoff(attempt) for _ in range(50)]
        assert all(0.75 * nominal <= d <= nominal for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_backoff_stays_at_its_cap_however_many_retries_came_before() -> None:
    """A client with retries=10000 against a service that stays down reached attempt 1024, where 2.0 ** 1024
    overflowed (OverflowError out of `score`, instead of the next retry or the degraded answer)."""
    policy = RetryPolicy(max_retries=10_000, initial_delay=0.05, max_delay=0.5, jitter=0.0)
    assert [policy.backoff(attempt) for attempt in (0, 3, 1023, 1024, 10_000)] == [0.05, 0.4, 0.5, 0.5, 0.5]


def test_retry_after_up_to_sixty_seconds_replaces_backoff() -> None:
    policy = RetryPolicy(jitter=0.0)
    assert policy.delay(0, httpx.Response(503, headers={"Retry-After": "7"})) == 7.0
    assert policy.delay(0, httpx.Response(503, headers={"Retry-After": "60"})) == 60.0
    assert policy.delay(2, httpx.Response(503, headers={"Retry-After": "61"})) == 2.0
    assert policy.delay(1, httpx.Response(503)) == 1.0


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after(httpx.Response(429, headers={"retry-after-ms": "250"})) == 0.25
    assert parse_retry_after(httpx.Response(429, headers={"Retry-After": "3"})) == 3.0
    assert parse_retry_after(httpx.Response(429, headers={"Retry-After": "soon"})) is None
    assert parse_retry_after(httpx.Response(429)) is None
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 27 < (parse_retry_after(httpx.Response(429, headers={"Retry-After": date})) or 0) <= 30


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (408, True),
        (429, True),
        (500, True),
        (503, True),
        (599, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (409, False),
        (413, False),
        (422, False),
    ],
)
def test_retryable_statuses(status: int, retryable: bool) -> None:
    assert is_retryable_status(status) is retryable


def test_policy_validates_itself() -> None:
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=2.0)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, meds_client.BadRequestError),
        (401, meds_client.AuthenticationError),
        (403, meds_client.PermissionDeniedError),
        (404, meds_client.NotFoundError),
        (409, meds_client.ConflictError),
        (413, meds_client.PayloadTooLargeError),
        (422, meds_client.UnprocessableEntityError),
        (429, meds_client.RateLimitError),
        (500, meds_client.InternalServerError),
        (502, meds_client.InternalServerError),
        (503, meds_client.ServiceUnavailableError),
        (418, meds_client.APIStatusError),
    ],
)
def test_one_class_per_actionable_status(status: int, cls: type[meds_client.APIStatusError]) -> None:
    assert status_error_class(status) is cls
    error = make_status_error(httpx.Response(status, json={"error": {"type": "t", "message": "m", "request_id": "r"}}))
    assert type(error) is cls and error.status_code == status and error.request_id == "r"
    assert isinstance(error, meds_client.MedsError)


def test_hierarchy_lets_callers_catch_families() -> None:
    assert issubclass(meds_client.UnprocessableEntityError, meds_client.BadRequestError)
    assert issubclass(meds_client.ServiceUnavailableError, meds_client.InternalServerError)
    assert issubclass(meds_client.APITimeoutError, meds_client.APIConnectionError)


def test_exception_module_opens_with_the_tree() -> None:
    doc = meds_client._exceptions.__doc__ or ""
    for name in meds_client._exceptions.__all__:
        assert name in doc


def test_score_results_are_columns_that_read_as_results() -> None:
    import numpy as np

    from meds_client import ScoreResult, ScoreResults

    results = ScoreResults(
        ["a", "b", "c"],
        np.array([0, 1, 2], np.int8),
        np.array([4, np.iinfo(np.int32).min, -1]),
        np.array([3, 0, 2]),
        np.array([0.13, 0.0, 0.1]),
        np.array([-0.13, np.nan, 0.9]),
    )
    first = ScoreResult("a", "scored", 4, 3, 0.13, -0.13)
    assert len(results) == 3 and results[0] == first and results[-1].status == "duplicate"
    assert results[1] == ScoreResult("b", "skipped", None, 0, 0.0, None)
    assert results[:1] == [first] and next(iter(results)) == first and results == list(results)
    assert results.penalties.tolist() == [0.13, 0.0, 0.1] and results.cluster_sizes.tolist() == [3, 0, 2]
    assert results.statuses == ["scored", "skipped", "duplicate"] and results.rollout_ids == ["a", "b", "c"]
    assert np.isnan(results.shaped_rewards[1]) and results != [first]
    errors = ScoreResults.errors(["x"])
    assert errors[0] == ScoreResult.error("x")
