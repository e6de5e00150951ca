"""The `meds` command line."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from meds_service import cli


@pytest.fixture(autouse=True)
def _keep_root_logger() -> Iterator[None]:
    """`main` configures process-wide logging; give the next test the root logger as it was."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_serve_takes_flags_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    calls: list[Any] = []
    monkeypatch.setattr(cli, "serve", calls.append)
    monkeypatch.setenv("MEDS_PORT", "9999")
    monkeypatch.setenv("MEDS_LOG_FORMAT", "json")
    argv = ["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path), "--log-format", "text", "--log-level", "warning"]
    assert cli.main(argv) == 0
    [settings] = calls
    assert settings.host == "0.0.0.0" and settings.port == 9999 and settings.data_dir == tmp_path
    assert settings.log_format == "text" and settings.log_level == "warning"


def test_worker_without_redis_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["worker", "--log-format", "text"]) == cli.EXIT_SETTINGS
    [line] = capsys.readouterr().err.splitlines()
    assert "set MEDS_REDIS_URL" in line


def test_bad_settings_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDS_ENV", "production")
    assert cli.main(["serve"]) == 2
    assert "MEDS_API_KEYS" in capsys.readouterr().err


def test_command_is_required() -> None:
    with pytest.raises(SystemExit):
        cli.main([])
