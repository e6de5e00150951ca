"""The `meds` command line."""

from __future__ import annotations

from typing import Any

import pytest

from meds_service import cli


def test_serve_runs_uvicorn_with_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    calls: dict[str, Any] = {}
    monkeypatch.setattr(cli.uvicorn, "run", lambda app, **kw: calls.update(app=app, **kw))
    monkeypatch.setenv("MEDS_PORT", "9999")
    assert cli.main(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path)]) == 0
    assert calls["host"] == "0.0.0.0" and calls["port"] == 9999
    assert calls["app"].state.settings.data_dir == tmp_path


def test_bad_settings_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDS_ENV", "production")
    assert cli.main(["serve"]) == 2
    assert "MEDS_API_KEYS" in capsys.readouterr().err


def test_command_is_required() -> None:
    with pytest.raises(SystemExit):
        cli.main([])
