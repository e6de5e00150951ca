"""`score_columns` against a real service: the same answers as `score` with `Rollout` objects, through
chunking and degraded mode, on both clients and both wire forms."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.server import free_port, thread_server
from meds_client import AsyncMedsClient, MedsClient, Rollout, ScoreResults
from meds_service.settings import Settings

PROMPTS, PER_PROMPT, DIM = 6, 8, 5


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = Settings(data_dir=Path(tmp_path_factory.mktemp("columns")) / "data", refit_interval_s=0.05)
    with thread_server(settings) as url:
        yield url


def step_columns(rng: np.random.Generator, tag: str) -> dict[str, Any]:
    """One step: every prompt's rollouts, wrong ones near one of two error modes per prompt."""
    n = PROMPTS * PER_PROMPT
    prompt = np.repeat(np.arange(PROMPTS), PER_PROMPT)
    modes = np.random.default_rng(0).normal(size=(PROMPTS, 2, DIM)) * 4  # the same modes every step
    correct = rng.random(n) < 0.3
    fingerprints = modes[prompt, rng.integers(0, 2, n)] + rng.normal(size=(n, DIM)) * 0.3
    return {
        "rollout_ids": [f"{tag}-{i}" for i in range(n)],
        "prompt_ids": [f"prompt-{p}" for p in prompt.tolist()],
        "correct": correct,
        "fingerprints": fingerprints.astype(np.float32),
        "rewards": np.where(correct, 1.0, 0.0),
    }


def as_rollouts(step: dict[str, Any]) -> list[Rollout]:
    return [
        Rollout(rid, pid, correct=bool(c), fingerprint=fp, reward=None if np.isnan(r) else float(r))
        for rid, pid, c, fp, r in zip(step["rollout_ids"], step["prompt_ids"], step["correct"],
                                      step["fingerprints"], step["rewards"], strict=True)
    ]  # fmt: skip


