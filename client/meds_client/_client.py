"""`MedsClient` (blocking) and `AsyncMedsClient` (asyncio/trio via anyio).

Both share `BaseMedsClient`; each defines only `_send` (one call with retries) and the thin public
methods that pass a call definition to it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import anyio
import httpx
from numpy.typing import ArrayLike

from ._base import BaseMedsClient, Call, ScorePlan
from ._encoding import ScoreChunk, columns_from_arrays
from ._exceptions import MedsError
from ._types import PromptMemory, ReclusterResult, Rollout, Run, RunConfig, ScoreResults

T = TypeVar("T")
_ClientT = TypeVar("_ClientT", bound="MedsClient")
_AsyncClientT = TypeVar("_AsyncClientT", bound="AsyncMedsClient")


class MedsClient(BaseMedsClient[httpx.Client]):
    """Blocking client of the MEDS service.

    >>> with MedsClient("http://127.0.0.1:8000") as meds:                      # doctest: +SKIP
    ...     results = meds.score("qwen-7b-grpo", rollouts, step=12)
    ...     penalties = [r.penalty for r in results]

    Configuration: `base_url` (default $MEDS_URL or http://127.0.0.1:8000), `api_key` (default
    $MEDS_API_KEY, sent as a Bearer token), `timeout` (seconds or `httpx.Timeout`, default 60),
    `retries` (count or `RetryPolicy`, default 3: 0.5 s doubling to 8 s with jitter, honouring
    Retry-After up to 60 s, on connection errors, timeouts, 408, 429 and 5xx only), chunking
    (`max_batch_rollouts`, `max_batch_bytes`), `on_error` ("raise", or "zero" for degraded mode),
    `deadline` (default 10 s: the most one `score` call takes in all, chunks and retries included;
    each attempt's timeouts are cut to the time left, and no retry starts past it; None for no
    deadline; other calls are bounded by `timeout` and `retries` only) and `wire` ("auto": score
    requests in the compact msgpack columnar form when msgpack is installed). In degraded mode a
    score request that fails (after retries, or at the deadline), and rollouts that cannot be
    encoded at all (NaN or infinite fingerprints or rewards; every rollout of a batch whose
    fingerprints differ in size), get penalty 0 with status "error" and are counted in `stats`;
    401, 403, 404 and 409 (misconfiguration) and invalid ids still raise. Pass `http_client` to bring your
    own `httpx.Client` (proxies, mounts, a mock transport); the client then does not close it.
    """

    def _new_http(self) -> httpx.Client:
        return httpx.Client()

    # -- the API -------------------------------------------------------------------------------

    def score(
        self, run: str, rollouts: Iterable[Rollout | Mapping[str, Any]], *, step: int | None = None
    ) -> ScoreResults:
        """Score a batch against the run's memory, then remember it; one result per rollout, in order.

        The run is created with the default config if it does not exist. Large batches are sent as
        several requests (never splitting a prompt's rollouts when avoidable) and reassembled.
        """
        plan = self._score_plan(run, rollouts, step)
        for chunk in plan.chunks:
            plan.fill(chunk, self._score_chunk(plan, chunk))
        return plan.results()

    def score_columns(
        self,
        run: str,
        *,
        prompt_ids: Sequence[str],
        correct: ArrayLike | None = None,
        fingerprints: ArrayLike | None = None,
        rewards: ArrayLike | None = None,
        rollout_ids: Sequence[str] | None = None,
        texts: Sequence[str | None] | None = None,
        step: int | None = None,
    ) -> ScoreResults:
        """`score` for a batch given as columns, one entry per rollout: no object per rollout is built.

        `fingerprints` is one [n, dim] array (float32 is sent as it is); `correct` booleans (or 1, 0 and
        -1 for unknown; default all unknown); `rewards` floats (NaN = none); `rollout_ids` default to
        fresh unique ids (pass your own to make a repeated call answer `duplicate`). Without fingerprints
        every rollout is skipped. Chunking, the deadline, retries and degraded mode are those of `score`;
        read the answer's columns (`penalties`, `cluster_sizes`, `status_codes`, `shaped_rewards`).
        """
        columns = columns_from_arrays(prompt_ids, rollout_ids=rollout_ids, correct=correct,
                                      fingerprints=fingerprints, rewards=rewards, texts=texts)  # fmt: skip
        plan = self._score_columns_plan(run, columns, step)
        for chunk in plan.chunks:
            plan.fill(chunk, self._score_chunk(plan, chunk))
        return plan.results()

    def put_run(self, run: str, config: RunConfig | Mapping[str, Any] | None = None) -> Run:
        """Create a run, or update its config (a result-changing update on a run with memory → 409)."""
        return self._send(self._put_run_call(run, config))

    create_run = put_run

    def get_run(self, run: str) -> Run:
        """A run's config and statistics; `NotFoundError` if unknown."""
        return self._send(self._get_run_call(run))

    def list_runs(self) -> list[Run]:
        return self._send(self._list_runs_call())

    def delete_run(self, run: str) -> None:
        """Forget a run's memory; `NotFoundError` if unknown."""
        self._send(self._delete_run_call(run))

    def recluster(self, run: str, *, all: bool = False) -> ReclusterResult:
        """Refit the run's dirty keys now (every key with `all=True`)."""
        return self._send(self._recluster_call(run, all))

    def get_prompt(self, run: str, prompt_id: str) -> PromptMemory:
        """The memory of one prompt: vectors, clusters and labels per group."""
        return self._send(self._get_prompt_call(run, prompt_id))

    def health(self) -> dict[str, Any]:
        """The liveness answer of /healthz; raises if the service is not alive."""
        return self._send(self._health_call())

    def ready(self) -> bool:
        """Whether /readyz says the service can take traffic (False on 503); no retries."""
        return self._send(self._ready_call())

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self: _ClientT) -> _ClientT:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- sending -------------------------------------------------------------------------------

    def _score_chunk(self, plan: ScorePlan, chunk: ScoreChunk) -> ScoreResults:
        try:
            return self._send(plan.call(chunk), plan.deadline_at)
        except MedsError as error:
            return self._degrade(plan, chunk, error)

    def _send(self, call: Call[T], deadline_at: float | None = None) -> T:
        for attempt in itertools.count():
            request = self._build_request(call, deadline_at)
            self._check_deadline(call, request, deadline_at)
            self.stats.add(requests=1)
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                delay = self._delay_after_transport_error(call, request, exc, attempt, deadline_at)
            else:
                if self._is_answer(call, response):
                    return self._parse(call, response)
                delay = self._delay_after_status(call, response, attempt, deadline_at)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class AsyncMedsClient(BaseMedsClient[httpx.AsyncClient]):
    """Asynchronous client of the MEDS service; the same API as `MedsClient`, awaited."""

    def _new_http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient()

    async def score(
        self, run: str, rollouts: Iterable[Rollout | Mapping[str, Any]], *, step: int | None = None
    ) -> ScoreResults:
        """See `MedsClient.score`. Chunks are sent one after another, in order."""
        plan = self._score_plan(run, rollouts, step)
        for chunk in plan.chunks:
            plan.fill(chunk, await self._score_chunk(plan, chunk))
        return plan.results()

    async def score_columns(
        self,
        run: str,
        *,
        prompt_ids: Sequence[str],
        correct: ArrayLike | None = None,
        fingerprints: ArrayLike | None = None,
        rewards: ArrayLike | None = None,
        rollout_ids: Sequence[str] | None = None,
        texts: Sequence[str | None] | None = None,
        step: int | None = None,
    ) -> ScoreResults:
        """See `MedsClient.score_columns`."""
        columns = columns_from_arrays(prompt_ids, rollout_ids=rollout_ids, correct=correct,
                                      fingerprints=fingerprints, rewards=rewards, texts=texts)  # fmt: skip
        plan = self._score_columns_plan(run, columns, step)
        for chunk in plan.chunks:
            plan.fill(chunk, await self._score_chunk(plan, chunk))
        return plan.results()

    async def put_run(self, run: str, config: RunConfig | Mapping[str, Any] | None = None) -> Run:
        """See `MedsClient.put_run`."""
        return await self._send(self._put_run_call(run, config))

    create_run = put_run

    async def get_run(self, run: str) -> Run:
        return await self._send(self._get_run_call(run))

    async def list_runs(self) -> list[Run]:
        return await self._send(self._list_runs_call())

    async def delete_run(self, run: str) -> None:
        await self._send(self._delete_run_call(run))

    async def recluster(self, run: str, *, all: bool = False) -> ReclusterResult:
        return await self._send(self._recluster_call(run, all))

    async def get_prompt(self, run: str, prompt_id: str) -> PromptMemory:
        return await self._send(self._get_prompt_call(run, prompt_id))

    async def health(self) -> dict[str, Any]:
        return await self._send(self._health_call())

    async def ready(self) -> bool:
        return await self._send(self._ready_call())

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self: _AsyncClientT) -> _AsyncClientT:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _score_chunk(self, plan: ScorePlan, chunk: ScoreChunk) -> ScoreResults:
        try:
            return await self._send(plan.call(chunk), plan.deadline_at)
        except MedsError as error:
            return self._degrade(plan, chunk, error)

    async def _send(self, call: Call[T], deadline_at: float | None = None) -> T:
        for attempt in itertools.count():
            request = self._build_request(call, deadline_at)
            self._check_deadline(call, request, deadline_at)
            self.stats.add(requests=1)
            try:
                response = await self._send_once(request, deadline_at)
            except httpx.TransportError as exc:
                delay = self._delay_after_transport_error(call, request, exc, attempt, deadline_at)
            else:
                if self._is_answer(call, response):
                    return self._parse(call, response)
                delay = self._delay_after_status(call, response, attempt, deadline_at)
            await self._sleep(delay)
        raise AssertionError("unreachable")

    async def _send_once(self, request: httpx.Request, deadline_at: float | None) -> httpx.Response:
        """One attempt; with a deadline, cancelled when it passes even if the service trickles bytes."""
        if deadline_at is None:
            return await self._http.send(request)
        try:
            with anyio.fail_after(max(deadline_at - time.monotonic(), 0.0)):
                return await self._http.send(request)
        except TimeoutError as exc:
            raise httpx.ReadTimeout("the score deadline passed during the request", request=request) from exc

    async def _sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
