"""The v1 routes (docs/architecture.md, "A score request"). Handlers only translate between HTTP and the engine."""

from __future__ import annotations

import time
from typing import Annotated, Any, get_type_hints

import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from .. import faults
from ..core.config import RunConfig
from ..core.errors import StoreUnavailable
from ..engine import ErrorMemory
from ..settings import Settings
from .admission import ScoreSlot
from .auth import PUBLIC, ReadAccess, access
from .codec import CODECS, MSGPACK, request_codec, response_codec
from .errors import json_object, validated
from .schemas import (
    RUN_PATTERN,
    ErrorResponse,
    HealthResponse,
    PromptResponse,
    ReclusterRequest,
    ReclusterResponse,
    RunListResponse,
    RunResponse,
    ScoreResponse,
)

RunName = Annotated[str, Path(pattern=RUN_PATTERN, description="Run id: [A-Za-z0-9._-]{1,128}")]
PromptId = Annotated[str, Path(min_length=1, max_length=512)]

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 405, 409, 413, 415, 422, 503)
}


def engine_of(request: Request) -> ErrorMemory:
    return request.app.state.engine  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


EngineDep = Annotated[ErrorMemory, Depends(engine_of)]
SettingsDep = Annotated[Settings, Depends(settings_of)]


JSON_ONLY = ("application/json",)


async def body_of(request: Request, media_types: tuple[str, ...] = JSON_ONLY) -> bytes:
    """The request body; 415 unless its Content-Type is one of `media_types` (an empty body needs none)."""
    body = await request.body()
    content_type = request.headers.get("content-type")
    if content_type is None and not body:
        return body
    media_type = (content_type or "").split(";")[0].strip().lower()
    if media_type not in media_types:
        shown = repr(content_type) if content_type is not None else "none"
        raise HTTPException(415, f"Content-Type {shown} is not accepted here: send {' or '.join(media_types)}")
    return body


INTEGER_FIELDS = frozenset(
    name for name, hint in get_type_hints(RunConfig).items() if hint in (int, int | None) and name.islower()
)


def whole_numbers(patch: dict[str, Any]) -> dict[str, Any]:
    """A config patch with 3.0 read as 3 for the integer fields, as JSON Schema counts it an integer."""
    return {
        name: int(value) if name in INTEGER_FIELDS and isinstance(value, float) and value.is_integer() else value
        for name, value in patch.items()
    }


def json_response(payload: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(payload), status_code=status_code, media_type="application/json")


def run_json(engine: ErrorMemory, name: str) -> dict[str, Any]:
    """A run as the API shows it. It reads the store (on Redis, over the network): call it off the event loop."""
    return {
        "run": name,
        "config": engine.config(name).as_dict(),
        "stats": engine.stats(name),
        "created_at": engine.created_at(name),
    }


# Every route declares its scope (api/auth.py): the action it performs on the run in its path.
v1 = APIRouter(prefix="/v1", responses=ERRORS)


@v1.put(
    "/runs/{run}",
    response_model=RunResponse,
    status_code=200,
    summary="Create or update a run's config",
    dependencies=[access("configure")],
    responses={201: {"model": RunResponse, "description": "The run was created"}},
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/RunConfig"}}},
        }
    },
)
async def put_run(run: RunName, request: Request, engine: EngineDep) -> Response:
    patch = whole_numbers(json_object(await body_of(request)))

    def put() -> tuple[dict[str, Any], bool]:
        _, created = engine.put_config(run, patch)
        return run_json(engine, run), created

    body, created = await run_in_threadpool(put)
    return json_response(body, 201 if created else 200)


@v1.get("/runs", response_model=RunListResponse, summary="List the runs the API key may read")
async def list_runs(engine: EngineDep, key: ReadAccess) -> Response:
    def runs() -> list[dict[str, Any]]:
        return [run_json(engine, name) for name in key.readable(engine.run_names())]

    return json_response({"runs": await run_in_threadpool(runs)})