def call(kind: str, base_url: str, method: str, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """One call on a fresh client of `kind` (keyword `options` configure it); returns (answer, stats)."""
    options = kwargs.pop("options", {})
    if kind == "sync":
        with MedsClient(base_url, **options) as client:
            return getattr(client, method)(*args, **kwargs), client.stats

    async def run() -> tuple[Any, Any]:
        async with AsyncMedsClient(base_url, **options) as client:
            return await getattr(client, method)(*args, **kwargs), client.stats

    return asyncio.run(run())


def columns_kwargs(step: dict[str, Any]) -> dict[str, Any]:
    return {name: step[name] for name in ("rollout_ids", "prompt_ids", "correct", "fingerprints", "rewards")}


def assert_same(got: ScoreResults, want: ScoreResults) -> None:
    assert got == want  # every field of every result, in order
    np.testing.assert_array_equal(got.penalties, want.penalties)
    np.testing.assert_array_equal(got.status_codes, want.status_codes)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("wire", ["json", "msgpack"])
def test_columns_answer_exactly_as_rollout_objects(base_url: str, kind: str, wire: str) -> None:
    """Two runs fed the same steps, one through each API, with refits settled between steps."""
    rng = np.random.default_rng(3)
    runs = {"objects": f"obj-{kind}-{wire}", "columns": f"col-{kind}-{wire}"}
    penalised = 0
    for epoch in range(4):
        step = step_columns(rng, f"e{epoch}")
        want, _ = call(kind, base_url, "score", runs["objects"], as_rollouts(step), step=epoch, options={"wire": wire})
        got, _ = call(kind, base_url, "score_columns", runs["columns"], **columns_kwargs(step), step=epoch,
                      options={"wire": wire})  # fmt: skip
        assert_same(got, want)
        assert got.metrics == want.metrics
        penalised += int((got.penalties > 0).sum())
        for run in runs.values():
            call(kind, base_url, "recluster", run)
    assert penalised > 0  # the memory did cluster: the comparison covered real penalties


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_large_batches_are_chunked_by_prompt_like_objects(base_url: str, kind: str) -> None:
    rng = np.random.default_rng(5)
    options = {"max_batch_rollouts": 2 * PER_PROMPT + 3}  # two prompts a request: three requests a step
    for epoch in range(3):
        step = step_columns(rng, f"chunk-e{epoch}")
        order = rng.permutation(PROMPTS * PER_PROMPT)  # prompts interleaved: the chunks must regroup them
        step = {name: [values[i] for i in order] if isinstance(values, list) else values[order]
                for name, values in step.items()}  # fmt: skip
        want, _ = call(kind, base_url, "score", f"chunk-obj-{kind}", as_rollouts(step), options=options)
        got, stats = call(kind, base_url, "score_columns", f"chunk-col-{kind}", **columns_kwargs(step), options=options)
        assert_same(got, want)
        assert got.rollout_ids == step["rollout_ids"]
        assert stats.requests == PROMPTS // 2
        for run in (f"chunk-obj-{kind}", f"chunk-col-{kind}"):
            call(kind, base_url, "recluster", run)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unsendable_rows_are_degraded_like_objects(base_url: str, kind: str) -> None:
    step = step_columns(np.random.default_rng(7), f"bad-{kind}")
    step["fingerprints"][3, 1] = np.nan
    step["fingerprints"][10, 0] = np.inf
    step["rewards"][20] = np.inf
    options = {"on_error": "zero"}
    got, stats = call(kind, base_url, "score_columns", f"bad-col-{kind}", **columns_kwargs(step), options=options)
    want, _ = call(kind, base_url, "score", f"bad-obj-{kind}", as_rollouts(step), options=options)
    assert_same(got, want)
    assert [i for i, s in enumerate(got.statuses) if s == "error"] == [3, 10, 20]
    assert stats.degraded_rollouts == 3 and stats.degraded_batches == 1
    with pytest.raises(ValueError, match="cannot be sent"):
        call(kind, base_url, "score_columns", f"bad-col-{kind}", **columns_kwargs(step))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_unreachable_service_degrades_every_chunk(kind: str) -> None:
    step = step_columns(np.random.default_rng(9), "down")
    options = {"on_error": "zero", "retries": 0, "max_batch_rollouts": PER_PROMPT}
    results, stats = call(kind, f"http://127.0.0.1:{free_port()}", "score_columns", "down", **columns_kwargs(step),
                          options=options)  # fmt: skip
    assert set(results.statuses) == {"error"} and not results.penalties.any()
    assert results.rollout_ids == step["rollout_ids"]
    assert stats.degraded_batches == PROMPTS and stats.degraded_rollouts == PROMPTS * PER_PROMPT


def test_generated_ids_are_fresh_and_given_ids_are_idempotent(base_url: str) -> None:
    step = step_columns(np.random.default_rng(11), "ids")
    with MedsClient(base_url) as client:
        fresh = [client.score_columns("ids", prompt_ids=step["prompt_ids"], fingerprints=step["fingerprints"])
                 for _ in range(2)]  # fmt: skip
        assert all(set(r.statuses) == {"scored"} for r in fresh)
        assert len(set(fresh[0].rollout_ids) | set(fresh[1].rollout_ids)) == 2 * len(step["prompt_ids"])
        first = client.score_columns("ids", **columns_kwargs(step))
        again = client.score_columns("ids", **columns_kwargs(step))
        assert set(again.statuses) == {"duplicate"}
        np.testing.assert_array_equal(again.penalties, first.penalties)
        skipped = client.score_columns("ids", prompt_ids=["p", "q"], correct=[True, None])
        assert skipped.statuses == ["skipped", "skipped"]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"prompt_ids": ["p", "q"], "rewards": [1.0]}, "rewards must be 2 numbers"),
        ({"prompt_ids": ["p", "q"], "fingerprints": np.ones(2, np.float32)}, "2-D array of 2 non-empty rows"),
        ({"prompt_ids": ["p", "q"], "fingerprints": np.ones((2, 0), np.float32)}, "2-D array of 2 non-empty rows"),
        ({"prompt_ids": ["p", "q"], "correct": [1, 2]}, "other than 1, 0 and -1"),
        ({"prompt_ids": ["p", "q"], "rollout_ids": ["a", "a"]}, "appears twice"),
        ({"prompt_ids": ["p", ""]}, "prompt_id must be a string of 1 to 512"),
        ({"prompt_ids": ["p"], "rollout_ids": ["a", "b"]}, "rollout_ids has 2 entries for 1"),
    ],
)
def test_malformed_columns_raise_before_anything_is_sent(columns: dict[str, Any], message: str) -> None:
    with MedsClient(f"http://127.0.0.1:{free_port()}", on_error="zero") as client:
        with pytest.raises(ValueError, match=message):
            client.score_columns("run", **columns)
        assert client.stats.requests == 0
