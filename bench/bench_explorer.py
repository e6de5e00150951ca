"""How fast the explorer's routes answer on a large run: 10,000 prompts and 1,000,000 stored wrong rollouts
(100 per prompt over 10 epochs), every key fitted, in the embedded store.

The store is written directly (the scoring path has its own benchmark), with labels drawn so that some
prompts collapse onto one cluster; then the real service opens it and the summary, ranking pages and a
prompt's view are timed over HTTP, cold (the first read builds the run's table) and warm.

    python -m bench.bench_explorer               # 10,000 prompts x 100 rollouts
    python -m bench.bench_explorer --prompts 500 # a small smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from meds_service.app import create_app
from meds_service.core.config import RunConfig
from meds_service.core.types import NO_CLUSTER32, RESULT_DTYPE, Fit, Group, KeyAppend, MemoryKey, ScoredBatch
from meds_service.settings import Settings
from meds_service.storage.sqlite import SQLiteStore

DIM = 14


def fill(data: Path, prompts: int, epochs: int, per_epoch: int, prompts_per_step: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    store = SQLiteStore(data, synchronous="OFF")
    config = RunConfig(dim=DIM)
    store.save_run("big", config)
    keys = [MemoryKey(f"prompt-{p:05d}", Group.WRONG) for p in range(prompts)]
    step = 0
    for epoch in range(epochs):
        for lo in range(0, prompts, prompts_per_step):
            appends = []
            for p in range(lo, min(lo + prompts_per_step, prompts)):
                results = np.zeros(per_epoch, dtype=RESULT_DTYPE)
                results["cluster"] = NO_CLUSTER32 if epoch == 0 else rng.integers(-1, 4, per_epoch)
                results["penalty"] = 0.0 if epoch == 0 else rng.choice([0.0, 0.0693, 0.1099, 0.2], per_epoch)
                vectors = rng.standard_normal((per_epoch, DIM)).astype(np.float32)
                ids = [f"e{epoch}-p{p}-r{r}" for r in range(per_epoch)]
                appends.append(KeyAppend(keys[p], epoch * per_epoch, vectors, 0, ids, results, step))
            store.commit("big", config, ScoredBatch(appends))
            step += 1
    n = epochs * per_epoch
    fits = []
    for p, key in enumerate(keys):
        spread = rng.integers(-1, 6, n)
        collapsed = np.where(rng.random(n) < 0.9, 0, spread)  # nearly everything in one cluster
        labels = collapsed if p % 10 == 0 else spread
        fits.append(Fit(key, labels.astype(np.int64), 0, n))
    store.save_fits("big", fits)
    store.close()
    return prompts * n


def timed(client: TestClient, path: str) -> tuple[float, int]:
    started = time.perf_counter()
    response = client.get(path)
    assert response.status_code == 200, response.text
    return time.perf_counter() - started, len(response.content)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-epoch", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder)
        started = time.perf_counter()
        rollouts = fill(data, args.prompts, args.epochs, args.per_epoch, prompts_per_step=1000)
        print(
            f"stored {rollouts:,} wrong rollouts of {args.prompts:,} prompts in {time.perf_counter() - started:.1f} s"
        )
        settings = Settings(data_dir=data, refit_processes=False, refit_background=False, snapshot_interval_s=0)
        started = time.perf_counter()
        with TestClient(create_app(settings)) as client:
            print(f"service loaded the store in {time.perf_counter() - started:.1f} s")
            for label, path in [
                ("summary (cold: builds the run's table)", "/v1/runs/big/summary"),
                ("summary (warm)", "/v1/runs/big/summary"),
                ("ranking, first page of 50", "/v1/runs/big/prompts?sort=collapse&limit=50"),
                ("ranking, page at offset 9,000", "/v1/runs/big/prompts?sort=collapse&offset=9000&limit=50"),
                ("ranking by cluster count", "/v1/runs/big/prompts?sort=clusters&limit=50"),
                ("one prompt's view", "/v1/runs/big/collapse/prompt-00010"),
            ]:
                seconds, size = timed(client, path)
                print(f"{label:44s} {1e3 * seconds:8.1f} ms  {size:8,d} bytes")


if __name__ == "__main__":
    main()
