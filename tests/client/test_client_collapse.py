"""`ScoreResults.metrics` against a live service: the batch's error-collapse metrics in both wire forms, a
batch split into several requests combined exactly, and the trainer integrations' `meds/*` keys."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from meds_client import MedsClient, Rollout
from meds_client._types import COLLAPSE_METRICS
from meds_client.integrations._shaping import METRIC_PREFIX, Shaping


def batch(step: int, prompts: int = 6, per_prompt: int = 8) -> list[Rollout]:
    rng = np.random.default_rng(step)
    modes = np.random.default_rng(1).standard_normal((prompts, 3, 6)) * 3
    return [
        Rollout(
            rollout_id=f"s{step}-p{p}-r{r}",
            prompt_id=f"q{p}",
            correct=r % 4 == 0,
            fingerprint=(modes[p, int(rng.integers(3))] + rng.standard_normal(6) * 0.05).astype(np.float32),
            text=f"text of s{step}-p{p}-r{r}",
        )
        for p in range(prompts)
        for r in range(per_prompt)
    ]


@pytest.mark.parametrize("wire", ["json", "msgpack"])
def test_metrics_whole_and_split_agree(meds_server: str, wire: str) -> None:
    whole = MedsClient(meds_server, wire=wire)  # type: ignore[arg-type]
    split = MedsClient(meds_server, wire=wire, max_batch_rollouts=16)  # type: ignore[arg-type]  # 2 prompts a request
    whole.put_run(f"whole-{wire}", {"text_max_chars": 40})
    for step in range(3):
        a = whole.score(f"whole-{wire}", batch(step), step=step)
        b = split.score(f"split-{wire}", batch(step), step=step)
        assert list(a.metrics) == list(COLLAPSE_METRICS)
        assert b.metrics == pytest.approx(a.metrics)
    assert a.metrics["repeat_rate"] > 0 and a.metrics["penalised_fraction"] > 0
    logged = Shaping.from_results(a, [r.correct for r in batch(2)]).metrics()
    assert {f"{METRIC_PREFIX}{name}": value for name, value in a.metrics.items()}.items() <= logged.items()
    whole.recluster(f"whole-{wire}", all=True)
    view = httpx.get(f"{meds_server}/v1/runs/whole-{wire}/collapse/q0").json()["groups"]["wrong"]
    examples = [text for cluster in view["clusters"].values() for text in cluster["examples"]]
    assert examples and all(text.startswith("text of s") for text in examples)  # Rollout.text reached the store
    whole.close()
    split.close()
