"""Fault-injection points: the MEDS_FAULT_POINTS grammar, when a point fires, that an armed point really
SIGKILLs its process, and that nothing can arm one in production."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from meds_service import cli, faults
from meds_service.faults import FaultPlan, FaultSpecError, Trigger
from meds_service.settings import Settings

SERVICE = Path(__file__).resolve().parents[2] / "service" / "meds_service"


@pytest.fixture(autouse=True)
def _disarmed() -> Iterator[None]:
    """Points are process-wide: no test leaves one armed for the next (it would kill the test run)."""
    faults.disarm()
    yield
    faults.disarm()


def test_parse_reads_probabilities_and_hit_numbers() -> None:
    spec = " sqlite.commit.after_write:0.3 , score.before_ack:@2,redis.commit.after_script:1 "
    assert faults.parse(spec) == {
        "sqlite.commit.after_write": Trigger(probability=0.3),
        "score.before_ack": Trigger(on_hit=2),
        "redis.commit.after_script": Trigger(probability=1.0),
    }
    assert faults.parse("") == {} and faults.parse(" , ") == {}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("sqlite.commit.after_wirte:0.5", "unknown fault point 'sqlite.commit.after_wirte'"),
        ("score.before_ack", "needs a rule"),
        ("score.before_ack:0", "needs a rule"),
        ("score.before_ack:1.5", "needs a rule"),
        ("score.before_ack:nan", "needs a rule"),
        ("score.before_ack:@0", "needs a rule"),
        ("score.before_ack:@x", "needs a rule"),
        ("score.before_ack:0.1,score.before_ack:@3", "named twice"),
    ],
)
def test_parse_refuses_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(FaultSpecError, match=re.escape(message)):
        faults.parse(spec)


def test_on_hit_fires_on_that_hit_only() -> None:
    plan = FaultPlan({"score.before_ack": Trigger(on_hit=3)})
    assert [plan.fires("score.before_ack") for _ in range(5)] == [0, 0, 3, 0, 0]
    assert plan.fires("sqlite.commit.after_write") == 0  # not armed


def test_probabilities_are_repeatable_per_seed_and_independent_per_point() -> None:
    triggers = {"sqlite.commit.after_write": Trigger(probability=0.3), "score.before_ack": Trigger(probability=0.3)}

    def draws(plan: FaultPlan, name: str) -> list[bool]:
        return [bool(plan.fires(name)) for _ in range(200)]

    first = draws(FaultPlan(triggers, seed=7), "score.before_ack")
    assert first == draws(FaultPlan(triggers, seed=7), "score.before_ack")
    assert first != draws(FaultPlan(triggers, seed=8), "score.before_ack")
    # A point's draws do not depend on how often the others were hit.
    busy = FaultPlan(triggers, seed=7)
    draws(busy, "sqlite.commit.after_write")
    assert draws(busy, "score.before_ack") == first
    assert 30 <= sum(first) <= 90  # about 0.3 of 200
    assert all(draws(FaultPlan({"score.before_ack": Trigger(probability=1.0)}), "score.before_ack"))


def test_an_unarmed_point_does_nothing() -> None:
    assert not faults.armed()
    for name in faults.POINTS:
        faults.point(name)
    faults.arm("")
    assert not faults.armed()


def test_an_armed_point_sigkills_its_process_on_the_chosen_hit() -> None:
    code = (
        "from meds_service import faults\n"
        "faults.arm('score.before_ack:@2,sqlite.commit.after_write:@1')\n"
        "faults.point('score.before_ack'); print('after hit 1', flush=True)\n"
        "faults.point('score.before_ack'); print('after hit 2', flush=True)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout.splitlines() == ["after hit 1"]
    assert done.stderr.strip() == "meds: fault point score.before_ack fired on hit 2: SIGKILL"


def test_production_refuses_fault_points() -> None:
    with pytest.raises(FaultSpecError, match="refused in production"):
        faults.arm("score.before_ack:0.5", env="production")
    assert not faults.armed()
    faults.arm("", env="production")  # nothing armed: fine
    with pytest.raises(ValidationError, match="refused in production"):
        Settings(env="production", api_keys=["k" * 32], fault_points="score.before_ack:@1")
    with pytest.raises(ValidationError, match="unknown fault point"):
        Settings(fault_points="score.after_ack:@1")


def test_meds_serve_in_production_with_fault_points_is_a_startup_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli.logs, "configure", lambda *args: None)  # keep the test run's logging as it is
    monkeypatch.setenv("MEDS_ENV", "production")
    monkeypatch.setenv("MEDS_API_KEYS", "a-real-key-of-thirty-two-characters!")
    monkeypatch.setenv("MEDS_FAULT_POINTS", "sqlite.commit.after_commit:0.1")
    assert cli.main(["serve"]) == cli.EXIT_SETTINGS
    assert "refused in production" in capsys.readouterr().err
    assert not faults.armed()


def test_create_app_arms_from_settings_and_disarms_without(tmp_path: Path) -> None:
    from meds_service.app import create_app

    create_app(Settings(data_dir=tmp_path, fault_points="score.before_ack:@1000", fault_seed=3))
    assert faults.armed()
    create_app(Settings(data_dir=tmp_path))
    assert not faults.armed()


def test_every_point_in_the_code_is_listed_and_every_listed_point_is_in_the_code() -> None:
    called = [
        name
        for path in sorted(SERVICE.rglob("*.py"))
        for name in re.findall(r"faults\.point\(\"([^\"]+)\"\)", path.read_text())
    ]
    assert set(called) == set(faults.POINTS)
