"""The service's own process starts without the fitting libraries: they are most of a start's CPU, and only
refit workers (which get them from their forkserver's preload) and the kNN reference tier need them."""

from __future__ import annotations

import json
import os
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


def test_a_ready_service_loads_the_reference_tier_in_the_background(tmp_path: object) -> None:
    """Not inside the first request that meets a near-tie: that request would wait seconds for the import."""
    code = (
        "import sys, time\n"
        "from fastapi.testclient import TestClient\n"
        "from meds_service.app import create_app\n"
        "from meds_service.settings import Settings\n"
        f"settings = Settings(data_dir={str(tmp_path)!r}, refit_processes=False)\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    assert client.get('/readyz').status_code == 200\n"
        "    deadline = time.monotonic() + 120\n"
        "    while 'sklearn.neighbors' not in sys.modules and time.monotonic() < deadline:\n"
        "        time.sleep(0.05)\n"
        "    print('sklearn.neighbors' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "True"


def test_what_the_background_import_creates_is_kept_from_the_cyclic_gc(tmp_path: object) -> None:
    """scikit-learn, SciPy and pandas are ~100,000 long-lived objects: left tracked, every full collection scans
    them again (tens of ms, inside whichever request triggered it). The service freezes them, as it froze
    everything else at start-up."""
    code = (
        "import gc, threading, time\n"
        "from fastapi.testclient import TestClient\n"
        "from meds_service.app import create_app\n"
        "from meds_service.settings import Settings\n"
        f"settings = Settings(data_dir={str(tmp_path)!r}, refit_workers=1)\n"
        "with TestClient(create_app(settings)) as client:\n"
        "    assert client.get('/readyz').status_code == 200\n"
        "    deadline = time.monotonic() + 120\n"
        "    while time.monotonic() < deadline and any(\n"
        "            t.name == 'meds-load-reference' for t in threading.enumerate()):\n"
        "        time.sleep(0.05)\n"
        "    import sklearn.neighbors\n"
        "    loaded = 'meds_knn_reference_loaded 1.0' in client.get('/metrics').text\n"
        "    print(len(gc.get_objects()), gc.get_freeze_count(), loaded)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    tracked, frozen, loaded = out.strip().splitlines()[-1].split()
    assert loaded == "True"  # and says so: benchmarks wait for it before timing steps
    tracked, frozen = int(tracked), int(frozen)
    assert frozen > 100_000
    assert tracked < 20_000, f"{tracked} objects left to the cyclic GC after the background import"


def test_the_forked_processes_parent_runs_no_allocator_thread() -> None:
    """The refit forkserver imports the fitting libraries and then forks: no thread may run in it then (pyarrow's
    jemalloc starts one unless told not to, and a fork during its locks hangs the child)."""
    code = (
        "import os, time\n"
        "import meds_service.workers\n"
        "from meds_service.core import clustering\n"
        "from meds_service.core.knn import load_reference\n"
        "load_reference(); time.sleep(0.3)\n"
        "print(sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JE_ARROW_MALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert "jemalloc_bg_thd" not in out, out
