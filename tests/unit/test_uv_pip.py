"""`.ci/uv_pip.py`: uv gets the indexes, find-links and constraints pip is configured with."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest


def _module() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / ".ci" / "uv_pip.py"
    spec = importlib.util.spec_from_file_location("uv_pip", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PIP_CONFIG_LIST = """\
:env:.find-links='/opt/wheels'
global.find-links='/elsewhere'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.constraint='/etc/xdg/pip/constraints.txt'
install.index-url='https://mirror.example/simple'
global.index-url='https://ignored.example/simple'
:env:.default-timeout='180'
global.cert='/etc/ssl/certs/ca-certificates.crt'
"""


def test_pip_configuration_becomes_uv_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    uv_pip = _module()

    def fake_run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        assert argv[1:] == ["-m", "pip", "config", "list"]
        return subprocess.CompletedProcess(argv, 0, PIP_CONFIG_LIST, "")

    monkeypatch.setattr(uv_pip.subprocess, "run", fake_run)
    args, env = uv_pip.uv_arguments(uv_pip.pip_settings("python"))
    assert args == [
        "--index-strategy", "unsafe-best-match",
        "--extra-index-url", "file:///opt/pypi/simple", "--extra-index-url", "file:///opt/pypi-more/simple",
        "--find-links", "/opt/wheels",  # the environment wins over the global file, as in pip
        "--constraint", "/etc/xdg/pip/constraints.txt",
        "--index-url", "https://mirror.example/simple",  # [install] wins over [global]
    ]  # fmt: skip
    assert env == {"UV_HTTP_TIMEOUT": "180", "SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
