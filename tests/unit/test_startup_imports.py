"""The service's own process starts without the fitting libraries: they are most of a start's CPU, and only
refit workers (which get them from their forkserver's preload) and the kNN reference tier need them."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("sklearn", "hdbscan", "scipy")


def test_importing_the_app_leaves_the_fitting_libraries_out() -> None:
    code = (
        "import json, sys; import meds_service.app, meds_service.cli; "
        f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert loaded == []


def test_the_reference_tier_still_finds_scikit_learn() -> None:
    import numpy as np

    from meds_service.core.knn import reference_vote

    history = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([0, 0, 1], dtype=np.int64)
    assert reference_vote(history, labels, np.array([1.0, 0.05]), 2) == 0
    assert reference_vote(history, labels, np.array([0.0, 1.0]), 1) == 1
