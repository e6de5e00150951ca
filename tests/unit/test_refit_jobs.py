"""How refit work is dealt into jobs: balanced by vectors so that worker processes finish together."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meds_service.engine.refits import _batches, split_keys


@dataclass
class Head:
    live: int


@dataclass
class Run:
    keys: dict[Any, Head] = field(default_factory=dict)


def run_of(sizes: dict[str, int]) -> Any:
    return Run({key: Head(size) for key, size in sizes.items()})


def loads(jobs: list[list[str]], sizes: dict[str, int]) -> list[int]:
    return [sum(sizes[k] for k in job) for job in jobs]


def test_without_sizes_keys_are_dealt_round_robin() -> None:
    assert split_keys(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    assert split_keys(["a"], 4) == [["a"]]
    assert split_keys([], 3) == []


def test_with_sizes_the_largest_go_first_to_the_lightest_job() -> None:
    sizes = {"a": 1, "b": 10, "c": 8, "d": 1, "e": 9, "f": 1}
    jobs = split_keys(list(sizes), 2, sizes)
    assert sorted(k for job in jobs for k in job) == sorted(sizes)
    assert jobs == [["b", "a", "d", "f"], ["e", "c"]]
    assert loads(jobs, sizes) == [13, 17]


def test_balanced_within_the_largest_key_on_many_random_sets() -> None:
    import random

    rng = random.Random(7)
    for _ in range(200):
        sizes = {f"k{i}": rng.randint(1, 1500) for i in range(rng.randint(1, 80))}
        parts = rng.randint(1, 4)
        jobs = split_keys(list(sizes), parts, sizes)
        assert sorted(k for job in jobs for k in job) == sorted(sizes)
        assert len(jobs) == min(parts, len(sizes))
        spread = max(loads(jobs, sizes)) - min(loads(jobs, sizes))
        assert spread <= max(sizes.values())


def test_a_job_holds_at_most_max_keys() -> None:
    sizes = {"big": 100, **{f"s{i}": 1 for i in range(5)}}
    jobs = split_keys(list(sizes), 2, sizes, max_keys=3)
    assert sorted(len(job) for job in jobs) == [3, 3]


def test_background_jobs_share_few_keys_over_every_free_slot() -> None:
    """Keys that fit in the free slots are shared out: with two workers neither idles while the other
    fits every key (filling jobs in order would give one job of all 64 keys)."""
    sizes = {f"k{i:02d}": 700 + 13 * i for i in range(64)}
    jobs = list(_batches(list(sizes), run_of(sizes), 256, 50_000, 2))
    assert len(jobs) == 2
    assert max(loads(jobs, sizes)) - min(loads(jobs, sizes)) <= max(sizes.values())


def test_background_jobs_beyond_the_free_slots_are_filled_in_order_up_to_the_caps() -> None:
    sizes = {f"k{i:02d}": 10 for i in range(10)}
    jobs = list(_batches(list(sizes), run_of(sizes), 3, 1_000, 2))
    assert jobs == [list(sizes)[i : i + 3] for i in range(0, 10, 3)]
    jobs = list(_batches(list(sizes), run_of(sizes), 100, 25, 2))
    assert [len(job) for job in jobs] == [2, 2, 2, 2, 2]
