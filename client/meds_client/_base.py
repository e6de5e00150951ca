"""Everything `MedsClient` and `AsyncMedsClient` share: request building, retry decisions, response
parsing, chunking and degraded mode. The two clients differ only in how they send and sleep.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from . import _json
from ._config import (
    DEFAULT_MAX_BATCH_BYTES,
    DEFAULT_MAX_BATCH_ROLLOUTS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_SCORE_DEADLINE,
    DEFAULT_TIMEOUT,
    OnError,
    RetryPolicy,
    Wire,
    is_retryable_status,
    resolve_api_key,
    resolve_base_url,
    resolve_deadline,
    resolve_retries,
    resolve_timeout,
    timeout_within,
)
from ._encoding import (
    RolloutColumns,
    ScoreChunk,
    WireCodec,
    coerce_rollouts,
    columns_of,
    plan_chunks,
    read_json_object,
    unsendable_rows,
    wire_codec,
)
from ._exceptions import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    ConflictError,
    MedsError,
    NotFoundError,
    PermissionDeniedError,
    make_status_error,
)
from ._types import PromptMemory, ReclusterResult, Rollout, Run, RunConfig, ScoreResults
from ._version import __version__

logger = logging.getLogger("meds_client")

T = TypeVar("T")
HttpClientT = TypeVar("HttpClientT", httpx.Client, httpx.AsyncClient)

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
NEVER_DEGRADED: tuple[type[MedsError], ...] = (AuthenticationError, PermissionDeniedError, ConflictError, NotFoundError)
"""Errors that mean the client is misconfigured: zero penalties for a whole run would hide them."""


@dataclass
class ClientStats:
    """Counters a trainer can log next to its own metrics."""

    requests: int = 0
    """HTTP attempts sent, retries included."""
    retries: int = 0
    degraded_batches: int = 0
    """Score requests answered locally with status `error` (on_error="zero"), including the part of a
    batch that could not be sent at all (non-finite fingerprints, fingerprints of different sizes)."""
    degraded_rollouts: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One logical API call: what to send, how to read the answer, and whether it may be retried."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    body: Any = None
    retry: bool = True
    accept: frozenset[int] = frozenset()
    """Non-2xx statuses that are an answer, not an error (e.g. 503 from /readyz)."""
    content: bytes | None = None
    """A body already encoded by `codec`, sent as such with its content type and Accept header."""
    codec: WireCodec | None = None


class ScorePlan:
    """A score call split into chunked requests, and the place where their results are reassembled.

    `deadline_at` (a `time.monotonic()` value, or None) bounds the whole call, retries included.
    """

    def __init__(self, run: str, chunks: list[ScoreChunk], size: int, deadline_at: float | None = None) -> None:
        self.run = run
        self.chunks = chunks
        self.deadline_at = deadline_at
        self._results = ScoreResults.empty(size)

    def call(self, chunk: ScoreChunk) -> Call[ScoreResults]:
        assert chunk.codec is not None and chunk.content is not None, "a chunk that is not sent has no call"
        parse = _score_parser(chunk.codec, chunk.rollout_ids)
        return Call("POST", f"/v1/runs/{self.run}/score", parse, content=chunk.content, codec=chunk.codec)

    def fill(self, chunk: ScoreChunk, results: ScoreResults) -> None:
        self._results.put(chunk.positions, results)

    def results(self) -> ScoreResults:
        return self._results


class BaseMedsClient(Generic[HttpClientT]):
    """Configuration, endpoint definitions and policies shared by the sync and async clients."""

    _http: HttpClientT

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        retries: int | RetryPolicy = DEFAULT_MAX_RETRIES,
        max_batch_rollouts: int = DEFAULT_MAX_BATCH_ROLLOUTS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        on_error: OnError = "raise",
        wire: Wire = "auto",
        deadline: float | None = DEFAULT_SCORE_DEADLINE,
        http_client: HttpClientT | None = None,
    ) -> None:
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}")
        self.wire = wire_codec(wire)
        if max_batch_rollouts < 1 or max_batch_bytes < 1:
            raise ValueError("max_batch_rollouts and max_batch_bytes must be positive")
        self.base_url = resolve_base_url(base_url)
        self.api_key = resolve_api_key(api_key)
        self.timeout = resolve_timeout(timeout)
        self.retry_policy = resolve_retries(retries)
        self.deadline = resolve_deadline(deadline)
        self.max_batch_rollouts = max_batch_rollouts
        self.max_batch_bytes = max_batch_bytes
        self.on_error: OnError = on_error
        self.stats = ClientStats()
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else self._new_http()

    def _new_http(self) -> HttpClientT:
        """The HTTP client this client owns (and closes) when none was passed in."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, on_error={self.on_error!r})"

    # -- endpoint definitions ------------------------------------------------------------------

    def _put_run_call(self, run: str, config: RunConfig | Mapping[str, Any] | None) -> Call[Run]:
        def parse(response: httpx.Response) -> Run:
            return Run.from_json(read_json_object(response), created=response.status_code == 201)

        return Call("PUT", f"/v1/runs/{_run_path(run)}", parse, body=dict(config or {}))

    def _get_run_call(self, run: str) -> Call[Run]:
        return Call("GET", f"/v1/runs/{_run_path(run)}", lambda r: Run.from_json(read_json_object(r)))

    def _list_runs_call(self) -> Call[list[Run]]:
        return Call("GET", "/v1/runs", lambda r: [Run.from_json(item) for item in read_json_object(r)["runs"]])

    def _delete_run_call(self, run: str) -> Call[None]:
        return Call("DELETE", f"/v1/runs/{_run_path(run)}", lambda r: None)

    def _recluster_call(self, run: str, all_keys: bool) -> Call[ReclusterResult]:
        path = f"/v1/runs/{_run_path(run)}/recluster"
        return Call("POST", path, lambda r: ReclusterResult.from_json(read_json_object(r)), body={"all": all_keys})

    def _get_prompt_call(self, run: str, prompt_id: str) -> Call[PromptMemory]:
        path = f"/v1/runs/{_run_path(run)}/prompts/{quote(prompt_id, safe='')}"
        return Call("GET", path, lambda r: PromptMemory.from_json(read_json_object(r)))

    def _health_call(self) -> Call[dict[str, Any]]:
        return Call("GET", "/healthz", _json_or_status)

    def _ready_call(self) -> Call[bool]:
        return Call("GET", "/readyz", lambda r: r.status_code == 200, retry=False, accept=frozenset({503}))

    def _score_plan(self, run: str, rollouts: Iterable[Rollout | Mapping[str, Any]], step: int | None) -> ScorePlan:
        """The requests of one score call. Under on_error="zero", rollouts that cannot even be encoded
        (non-finite fingerprints or rewards, fingerprints of different sizes) are answered at once as
        degraded, and the rest are sent; ids that break the API's rules always raise (a bug, not an outage)."""
        deadline_at = self._deadline_at()
        run, items = _run_path(run), coerce_rollouts(rollouts)
        try:
            return self._plan(run, columns_of(items), step, deadline_at)
        except ValueError as error:
            bad, reason = unsendable_rows(items)
            if self.on_error == "raise" or not bad:
                raise
            bad_set = set(bad)
            keep = [i for i in range(len(items)) if i not in bad_set]
            unsent = ScoreChunk(bad, [items[i].rollout_id for i in bad])
            columns = columns_of([items[i] for i in keep])
            message = f"not sent: {reason} ({error})"
            return self._plan(run, columns, step, deadline_at, keep, len(items), (unsent, message))

    def _score_columns_plan(self, run: str, columns: RolloutColumns, step: int | None) -> ScorePlan:
        """`_score_plan` for a batch given as columns: the unsendable rows are found in one pass over the arrays."""
        deadline_at = self._deadline_at()
        run = _run_path(run)
        bad = columns.unsendable()
        if not bad.any():
            return self._plan(run, columns, step, deadline_at)
        first = columns.rollout_ids[int(np.argmax(bad))]
        reason = "infinite rewards or NaN or infinite fingerprint values"
        if self.on_error == "raise":
            raise ValueError(f"rollout {first!r} cannot be sent: {reason}")
        keep, unsendable = np.flatnonzero(~bad).tolist(), np.flatnonzero(bad).tolist()
        unsent = ScoreChunk(unsendable, [columns.rollout_ids[i] for i in unsendable])
        message = f"not sent: {reason} (first: {first!r})"
        return self._plan(run, columns.take(keep), step, deadline_at, keep, len(columns), (unsent, message))

    def _plan(
        self,
        run: str,
        columns: RolloutColumns,
        step: int | None,
        deadline_at: float | None,
        positions: list[int] | None = None,
        size: int | None = None,
        unsent: tuple[ScoreChunk, str] | None = None,
    ) -> ScorePlan:
        """The chunked requests of `columns`, which sit at `positions` of a batch of `size` rollouts (all of
        it by default); `unsent` rollouts of that batch are answered as degraded at once."""
        chunks = plan_chunks(
            columns, max_rollouts=self.max_batch_rollouts, max_bytes=self.max_batch_bytes, step=step, codec=self.wire
        )
        if positions is not None:
            chunks = [dataclasses.replace(chunk, positions=[positions[p] for p in chunk.positions]) for chunk in chunks]
        plan = ScorePlan(run, chunks, len(columns) if size is None else size, deadline_at)
        if unsent is not None:
            chunk, reason = unsent
            plan.fill(chunk, self._degrade(plan, chunk, reason))
        return plan

    def _deadline_at(self) -> float | None:
        return None if self.deadline is None else time.monotonic() + self.deadline

    # -- sending policy ------------------------------------------------------------------------

    def _build_request(self, call: Call[Any], deadline_at: float | None = None) -> httpx.Request:
        """The request of one attempt; its timeouts are cut to what is left before `deadline_at`."""
        headers = {"Accept": "application/json", "User-Agent": f"meds-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        content = call.content
        if call.codec is not None:
            headers["Content-Type"], headers["Accept"] = call.codec.content_type, call.codec.accept
        elif call.body is not None:
            headers["Content-Type"] = "application/json"
            content = _json.dumps(call.body)
        timeout = self.timeout
        if deadline_at is not None:
            timeout = timeout_within(timeout, max(deadline_at - time.monotonic(), 0.0))
        return self._http.build_request(
            call.method, self.base_url + call.path, headers=headers, content=content, timeout=timeout
        )

    def _check_deadline(self, call: Call[Any], request: httpx.Request, deadline_at: float | None) -> None:
        """Refuse to start an attempt once the score call's deadline has passed."""
        if deadline_at is not None and time.monotonic() >= deadline_at:
            raise APITimeoutError(
                f"{call.method} {request.url}: not sent, the score deadline of {self.deadline} s has passed",
                request=request,
            )

    def _may_retry(self, call: Call[Any], attempt: int, delay: float, deadline_at: float | None) -> bool:
        """Whether another attempt is allowed: retryable, tries left, and it would start before the deadline."""
        in_time = deadline_at is None or time.monotonic() + delay < deadline_at
        return call.retry and attempt < self.retry_policy.max_retries and in_time

    def _is_answer(self, call: Call[Any], response: httpx.Response) -> bool:
        return response.is_success or response.status_code in call.accept

    def _delay_after_status(
        self, call: Call[Any], response: httpx.Response, attempt: int, deadline_at: float | None = None
    ) -> float:
        """Seconds to wait before resending after an error status; raises when it must not be resent."""
        error = self._status_error(response)
        delay = self.retry_policy.delay(attempt, response)
        if not (is_retryable_status(response.status_code) and self._may_retry(call, attempt, delay, deadline_at)):
            raise error
        self._log_retry(call, attempt, delay, str(error))
        return delay

    def _delay_after_transport_error(
        self,
        call: Call[Any],
        request: httpx.Request,
        exc: httpx.TransportError,
        attempt: int,
        deadline_at: float | None = None,
    ) -> float:
        """Seconds to wait before resending after a connection error or timeout; raises when out of tries
        (or out of time)."""
        delay = self.retry_policy.backoff(attempt)
        if not self._may_retry(call, attempt, delay, deadline_at):
            cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
            raise cls(f"{call.method} {request.url}: {type(exc).__name__}: {exc}", request=request) from exc
        self._log_retry(call, attempt, delay, f"{type(exc).__name__}: {exc}")
        return delay

    def _log_retry(self, call: Call[Any], attempt: int, delay: float, reason: str) -> None:
        self.stats.add(retries=1)
        logger.info(
            "retrying %s %s in %.2fs (retry %d of %d): %s",
            call.method,
            call.path,
            delay,
            attempt + 1,
            self.retry_policy.max_retries,
            reason,
        )

    def _status_error(self, response: httpx.Response) -> APIStatusError:
        error = make_status_error(response)
        if isinstance(error, AuthenticationError) and not self.api_key:
            error.args = (f"{error.args[0]} (no API key configured: pass api_key= or set MEDS_API_KEY)",)
        return error

    @staticmethod
    def _parse(call: Call[T], response: httpx.Response) -> T:
        try:
            return call.parse(response)
        except APIResponseValidationError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            message = f"{call.method} {call.path}: unexpected response body ({type(exc).__name__}: {exc})"
            raise APIResponseValidationError(message, response=response) from exc

    def _degrade(self, plan: ScorePlan, chunk: ScoreChunk, error: MedsError | str) -> ScoreResults:
        """In degraded mode, stand in for a failed score request with penalty 0 and status `error`."""
        if isinstance(error, MedsError) and (self.on_error == "raise" or isinstance(error, NEVER_DEGRADED)):
            raise error
        rollout_ids = chunk.rollout_ids
        self.stats.add(degraded_batches=1, degraded_rollouts=len(rollout_ids))
        logger.error(
            "MEDS scoring failed for %d rollouts of run %r; using penalty 0 with status 'error': %s",
            len(rollout_ids),
            plan.run,
            error,
        )
        return ScoreResults.errors(rollout_ids)


def _run_path(run: str) -> str:
    if not isinstance(run, str) or not RUN_ID_PATTERN.fullmatch(run):
        raise ValueError(f"run must match [A-Za-z0-9._-]{{1,128}}, got {run!r}")
    return run


def _json_or_status(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {"status": response.text.strip()}
    return body if isinstance(body, dict) else {"status": body}


def _score_parser(codec: WireCodec, expected_ids: list[str]) -> Callable[[httpx.Response], ScoreResults]:
    """Read a score answer with the codec its request was sent with."""

    def parse(response: httpx.Response) -> ScoreResults:
        return _expect_ids(codec.read(response), expected_ids, response)

    return parse


def _expect_ids(results: ScoreResults, expected_ids: list[str], response: httpx.Response) -> ScoreResults:
    """The results, if they answer exactly the rollouts sent, in order."""
    if results.rollout_ids != expected_ids:
        raise APIResponseValidationError(
            f"{len(results)} results do not match the {len(expected_ids)} rollouts sent", response=response
        )
    return results