@v1.get(
    "/runs/{run}", response_model=RunResponse, summary="A run's config and memory stats", dependencies=[access("read")]
)
async def get_run(run: RunName, engine: EngineDep) -> Response:
    return json_response(await run_in_threadpool(run_json, engine, run))


@v1.delete("/runs/{run}", status_code=204, summary="Forget a run and all its memory", dependencies=[access("delete")])
async def delete_run(run: RunName, engine: EngineDep) -> Response:
    await run_in_threadpool(engine.delete, run)
    return Response(status_code=204)


@v1.post(
    "/runs/{run}/score",
    response_model=ScoreResponse,
    summary="Score a batch of rollouts and remember it",
    # The key's scope, then admission: 503 + Retry-After at once past the in-flight bounds, body unread.
    dependencies=[access("score"), ScoreSlot],
    description=(
        "JSON, or for large batches the compact columnar form: send `Content-Type: application/msgpack` "
        "(ScoreColumnsRequest) and/or `Accept: application/msgpack` (ScoreColumnsResponse). Both carry the same "
        "information; the columnar form has no per-rollout objects to build on either side."
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}},
                MSGPACK: {"schema": {"$ref": "#/components/schemas/ScoreColumnsRequest"}},
            },
        },
        "responses": {"200": {"content": {MSGPACK: {"schema": {"$ref": "#/components/schemas/ScoreColumnsResponse"}}}}},
    },
)
async def score(run: RunName, request: Request, engine: EngineDep, settings: SettingsDep) -> Response:
    started = time.perf_counter()
    body = await body_of(request, tuple(CODECS))
    received = time.perf_counter()
    decoder = request_codec(request.headers.get("content-type", ""))
    encoder = response_codec(request.headers.get("accept", ""))
    timings = {"receive": received - started}

    def decode_score_encode() -> bytes:
        """The request's work off the event loop in one threadpool hop (each hop is a thread handoff)."""
        mark = time.perf_counter()
        batch = decoder.decode(body, max_batch=settings.max_batch, max_dim=settings.max_dim)
        request.state.rollouts = len(batch)  # for the access log
        decoded = time.perf_counter()
        results = engine.score(run, batch)
        faults.point("score.before_ack")
        scored = time.perf_counter()
        content = encoder.encode(results)
        timings.update(wait=mark - received, decode=decoded - mark, score=scored - decoded)
        timings["encode"] = time.perf_counter() - scored
        return content

    response = Response(await run_in_threadpool(decode_score_encode), media_type=encoder.media_type)
    response.headers["server-timing"] = ", ".join(f"{k};dur={1e3 * v:.1f}" for k, v in timings.items())
    return response


@v1.post(
    "/runs/{run}/recluster",
    response_model=ReclusterResponse,
    summary="Refit now and answer when done",
    dependencies=[access("configure")],
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ReclusterRequest"}}},
        }
    },
)
async def recluster(run: RunName, request: Request, engine: EngineDep) -> Response:
    body = await body_of(request)
    options = validated(ReclusterRequest, body) if body.strip() else ReclusterRequest()
    report = await run_in_threadpool(engine.recluster, run, options.all)
    return json_response(report)


@v1.get(
    "/runs/{run}/prompts/{prompt_id:path}",
    response_model=PromptResponse,
    summary="A prompt's memory",
    dependencies=[access("read")],
)
async def prompt(run: RunName, prompt_id: PromptId, engine: EngineDep) -> Response:
    return json_response(await run_in_threadpool(engine.prompt, run, prompt_id))


health = APIRouter(dependencies=[PUBLIC])


@health.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@health.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse}},
    summary="Readiness: store reachable and memory loaded",
    description="`detail` names the store's kind and counts the runs; never a path or URL.",
)
async def readyz(engine: EngineDep) -> Response:
    if not engine.loaded:
        raise StoreUnavailable("memory is still loading", retry_after=2)

    def detail() -> dict[str, Any]:
        engine.store.ping()
        return {"store": engine.store.info()["backend"], "runs": len(engine.run_names())}

    return json_response({"status": "ready", "detail": await run_in_threadpool(detail)})
