"""The v1 routes (docs/architecture.md, "A score request"). Handlers only translate between HTTP and the engine."""

from __future__ import annotations

import hmac
import time
from typing import Annotated, Any, get_type_hints

import orjson
from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import Response

from ..core.config import RunConfig
from ..core.errors import StoreUnavailable, Unauthorized
from ..engine import ErrorMemory
from ..settings import Settings
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
    code: {"model": ErrorResponse} for code in (400, 401, 404, 405, 409, 413, 415, 422, 503)
}


def engine_of(request: Request) -> ErrorMemory:
    return request.app.state.engine  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


EngineDep = Annotated[ErrorMemory, Depends(engine_of)]
SettingsDep = Annotated[Settings, Depends(settings_of)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    """Bearer-token auth against MEDS_API_KEYS; open when no keys are configured (dev)."""
    if not settings.api_keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if not any(hmac.compare_digest(token.encode(), key.get_secret_value().encode()) for key in settings.api_keys):
        raise Unauthorized("API key not accepted")


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


v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)


@v1.put(
    "/runs/{run}",
    response_model=RunResponse,
    status_code=200,
    summary="Create or update a run's config",
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


@v1.get("/runs", response_model=RunListResponse, summary="List runs")
async def list_runs(engine: EngineDep) -> Response:
    def runs() -> list[dict[str, Any]]:
        return [run_json(engine, name) for name in engine.run_names()]

    return json_response({"runs": await run_in_threadpool(runs)})


@v1.get("/runs/{run}", response_model=RunResponse, summary="A run's config and memory stats")
async def get_run(run: RunName, engine: EngineDep) -> Response:
    return json_response(await run_in_threadpool(run_json, engine, run))


@v1.delete("/runs/{run}", status_code=204, summary="Forget a run and all its memory")
async def delete_run(run: RunName, engine: EngineDep) -> Response:
    await run_in_threadpool(engine.delete, run)
    return Response(status_code=204)


@v1.post(
    "/runs/{run}/score",
    response_model=ScoreResponse,
    summary="Score a batch of rollouts and remember it",
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


@v1.get("/runs/{run}/prompts/{prompt_id:path}", response_model=PromptResponse, summary="A prompt's memory")
async def prompt(run: RunName, prompt_id: PromptId, engine: EngineDep) -> Response:
    return json_response(await run_in_threadpool(engine.prompt, run, prompt_id))


health = APIRouter()


@health.get("/healthz", response_model=HealthResponse, summary="Liveness: the process answers")
async def healthz() -> Response:
    return json_response({"status": "ok"})


@health.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"model": ErrorResponse}},
    summary="Readiness: store reachable and memory loaded",
)
async def readyz(engine: EngineDep) -> Response:
    if not engine.loaded:
        raise StoreUnavailable("memory is still loading", retry_after=2)

    def detail() -> dict[str, Any]:
        engine.store.ping()
        return {"store": engine.store.info(), "runs": len(engine.run_names())}

    return json_response({"status": "ready", "detail": await run_in_threadpool(detail)})
