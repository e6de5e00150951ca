"""The service and the client build as wheels (`python -m build`) that install and import in a clean
virtualenv, and the client's extras resolve next to a pinned torch without pulling another one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TORCH_PIN = "torch==2.13.0"  # the CPU build the Makefile pins
CLIENT_EXTRAS = "fingerprint,trl,verl,openrlhf,fast"
# Packages that would mean a second torch stack (a CUDA build pulls NVIDIA's runtime wheels and triton).
OTHER_TORCH = ("torch", "nvidia-", "triton", "pytorch-triton")


def _run(*argv: str | Path, cwd: Path | None = None, timeout: float = 600) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{argv}\n{output[-4000:]}"
    return output


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both wheels, built from a copy of the sources (a build writes build/ and *.egg-info next to them)."""
    root = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist", ".venv")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, root / name)
    shutil.copytree(ROOT / "service", root / "service", ignore=ignore)
    shutil.copytree(ROOT / "client", root / "client", ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    built = {}
    for name, source in (("meds_service", root), ("meds_client", root / "client")):
        output = _run(sys.executable, "-m", "build", "--wheel", "--outdir", out, source)
        assert "deprecat" not in output.lower(), f"{name}: the build warns\n{output[-4000:]}"
        (built[name],) = out.glob(f"{name}-*.whl")
    return built


def _venv(path: Path) -> Path:
    _run(sys.executable, "-m", "venv", path)
    return path / "bin" / "python"


def test_the_service_wheel_carries_its_entry_point_and_docs_assets(wheels: dict[str, Path]) -> None:
    with zipfile.ZipFile(wheels["meds_service"]) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert {"meds_service/static/swagger-ui/swagger-ui-bundle.js", "meds_service/static/redoc/redoc.standalone.js",
            "meds_service/static/swagger-ui/LICENSE", "meds_service/static/redoc/LICENSE"} <= names  # fmt: skip
    assert "License-Expression: Apache-2.0" in metadata


@pytest.mark.slow
def test_the_service_wheel_installs_and_serves_from_a_clean_venv(wheels: dict[str, Path], tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv")
    # uv with pip's configuration (as `make` installs): the wheel's dependencies in seconds, not minutes.
    _run(sys.executable, ROOT / ".ci" / "uv_pip.py", python, "--quiet", wheels["meds_service"], timeout=900)
    code = (
        "import meds_service, meds_service.app as app; "
        "assert (app.STATIC_DIR / 'swagger-ui' / 'swagger-ui-bundle.js').is_file(); print(meds_service.__file__)"
    )
    location = _run(python, "-c", code, cwd=tmp_path).strip()
    assert location.startswith(str(tmp_path / "venv")), location
    assert "serve" in _run(tmp_path / "venv" / "bin" / "meds", "serve", "--help")


def test_the_client_wheel_installs_with_pip_without_warnings(wheels: dict[str, Path], tmp_path: Path) -> None:
    python = _venv(tmp_path / "venv")
    output = _run(python, "-m", "pip", "install", "--no-warn-script-location", wheels["meds_client"], timeout=900)
    assert "deprecat" not in output.lower(), output[-4000:]
    location = _run(python, "-c", "import meds_client; print(meds_client.__file__, meds_client.__version__)",
                    cwd=tmp_path)  # fmt: skip
    assert location.startswith(str(tmp_path / "venv")), location


def test_the_client_extras_resolve_next_to_the_pinned_torch(wheels: dict[str, Path], tmp_path: Path) -> None:
    """pip's resolver, as a training team would run it in its environment that already has its torch."""
    report = tmp_path / "report.json"
    _run(sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", report,
         f"{wheels['meds_client']}[{CLIENT_EXTRAS}]", TORCH_PIN, timeout=900)  # fmt: skip
    installs = {item["metadata"]["name"].lower(): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}  # fmt: skip
    assert "meds-client" in installs
    assert not [name for name in installs if name.startswith(OTHER_TORCH)], installs
