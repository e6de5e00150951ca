"""The vectorised hash index behaves like a dict, through growth and heavy collisions."""

from __future__ import annotations

import numpy as np

from meds_service.core.types import rollout_hashes
from meds_service.storage.idindex import IdIndex


def test_matches_a_dict_through_growth() -> None:
    rng = np.random.default_rng(0)
    index, reference = IdIndex(), {}
    for batch in range(40):
        hashes = np.unique(rng.integers(1, 2**63, size=int(rng.integers(1, 5000)), dtype=np.uint64))
        hashes = hashes[[int(h) not in reference for h in hashes]]
        values = rng.integers(0, 2**40, size=len(hashes))
        index.insert(hashes, values)
        reference.update(zip(hashes.tolist(), values.tolist(), strict=True))
        probe = np.concatenate([hashes[:50], rng.integers(1, 2**63, size=50, dtype=np.uint64)])
        want = [reference.get(int(h), -1) for h in probe]
        assert index.lookup(probe).tolist() == want, batch
    assert len(index) == len(reference) and index.nbytes >= 32 * len(reference)


def test_clustered_hashes_probe_correctly() -> None:
    index = IdIndex()
    hashes = np.arange(1, 3000, dtype=np.uint64) * np.uint64(4096)  # all collide on the low bits
    index.insert(hashes, np.arange(len(hashes), dtype=np.int64))
    assert index.lookup(hashes).tolist() == list(range(len(hashes)))
    assert index.lookup(np.array([7, 4096 * 5000], dtype=np.uint64)).tolist() == [-1, -1]


def test_rollout_hashes_are_stable_and_scoped_by_prompt() -> None:
    a = rollout_hashes(["p", "p", "q"], ["r1", "r2", "r1"])
    assert len(set(a.tolist())) == 3 and (a != 0).all()
    assert rollout_hashes(["p"], ["r1"])[0] == a[0]


def test_growth_places_hashes_crowded_at_the_end_of_the_table() -> None:
    """Growth places entries in one pass in order of home slot; those pushed past the last slot wrap around."""
    index = IdIndex()
    size = 2 * 1024
    # Homes in the last few slots of the grown table (and of the first one), all taken in a row on growth.
    hashes = (np.arange(1, 1500, dtype=np.uint64) << np.uint64(12)) | np.uint64(size * 2 - 3)
    for lo in range(0, len(hashes), 400):
        index.insert(hashes[lo : lo + 400], np.arange(lo, min(lo + 400, len(hashes)), dtype=np.int64))
    assert index.lookup(hashes).tolist() == list(range(len(hashes)))
    assert index.lookup(np.array([np.uint64(size * 2 - 3), np.uint64(5)], dtype=np.uint64)).tolist() == [-1, -1]
    assert len(index) == len(hashes) and index.nbytes >= 16 * 2 * len(hashes)


def test_growing_ahead_doubles_once_and_keeps_every_value() -> None:
    rng = np.random.default_rng(5)
    index = IdIndex()
    hashes = np.unique(rng.integers(1, 2**63, size=600, dtype=np.uint64))
    index.insert(hashes, np.arange(len(hashes), dtype=np.int64))
    size = index.capacity
    assert not index.grow_ahead(inserts=0)  # nothing more to come: no growth
    assert index.grow_ahead(inserts=100)  # far past the bound, yet one doubling
    assert index.capacity == 2 * size
    assert index.lookup(hashes).tolist() == list(range(len(hashes)))
