"""The image's install and start commands, run here without a Docker engine.

The CPU variant's builder steps (COPY into a build folder, the RUN lines) run in a clean virtualenv in place
of /opt/meds, then the runtime's ENTRYPOINT + CMD start with the runtime's ENV, and /readyz and the image's
HEALTHCHECK command must pass. Paths are the only change: /opt/meds, /src and /data become temporary folders,
and the port is a free one. The base image, apt-get and the non-root user are not exercised.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from harness.server import free_port, wait_ready

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
API_KEY = "compose-test-key-0123456789abcdef0123456789abcdef"  # production wants 32+ characters


# ---- the Dockerfile ------------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped, as Docker reads them."""
    joined: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending = (pending + " " + stripped.removesuffix("\\").strip()).strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            joined.append((keyword.upper(), arguments.strip()))
            pending = ""
    return joined


def _stage(name: str) -> list[tuple[str, str]]:
    """The instructions of one build stage (`FROM ... AS name`)."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for keyword, arguments in _instructions():
        if keyword == "FROM":
            current = stages.setdefault(arguments.split()[-1], [])
        elif current is not None:
            current.append((keyword, arguments))
    return stages[name]


def _env_instruction(arguments: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in shlex.split(arguments))


def _exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list), f"{arguments}: use the exec form"
    return [str(part) for part in value]


@pytest.mark.slow
def test_the_images_install_and_start_commands_serve_in_a_clean_venv(tmp_path: Path) -> None:
    prefix, src, data = tmp_path / "opt-meds", tmp_path / "src", tmp_path / "data"
    relocate = {"/opt/meds": str(prefix), "/data": str(data)}

    def local(text: str) -> str:
        for image_path, here in relocate.items():
            text = re.sub(rf"{re.escape(image_path)}(?=[/\s\"':]|$)", here, text)
        return text

    build_env = {**os.environ, "VARIANT": "cpu", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    src.mkdir()
    workdir = src
    ran = []
    for keyword, arguments in _stage("builder"):
        if keyword == "WORKDIR":
            assert arguments == "/src"
        elif keyword == "COPY":
            *sources, target = shlex.split(arguments)
            destination = src / target
            for source in sources:
                origin = ROOT / source
                if origin.is_dir():
                    shutil.copytree(origin, destination, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    shutil.copy2(origin, destination / source if target.endswith("/") else destination)
        elif keyword == "RUN" and not arguments.startswith("apt-get"):  # system packages: the base image's
            command = local(arguments).replace("python3.11 -m venv", f"{sys.executable} -m venv")
            result = subprocess.run(["bash", "-c", command], cwd=workdir, env=build_env,
                                    capture_output=True, text=True, timeout=900)  # fmt: skip
            assert result.returncode == 0, f"RUN {arguments}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
            assert "deprecat" not in (result.stdout + result.stderr).lower(), result.stderr[-3000:]
            ran.append(arguments)
    assert any("pip install" in command and " ." in command for command in ran), "the service install did not run"

    runtime = _stage("runtime")
    env = {**os.environ}
    for keyword, arguments in runtime:
        if keyword == "ENV":
            env.update({key: local(value.replace("${PATH}", os.environ["PATH"]))
                        for key, value in _env_instruction(arguments).items()})  # fmt: skip
    [entrypoint] = [_exec_form(a) for k, a in runtime if k == "ENTRYPOINT"]
    [cmd] = [_exec_form(a) for k, a in runtime if k == "CMD"]
    [healthcheck] = [a for k, a in runtime if k == "HEALTHCHECK"]
    assert env["MEDS_HOST"] == "0.0.0.0" and env["MEDS_DATA_DIR"] == str(data)
    port = free_port()
    env.update({"MEDS_PORT": str(port), "MEDS_REFIT_WORKERS": "1"})
    data.mkdir()
    executable = shutil.which(entrypoint[0], path=env["PATH"])
    assert executable == str(prefix / "bin" / "meds"), "ENTRYPOINT must resolve to the image's virtualenv"
    process = subprocess.Popen([executable, *entrypoint[1:], *cmd], cwd=data, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc=process)  # type: ignore[arg-type]
        check = _exec_form(healthcheck.split(" CMD ", 1)[1])
        health = subprocess.run([shutil.which(check[0], path=env["PATH"]) or check[0], *check[1:]], env=env,
                                capture_output=True, text=True, timeout=30)  # fmt: skip
        assert health.returncode == 0, health.stderr
        assert (data / "meds.sqlite3").exists(), "the embedded store must live in the image's data volume"
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output[-3000:]
