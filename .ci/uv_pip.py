"""`uv pip install` into a virtualenv, honouring pip's configuration.

usage: python .ci/uv_pip.py VENV_PYTHON PIP_INSTALL_ARGS...

uv resolves and installs several times faster than pip, but it reads neither pip.conf nor PIP_*
variables. This passes on what pip would have used (from `pip config list`: files and environment):
index-url, extra-index-url, find-links, constraint, no-index, timeout and cert. Like pip, it takes the
best version across all indexes (uv's default prefers the first index that has a package). uv is
installed into the virtualenv with pip the first time (where that fails, pip installs everything).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

# Where a pip setting may come from, strongest first (pip's own order for `pip install`).
SECTIONS = (":env:", "install", "global")
LIST_OPTIONS = {"extra-index-url": "--extra-index-url", "find-links": "--find-links", "constraint": "--constraint"}
VALUE_OPTIONS = {"index-url": "--index-url"}


def pip_settings(python: str) -> dict[str, str]:
    """pip's effective settings, one value per key (a stronger section hides a weaker one)."""
    listing = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    found: dict[str, dict[str, str]] = {}
    for line in listing.splitlines():
        key, sep, raw = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and section in SECTIONS:
            found.setdefault(name, {})[section] = str(ast.literal_eval(raw))
    return {name: next(values[s] for s in SECTIONS if s in values) for name, values in found.items()}


def uv_arguments(settings: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    args = ["--index-strategy", "unsafe-best-match"]
    env: dict[str, str] = {}
    for name, flag in {**LIST_OPTIONS, **VALUE_OPTIONS}.items():
        for value in settings.get(name, "").split():
            args += [flag, value]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if "timeout" in settings or "default-timeout" in settings:
        env["UV_HTTP_TIMEOUT"] = settings.get("timeout") or settings["default-timeout"]
    if "cert" in settings:
        env["SSL_CERT_FILE"] = settings["cert"]
    return args, env


def main(argv: list[str]) -> int:
    python, install = argv[0], argv[1:]
    uv = Path(python).with_name("uv")
    if not uv.exists() and subprocess.run([python, "-m", "pip", "install", "--quiet", "uv>=0.5"]).returncode != 0:
        print("uv could not be installed: installing with pip", file=sys.stderr)
        return subprocess.run([python, "-m", "pip", "install", *install], check=False).returncode
    args, env = uv_arguments(pip_settings(python))
    command = [str(uv), "pip", "install", "--python", python, *args, *install]
    return subprocess.run(command, env={**os.environ, **env}, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
