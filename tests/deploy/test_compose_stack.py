"""The Compose stack, run here without a Docker engine, from the compose file's own commands.

Redis with the flags of the compose file's `redis` command, two `api` replicas and a `worker`, each started
from its compose `command` and `environment` (interpolated as Compose does, with the API key the `.env` would
give). Without Docker's network, the `redis` host name is mapped to 127.0.0.1 and each process gets a free
port. Prometheus and Grafana are not started.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from harness.server import free_port, wait_for, wait_ready

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
API_KEY = "compose-test-key-0123456789abcdef0123456789abcdef"  # production wants 32+ characters


# ---- docker-compose.yml --------------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def _interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `${VAR:?error}`."""

    def one(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3) or ""
        given = variables.get(name)
        if operator and operator.endswith("?"):
            if not given:
                raise AssertionError(f"compose would refuse to start: {argument}")
            return given
        if operator == ":-":
            return given or argument
        if operator == "-":
            return argument if given is None else given
        return given or ""

    return _VARIABLE.sub(one, value)


def _service(name: str, variables: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A compose service's command and environment, merged and interpolated as Compose does."""
    service = yaml.safe_load(COMPOSE.read_text())["services"][name]
    command = service.get("command", [])
    command = shlex.split(command) if isinstance(command, str) else [str(part) for part in command]
    environment = {key: _interpolate(str(value), variables) for key, value in service.get("environment", {}).items()}
    return [_interpolate(part, variables) for part in command], environment


@contextmanager
def _process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        process = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(30)


def _meds(command: list[str]) -> list[str]:
    """The image's ENTRYPOINT is `meds`: the same entry point, run with this interpreter."""
    return [sys.executable, "-m", "meds_service.cli", *command]


def _score(base: str, prompt: str, rollout: str, fingerprint: list[float]) -> dict[str, Any]:
    body = {"rollouts": [{"rollout_id": rollout, "prompt_id": prompt, "correct": False, "fingerprint": fingerprint}]}
    response = httpx.post(f"{base}/v1/runs/compose/score", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()["results"][0]
    return result


@pytest.mark.slow
@pytest.mark.redis
def test_the_compose_stack_runs_as_its_file_says(tmp_path: Path) -> None:
    variables = {"MEDS_API_KEYS": API_KEY}
    redis_command, _ = _service("redis", variables)
    assert redis_command[0] == "redis-server"
    redis_port = free_port()
    with ExitStack() as stack:
        # The compose command as it is, plus what the container's network and volume gave it.
        binary = shutil.which("redis-server")
        assert binary, "redis-server is required"
        argv = [binary, *redis_command[1:], "--port", str(redis_port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
        stack.enter_context(_process(argv, dict(os.environ), tmp_path / "redis.log"))
        client = redis.Redis(port=redis_port, decode_responses=True)
        wait_for(lambda: _pings(client), timeout=30)
        config = client.config_get("*")
        assert (config["appendonly"], config["appendfsync"], config["maxmemory-policy"]) == (
            "yes", "always", "noeviction")  # fmt: skip

        def environment(service: str) -> tuple[list[str], dict[str, str]]:
            command, env = _service(service, variables)
            assert env["MEDS_REDIS_URL"] == "redis://redis:6379/0"
            env["MEDS_REDIS_URL"] = f"redis://127.0.0.1:{redis_port}/0"  # Docker's DNS name for the redis service
            return command, {**os.environ, **env}

        bases = []
        for replica in range(2):
            command, env = environment("api")
            assert env["MEDS_ENV"] == "production" and env["MEDS_REFIT_BACKGROUND"] == "false"
            port = free_port()
            env["MEDS_PORT"] = str(port)  # compose maps the container's 8000; here each replica takes a port
            process = stack.enter_context(_process(_meds(command), env, tmp_path / f"api-{replica}.log"))
            bases.append(f"http://127.0.0.1:{port}")
            wait_ready(bases[-1], proc=process)  # type: ignore[arg-type]
        command, env = environment("worker")
        metrics_port = free_port()
        env["MEDS_WORKER_METRICS_PORT"] = str(metrics_port)
        worker = stack.enter_context(_process(_meds(command), env, tmp_path / "worker.log"))

        # Without the key, production refuses; with it, the two replicas share one memory.
        assert httpx.get(f"{bases[0]}/v1/runs", timeout=30).status_code == 401
        assert _score(bases[0], "p", "r0", [1.0, 0.0, 0.0])["cluster"] is None
        assert _score(bases[1], "p", "r1", [1.0, 0.1, 0.0])["cluster"] is not None  # saw r0 through Redis
        # Nobody reads prompt q again: only the worker refits it (the replicas leave refits to workers).
        _score(bases[0], "q", "r2", [0.0, 1.0, 0.0])

        def refitted() -> bool:
            stats = httpx.get(f"{bases[1]}/v1/runs/compose", timeout=30,
                              headers={"Authorization": f"Bearer {API_KEY}"}).json()["stats"]  # fmt: skip
            return bool(stats["pending_refits"] == 0 and stats["vectors"] == 3)

        wait_for(refitted, timeout=120)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        metrics = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
        assert re.search(r"^meds_refit_keys_total [1-9]", metrics, re.MULTILINE), "the worker refitted nothing"
        # The api's compose healthcheck, against a replica (the container's 8000 is the replica's port here).
        [check] = [yaml.safe_load(COMPOSE.read_text())["services"]["api"]["healthcheck"]["test"]]
        assert check[0] == "CMD"
        probe = [part.replace(":8000/", f":{bases[0].rsplit(':', 1)[1]}/") for part in check[2:]]
        assert subprocess.run([sys.executable, *probe], timeout=30).returncode == 0
    # The ExitStack stopped the worker and the replicas (SIGTERM), then Redis.


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
