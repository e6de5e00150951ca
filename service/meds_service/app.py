"""create_app(settings) -> FastAPI. The lifespan opens the store, loads memory and starts refits."""

from __future__ import annotations

import gc
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.openapi.utils import get_openapi
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, start_http_server
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from . import __version__, faults
from .api import errors
from .api.admission import Admission
from .api.auth import PUBLIC
from .api.explorer import explorer, page, ui_assets
from .api.middleware import RequestContext
from .api.routes import health, v1
from .api.schemas import ReclusterRequest, ScoreColumnsRequest, ScoreColumnsResponse, ScoreRequest, publish_limits
from .core import knn
from .engine import ErrorMemory, RefitScheduler
from .engine.ports import RefitQueue
from .engine.summary import CollapseViews
from .metrics import Metrics
from .settings import Settings
from .storage import open_store
from .storage.index import ShardIndexes, set_split_threads, set_threads
from .storage.snapshot import SnapshotFolder
from .workers import LocalRefitter, QueueWorker

log = logging.getLogger(__name__)
# Swagger UI and ReDoc, vendored in the package (see static/README.md): /docs and /redoc work offline.
STATIC_DIR = Path(__file__).with_name("static")
STATIC_URL = "/static"


class _Background:
    """What refits in the background of `meds serve`: nothing, the local scheduler, or a queue consumer."""

    def __init__(self, start: Callable[[], None] = lambda: None, stop: Callable[[], None] = lambda: None) -> None:
        self.start, self.stop = start, stop


def _load_reference(metrics: Metrics) -> None:
    """Import the kNN reference tier's library, then freeze what the import created, as start-up froze the
    rest: scikit-learn, SciPy and pandas add hundreds of thousands of long-lived objects, which every full
    collection of the cyclic GC would otherwise scan again (each one stalled a large request by tens of ms).
    Freezing without collecting first keeps this thread from holding the GIL for a full collection; what a
    request in flight then holds is frozen with it (at worst one request's cyclic garbage is never freed)."""
    knn.load_reference()
    gc.freeze()
    metrics.knn_reference_loaded.set(1)


def _background_refits(
    settings: Settings, engine: ErrorMemory, refitter: LocalRefitter, metrics: Metrics
) -> _Background:
    if not settings.refit_background:
        return _Background()
    queue = engine.store
    if not isinstance(queue, RefitQueue):  # one process owns the memory: schedule its pending keys directly
        scheduler = RefitScheduler(
            engine,
            interval_s=settings.refit_interval_s,
            max_jobs=settings.refit_workers,
            max_keys_per_job=settings.refit_max_keys_per_job,
            max_vectors_per_job=settings.refit_max_vectors_per_job,
        )
        engine.on_pending = scheduler.wake
        return _Background(scheduler.start, scheduler.stop)
    # A shared store: consume the refit queue like a `meds worker` does, with this process's pool.
    worker = QueueWorker(
        engine.store, queue, refitter, consumer=f"api-{socket.gethostname()}-{os.getpid()}",
        batch=settings.refit_queue_batch, claim_idle_s=settings.refit_claim_idle_s, observer=metrics,
        flights=engine.refits.flights,  # one refit per key in flight, shared with the exact rule
    )  # fmt: skip
    return _in_thread(worker.run, "meds-refit-queue")


def _in_thread(loop: Callable[[threading.Event], None], name: str) -> _Background:
    """Run `loop(stop)` in a daemon thread; stopping sets the event and waits for the loop to return."""
    stop = threading.Event()
    thread = threading.Thread(target=loop, args=(stop,), name=name, daemon=True)

    def halt() -> None:
        stop.set()
        if thread.ident is not None:  # a start that failed earlier stops what it never started
            thread.join(10)

    return _Background(thread.start, halt)


def _periodic(interval_s: float, task: Callable[[], object], name: str) -> _Background:
    """Run `task` every interval in a thread (never when the interval is 0); failures are logged."""
    if interval_s <= 0:
        return _Background()

    def loop(stop: threading.Event) -> None:
        while not stop.wait(interval_s):
            try:
                task()
            except Exception:
                log.exception("%s failed", name)

    return _in_thread(loop, name)


class MetricsPortUnavailable(OSError):
    """MEDS_METRICS_PORT cannot be listened on (taken, or not allowed)."""


