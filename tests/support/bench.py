"""Running a benchmark script the way a user does, in its quick mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_quick(module: str, out: Path, mode: str = "--quick") -> subprocess.CompletedProcess[str]:
    """`python -m <module> <mode> --out <out>`; asserts it succeeded (with its stderr tail if not)."""
    done = subprocess.run(
        [sys.executable, "-m", module, mode, "--out", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done
