"""Shared fixtures: settings on a temporary data folder and real servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from harness.redis_server import RedisServer
from harness.server import thread_server
from meds_service.settings import Settings
from tests.support.redis_cluster import RedisClusterServer

# The slowest test files, slowest first (measured: `--durations` of a full run). `make test` spreads whole files
# over its processes in collection order (pytest-xdist `--dist loadfile --no-loadscope-reorder`): a long file
# handed out last keeps one process busy after the others ran dry, so these start first and the many short
# files fill the gaps at the end. A file not listed runs after them, in the usual order.
SLOW_FILES = (
    "tests/reliability/test_crash_loop.py",
    "tests/e2e/test_trainer_verl.py",
    "tests/reliability/test_sigkill.py",
    "tests/e2e/test_scale_out.py",
    "tests/deploy/test_compose_stack.py",
    "tests/client/test_client_contract.py",
    "tests/integration/test_bench_curves_smoke.py",
    "tests/deploy/test_wheels.py",
    "tests/client/test_client_collapse.py",
    "tests/integration/test_concurrency.py",
    "tests/deploy/test_container_path.py",
    "tests/reliability/test_event_loop.py",
    "tests/integration/test_bench_smoke.py",
    "tests/integration/test_serve_process.py",
    "tests/reliability/test_redis_locks.py",
    "tests/reliability/test_orphans.py",
    "tests/e2e/test_trainer_openrlhf.py",
    "tests/e2e/test_experiment_smoke.py",
    "tests/integration/test_bench_gpu_smoke.py",
    "tests/reliability/test_redis_outage.py",
    "tests/reliability/test_storage_faults.py",
    "tests/e2e/test_reference_trace.py",
    "tests/reliability/test_load.py",
    "tests/e2e/test_redis_cluster.py",
    "tests/contract/test_openapi_fuzz.py",
    "tests/contract/test_engine_contract.py",
    "tests/unit/test_clustering.py",
    "tests/unit/test_api.py",
    "tests/unit/test_knn.py",
    "tests/unit/test_auth.py",
    "tests/unit/test_engine.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow files first (SLOW_FILES); the order of tests within a file is kept."""
    rank = {path: i for i, path in enumerate(SLOW_FILES)}
    root = config.rootpath
    items.sort(key=lambda item: rank.get(item.path.relative_to(root).as_posix(), len(rank)))


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"data_dir": tmp_path / "data", "refit_interval_s": 0.05}
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def start_server(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    """Start real uvicorn servers (threads) with given settings; all stop at teardown."""
    with ExitStack() as stack:

        def start(settings: Settings | None = None, **overrides: Any) -> str:
            return stack.enter_context(thread_server(settings or make_settings(**overrides)))

        yield start


@pytest.fixture
def meds_server(start_server: Callable[..., str]) -> str:
    """Base URL of a real service on the embedded store, refits in worker processes."""
    return start_server()


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session (AOF, fsync always) on a free port."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_session: RedisServer) -> str:
    """A clean Redis for one test."""
    redis_session.flush()
    return redis_session.url


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (AOF, fsync always), which the test may kill and restart."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServer]:
    """One real 3-master Redis Cluster for the session (AOF, fsync always), joined by `redis-cli --cluster`."""
    cluster = RedisClusterServer(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterServer) -> str:
    """A clean Redis Cluster for one test: the URL of one of its nodes."""
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(params=["redis", "redis-cluster"])
def redis_target(request: pytest.FixtureRequest) -> tuple[str, bool]:
    """(URL, cluster) of a clean single Redis, then of a clean 3-master Redis Cluster."""
    if request.param == "redis-cluster":
        return request.getfixturevalue("redis_cluster_url"), True
    return request.getfixturevalue("redis_url"), False
