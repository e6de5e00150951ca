"""The published OpenAPI schema is the contract: schemathesis runs every check it has (`--checks all`)
against a live service. Schema-valid requests are accepted (or refused only by the cross-field rules
listed in schemathesis.toml), schema-invalid ones are refused, every status and body is documented, and
nothing is a 500."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_all_checks_pass_against_a_live_service(meds_server: str, tmp_path: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file", str(CONFIG),
        "run", f"{meds_server}/openapi.json",
        "--checks", "all",
        "--max-examples", "30",
        "--generation-deterministic",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failure" not in done.stdout.lower().split("summary")[-1]