def _metrics_port(settings: Settings, metrics: Metrics) -> _Background:
    """/metrics on a port of its own (MEDS_METRICS_PORT), served by prometheus_client in a thread, so that
    the API's port need not expose it. Listens at start (a taken port stops the start), closes at stop."""
    port = settings.metrics_port
    if not settings.metrics_enabled or port is None:
        return _Background()
    servers = []

    def start() -> None:
        try:
            server, _ = start_http_server(port, addr=settings.host, registry=metrics.registry)
        except OSError as exc:
            raise MetricsPortUnavailable(exc.errno, exc.strerror) from None
        servers.append(server)

    def stop() -> None:
        for server in servers:
            server.shutdown()
            server.server_close()

    return _Background(start, stop)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    faults.arm(settings.fault_points, seed=settings.fault_seed, env=settings.env)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        set_threads(settings.index_threads)
        set_split_threads(settings.index_split_threads)
        store = open_store(settings.store_spec(), settings.store_options())
        refitter = LocalRefitter(store.spec(), settings.refit_workers, processes=settings.refit_processes)
        engine = ErrorMemory(
            store,
            refitter,
            indexes=ShardIndexes(settings.index_device),
            snapshots=SnapshotFolder(settings.snapshots()),
            max_dim=settings.max_dim,
            observer=metrics,
        )
        background = _background_refits(settings, engine, refitter, metrics)
        snapshots = _periodic(settings.snapshot_interval_s, engine.write_snapshots, "meds-snapshots")
        checkpoints = _periodic(1.0, store.checkpoint, "meds-checkpoints")
        metrics_server = _metrics_port(settings, metrics)
        metrics.watch_memory(engine.totals)
        app.state.engine = engine
        app.state.views = CollapseViews(engine)
        try:
            await run_in_threadpool(refitter.warm_up)
            await run_in_threadpool(engine.load)
            # Library modules and the loaded memory are long-lived: keep the cyclic GC from rescanning them
            # (a full collection over them stalled every other large request by ~100 ms).
            gc.collect()
            gc.freeze()
            metrics_server.start()
            background.start()
            snapshots.start()
            checkpoints.start()
            # The kNN reference tier's library, off the start-up path but before a near-tie needs it.
            threading.Thread(target=_load_reference, args=(metrics,), name="meds-load-reference", daemon=True).start()
            log.info("meds %s ready: store %s, %d runs", __version__, store.info(), len(engine.run_names()))
            yield
        finally:
            metrics_server.stop()
            background.stop()
            snapshots.stop()
            checkpoints.stop()
            try:
                engine.write_snapshots()  # a clean shutdown leaves current snapshots behind
            except Exception:
                log.exception("writing index snapshots at shutdown failed")
            refitter.close()
            store.close()

    app = FastAPI(
        title="meds",
        version=__version__,
        summary="MEDS reward shaping: penalise a wrong rollout by the size of the error cluster it repeats.",
        lifespan=lifespan,
        docs_url=None,  # served below from the package's own assets, never from a CDN
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_open() else None,
    )
    app.state.settings = settings
    app.state.keys = settings.keyring()
    app.state.metrics = metrics
    app.state.admission = Admission(
        settings.max_inflight_per_run, settings.max_inflight_total, max_retry_after_s=settings.max_retry_after_s,
        on_refusal=metrics.score_refused, on_change=metrics.score_in_flight.set,
    )  # fmt: skip
    errors.install(app)
    app.add_middleware(RequestContext, metrics=metrics, max_body_bytes=settings.max_body_bytes)
    app.include_router(health)
    app.include_router(v1)
    app.include_router(explorer)
    app.include_router(page)
    app.mount("/ui/static", ui_assets(), name="ui")

    if settings.metrics_enabled and settings.metrics_port is None:

        @app.get("/metrics", include_in_schema=False, dependencies=[PUBLIC])
        async def prometheus() -> Response:
            body = await run_in_threadpool(generate_latest, metrics.registry)  # the gauges read the store
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """The generated schema plus the bodies that routes decode themselves (ScoreRequest for speed)."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ScoreRequest, ReclusterRequest, ScoreColumnsRequest, ScoreColumnsResponse):
                extra = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(extra.pop("$defs", {}))
                components[model.__name__] = extra
            app.openapi_schema = publish_limits(schema, max_batch=settings.max_batch, max_dim=settings.max_dim)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    if settings.docs_open():
        _offline_docs(app)
    return app


def _offline_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc` whose every asset comes from this service (`/static/...`)."""
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
    oauth2_redirect = "/docs/oauth2-redirect"

    @app.get("/docs", include_in_schema=False, dependencies=[PUBLIC])
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=f"{root}{oauth2_redirect}",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/swagger-ui/favicon-32x32.png",
        )

    @app.get(oauth2_redirect, include_in_schema=False, dependencies=[PUBLIC])
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False, dependencies=[PUBLIC])
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_URL}/redoc/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/swagger-ui/favicon-32x32.png",
            with_google_fonts=False,
        )
