"""A plain implementation of docs/architecture.md, "The algorithm", written from the paper's reference code,
for exactness tests.

Deliberately naive: Python dicts and lists, one scikit-learn NearestNeighbors per rollout and a public
`hdbscan.HDBSCAN` refit of every touched key after every step, as the reference trainer does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import hdbscan
import numpy as np
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import normalize


@dataclass
class RefRollout:
    rollout_id: str
    prompt_id: str
    correct: bool | None
    fingerprint: list[float] | None
    reward: float | None = None


@dataclass
class RefResult:
    cluster: int | None
    cluster_size: int
    penalty: float
    shaped_reward: float | None


@dataclass
class ReferenceMEDS:
    alpha: float = 0.1
    beta: float = 0.2
    knn_k: int = 3
    penalty_target: str = "wrong"
    noise_policy: str = "cluster"
    layer_diff: bool = False
    last_n_layers: int | None = None
    min_cluster_size: int = 2
    min_samples: int = 1
    cluster_selection_method: str = "eom"
    max_memory_per_key: int | None = None  # not in the paper: keep only the newest vectors of each key
    state: dict[tuple[str, int], dict[str, list[Any]]] = field(default_factory=dict)
    refit_seconds: float = 0.0  # time spent in synchronous refits (the benchmark reports it)
    refits: int = 0

    def seed(self, key: tuple[str, int], fingerprints: list[list[float]]) -> None:
        """Give a key earlier memory, fitted as after the reference's last step over it."""
        self.state[key] = {"vectors": [self._vector(fp) for fp in fingerprints], "labels": []}
        self._refit(key)

    def _vector(self, fingerprint: list[float]) -> np.ndarray:
        vec = np.array(fingerprint, dtype=float)
        if self.layer_diff:
            vec = np.diff(vec)
        if self.last_n_layers is not None and len(vec) >= self.last_n_layers:
            vec = vec[-self.last_n_layers :]
        return vec

    def _classify(self, key: tuple[str, int], vec: np.ndarray) -> int:
        x = np.stack(self.state[key]["vectors"], axis=0)
        labels = np.array(self.state[key]["labels"], dtype=int)
        nn = NearestNeighbors(n_neighbors=min(self.knn_k, len(x)), metric="cosine", algorithm="brute")
        nn.fit(x)
        _, indices = nn.kneighbors(vec.reshape(1, -1))
        values, counts = np.unique(labels[indices[0]], return_counts=True)
        return int(values[np.argmax(counts)])

    def _refit(self, key: tuple[str, int]) -> None:
        started = time.perf_counter()
        self._fit(key)
        self.refit_seconds += time.perf_counter() - started
        self.refits += 1

    def _fit(self, key: tuple[str, int]) -> None:
        vectors = self.state[key]["vectors"]
        if len(vectors) < 2:
            self.state[key]["labels"] = [-1] * len(vectors)
            return
        x = normalize(np.stack(vectors, axis=0), norm="l2")
        model = hdbscan.HDBSCAN(
            min_cluster_size=self.min_cluster_size,
            min_samples=self.min_samples,
            metric="euclidean",
            cluster_selection_method=self.cluster_selection_method,
        )
        self.state[key]["labels"] = model.fit_predict(x).tolist()

    def step(self, rollouts: list[RefRollout]) -> dict[str, RefResult]:
        grouped: dict[tuple[str, int], list[tuple[RefRollout, np.ndarray]]] = {}
        for r in rollouts:
            if r.fingerprint is not None:
                group = 2 if r.correct is None else int(r.correct)
                grouped.setdefault((r.prompt_id, group), []).append((r, self._vector(r.fingerprint)))
        predicted: dict[str, tuple[int | None, int]] = {}
        for key, samples in grouped.items():
            state = self.state.setdefault(key, {"vectors": [], "labels": []})
            labels = np.array(state["labels"], dtype=int)
            has_labels = len(labels) > 0 and len(labels) == len(state["vectors"])
            for r, vec in samples:
                if has_labels:
                    label = self._classify(key, vec)
                    predicted[r.rollout_id] = (label, int(np.sum(labels == label)))
                else:
                    predicted[r.rollout_id] = (None, 0)
            for _, vec in samples:
                state["vectors"].append(vec)
            if self.max_memory_per_key is not None:
                state["vectors"] = state["vectors"][-self.max_memory_per_key :]
            self._refit(key)
        return {r.rollout_id: self._result(r, predicted.get(r.rollout_id)) for r in rollouts}

    def _result(self, r: RefRollout, prediction: tuple[int | None, int] | None) -> RefResult:
        if prediction is None:  # skipped: no fingerprint
            return RefResult(None, 0, 0.0, r.reward)
        label, size = prediction
        target = self.penalty_target
        if (r.correct is True and target in ("wrong", "none")) or (
            r.correct is False and target in ("correct", "none")
        ):
            size = 0
        if r.correct is None and target == "none":
            size = 0
        if self.noise_policy == "ignore" and label == -1:
            size = 0
        penalised = (r.correct is False and target in ("wrong", "both")) or (
            r.correct is True and target in ("correct", "both")
        )
        penalty = min(self.alpha * math.log(size + 1), self.beta) if penalised else 0.0
        shaped = None
        if r.reward is not None:
            if r.correct is False:
                shaped = r.reward - penalty
            elif r.correct is True:
                shaped = r.reward / (1 + penalty)
            else:
                shaped = r.reward
        return RefResult(label, size, penalty, shaped)


def assert_matches_reference(results: list[dict[str, Any]], expected: dict[str, RefResult]) -> None:
    """Every answered rollout has the reference's cluster size, penalty and shaped reward, exactly."""
    for item in results:
        want = expected[str(item["rollout_id"])]
        got = (item["cluster_size"], item["penalty"], item["shaped_reward"])
        assert got == (want.cluster_size, want.penalty, want.shaped_reward), item["rollout_id"]
