"""The test run's file order (tests/conftest.py): every file it names exists, so a renamed slow file is not
silently scheduled last again."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import SLOW_FILES

ROOT = Path(__file__).resolve().parents[2]


def test_every_slow_file_exists_once() -> None:
    assert [path for path in SLOW_FILES if not (ROOT / path).is_file()] == []
    assert len(set(SLOW_FILES)) == len(SLOW_FILES)
