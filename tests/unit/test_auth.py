"""Scoped API keys: every route of the app × a key of each kind, the key file's checks at start, the
constant-time lookup, and what the operational endpoints reveal or can close."""

from __future__ import annotations

import hashlib
import hmac
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route

from harness.server import free_port
from meds_service import cli
from meds_service.api import keys
from meds_service.api.auth import Access
from meds_service.api.keys import KeyRing
from meds_service.app import create_app
from meds_service.settings import Settings
from tests.unit.test_layering import SERVICE, imports

# One key per kind. Those marked sha256 are given in the file by digest only.
KEYS = {
    "read": "read-key-0123456789abcdef0123456789abcdef",
    "score": "score-key-0123456789abcdef0123456789abcdef",
    "configure": "configure-key-0123456789abcdef0123456789abcdef",
    "delete": "delete-key-0123456789abcdef0123456789abcdef",
    "team-a": "team-a-key-0123456789abcdef0123456789abcdef",
    "admin": "admin-key-0123456789abcdef0123456789abcdef",
    "env-admin": "env-admin-key-0123456789abcdef0123456789abcdef",
}
WRONG = "not-a-key-0123456789abcdef0123456789abcdef"
KEY_FILE = f"""
[[keys]]
name = "reader"
key_sha256 = "{hashlib.sha256(KEYS["read"].encode()).hexdigest()}"
actions = ["read"]

[[keys]]
key = "{KEYS["score"]}"
actions = ["score"]

[[keys]]
key_sha256 = "{hashlib.sha256(KEYS["configure"].encode()).hexdigest().upper()}"
actions = ["configure"]

[[keys]]
key = "{KEYS["delete"]}"
runs = ["*"]
actions = ["delete"]

[[keys]]
name = "team a"
key = "{KEYS["team-a"]}"
runs = ["team-a-*", "shared"]
actions = ["read", "score", "configure", "delete"]

[[keys]]
key_sha256 = "{hashlib.sha256(KEYS["admin"].encode()).hexdigest()}"
actions = ["admin"]
"""
CALLERS = [*KEYS, "wrong", "none"]
RUNS = ("team-a-1", "team-b-1")  # inside and outside the pattern-limited key's runs

# The scope each route must declare (None: public). A route of the app missing here fails the table test.
EXPECTED: dict[tuple[str, str], str | None] = {
    ("GET", "/healthz"): None,
    ("GET", "/readyz"): None,
    ("GET", "/metrics"): None,
    ("GET", "/docs"): None,
    ("GET", "/docs/oauth2-redirect"): None,
    ("GET", "/redoc"): None,
    ("GET", "/ui"): None,
    ("GET", "/v1/runs"): "read",
    ("PUT", "/v1/runs/{run}"): "configure",
    ("GET", "/v1/runs/{run}"): "read",
    ("DELETE", "/v1/runs/{run}"): "delete",
    ("POST", "/v1/runs/{run}/score"): "score",
    ("POST", "/v1/runs/{run}/recluster"): "configure",
    ("GET", "/v1/runs/{run}/prompts/{prompt_id:path}"): "read",
    ("GET", "/v1/runs/{run}/summary"): "read",
    ("GET", "/v1/runs/{run}/prompts"): "read",
    ("GET", "/v1/runs/{run}/collapse/{prompt_id:path}"): "read",
}
# Routes that are not FastAPI routes (no dependencies): the schema and the mounted static files.
UNSCOPED_PUBLIC = {"/openapi.json", "/static", "/ui/static"}
BODIES: dict[str, Any] = {
    "/v1/runs/{run}": {},
    "/v1/runs/{run}/score": {"step": 3, "rollouts": [{"rollout_id": "z", "prompt_id": "p", "fingerprint": [0, 1, 2]}]},
}


def settings_for(data_dir: Path, key_file: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"data_dir": data_dir, "refit_processes": False, "refit_background": False,
                              "api_keys": KEYS["env-admin"], "api_keys_file": key_file,
                              "docs_enabled": True}  # fmt: skip
    return Settings(**{**values, **overrides})


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.toml"
    path.write_text(KEY_FILE)
    return path


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, key_file: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(tmp_path_factory.mktemp("data"), key_file))) as c:
        yield c


def bearer(caller: str) -> dict[str, str]:
    if caller == "none":
        return {}
    return {"authorization": f"Bearer {WRONG if caller == 'wrong' else KEYS[caller]}"}


def fill(client: TestClient) -> None:
    """Both runs exist and hold a fitted prompt `p`, whatever an earlier case deleted."""
    for run in RUNS:
        body = {"step": 1, "rollouts": [{"rollout_id": f"r{i}", "prompt_id": "p", "correct": False,
                                         "fingerprint": [0.0, 1.0, 2.0 + i * 1e-3]} for i in range(6)]}  # fmt: skip
        assert client.post(f"/v1/runs/{run}/score", json=body, headers=bearer("admin")).status_code == 200
        assert client.post(f"/v1/runs/{run}/recluster", headers=bearer("admin")).status_code == 200


def routes() -> list[RouteContext]:
    """Every route of an app built as the service builds it, docs and metrics open, as FastAPI serves it
    (routers included, prefixes applied)."""
    return list(iter_route_contexts(create_app(Settings(docs_enabled=True, metrics_enabled=True)).routes))


def route_table() -> list[tuple[str, str]]:
    """(method, path) of every FastAPI route."""
    return sorted(
        (method, str(route.path))
        for route in routes()
        if isinstance(route.original_route, APIRoute)
        for method in route.methods or ()
    )


def declared(route: RouteContext) -> list[Access]:
    found: list[Access] = []
    pending = list(route.dependant.dependencies)
    while pending:
        dependant = pending.pop()
        if isinstance(dependant.call, Access):
            found.append(dependant.call)
        pending.extend(dependant.dependencies)
    return found


def test_every_route_declares_exactly_one_scope_and_the_expected_one() -> None:
    seen = set()
    for route in routes():
        if not isinstance(route.original_route, APIRoute):
            assert isinstance(route.original_route, Route | Mount), route
            assert route.path in UNSCOPED_PUBLIC, f"{route.path} has no scope"
            continue
        scopes = declared(route)
        assert len(scopes) == 1, f"{route.path} declares {scopes}: give each route one Access (api/auth.py)"
        for method in route.methods or ():
            where = (method, str(route.path))
            assert where in EXPECTED, f"{method} {route.path} is new: add its scope to EXPECTED"
            assert scopes[0].action == EXPECTED[where], where
            seen.add(where)
    assert seen == set(EXPECTED), "EXPECTED names a route the app no longer has"


def expected_status(action: str | None, caller: str, run: str | None) -> str:
    if action is None:
        return "ok"
    if caller in ("none", "wrong"):
        return "401"
    if caller in ("admin", "env-admin"):
        return "ok"
    if caller == "team-a":
        return "ok" if run is None or run.startswith("team-a-") else "403"
    return "ok" if caller == action else "403"


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("method", "path"), route_table())
def test_route_by_key(client: TestClient, method: str, path: str, caller: str) -> None:
    action = EXPECTED[method, path]
    runs: tuple[str | None, ...] = RUNS if "{run}" in path else (None,)
    for run in runs:
        fill(client)
        url = path.replace("{run}", run or "").replace("{prompt_id:path}", "p")
        body = BODIES.get(path) if method in ("PUT", "POST") else None
        response = client.request(method, url, json=body, headers=bearer(caller))
        want = expected_status(action, caller, run)
        if want == "ok":
            assert 200 <= response.status_code < 300, (url, response.text)
            continue
        assert response.status_code == int(want), (url, response.text)
        error = response.json()["error"]
        if want == "403":
            assert error["type"] == "forbidden"
            where = f"run {run!r}" if run else "runs"
            assert error["message"] == f"this API key may not {action} {where}"
        else:
            assert error["type"] == "unauthorized" and response.headers["www-authenticate"] == "Bearer"
        assert all(key not in response.text for key in KEYS.values())


@pytest.mark.parametrize(
    ("caller", "listed"),
    [("read", set(RUNS)), ("team-a", {"team-a-1"}), ("admin", set(RUNS)), ("env-admin", set(RUNS))],
)
def test_listing_shows_only_the_runs_the_key_may_read(client: TestClient, caller: str, listed: set[str]) -> None:
    fill(client)
    runs = client.get("/v1/runs", headers=bearer(caller)).json()["runs"]
    assert {run["run"] for run in runs} == listed


def test_a_key_that_reads_nothing_may_not_list(client: TestClient) -> None:
    response = client.get("/v1/runs", headers=bearer("score"))
    assert response.status_code == 403 and response.json()["error"]["message"] == "this API key may not read runs"


def test_403_comes_before_404_so_a_scope_hides_which_runs_exist(client: TestClient) -> None:
    assert client.get("/v1/runs/team-b-none", headers=bearer("team-a")).status_code == 403
    assert client.get("/v1/runs/team-a-none", headers=bearer("team-a")).status_code == 404


def test_bearer_scheme_and_spacing(client: TestClient) -> None:
    key = KEYS["read"]
    assert client.get("/v1/runs", headers={"authorization": f"bearer {key}"}).status_code == 200
    assert client.get("/v1/runs", headers={"authorization": f"Basic {key}"}).status_code == 401
    assert client.get("/v1/runs", headers={"authorization": "Bearer "}).status_code == 401
    assert client.get("/v1/runs", headers={"authorization": f"Bearer {key}x"}).status_code == 401
    assert client.get("/v1/runs", headers={"authorization": f"Bearer {key[:-1]}"}).status_code == 401


def test_readyz_names_no_path_or_url(client: TestClient, tmp_path_factory: pytest.TempPathFactory) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["status"] == "ready" and set(ready.json()["detail"]) == {"store", "runs"}
    assert ready.json()["detail"]["store"] == "sqlite"
    assert "/" not in ready.text and str(tmp_path_factory.getbasetemp()) not in ready.text


def test_each_lookup_compares_every_digest_at_fixed_length(monkeypatch: pytest.MonkeyPatch, key_file: Path) -> None:
    ring = KeyRing.build([KEYS["env-admin"]], key_file, production=True)
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(keys.hmac, "compare_digest", counting)
    for presented in (KEYS["env-admin"], KEYS["admin"], "x", WRONG * 50):
        calls.clear()
        found = ring.identify(presented)
        assert (found is not None) == (presented in KEYS.values())
        assert calls == [(32, 32)] * len(ring.keys)  # all of them, whichever matched, whatever the length
    assert ring.identify(KEYS["team-a"]).runs == ("team-a-*", "shared")  # type: ignore[union-attr]


# -- start-up checks ---------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(text)
    return path


LONG = "k" * 32
BAD_FILES = [
    ("not toml", "[[keys]\nkey = 1", "is not valid TOML"),
    ("no keys", "", "keys: Field required"),
    ("empty list", "keys = []", "keys: List should have at least 1 item"),
    ("unknown action", f'[[keys]]\nkey = "{LONG}"\nactions = ["write"]', "keys.0.actions.0: Input should be"),
    ("no actions", f'[[keys]]\nkey = "{LONG}"', "keys.0.actions: Field required"),
    ("unknown field", f'[[keys]]\nkey = "{LONG}"\nactions = ["read"]\nrun = ["a"]', "keys.0.run: Extra inputs"),
    ("both keys", f'[[keys]]\nkey = "{LONG}"\nkey_sha256 = "{"0" * 64}"\nactions = ["read"]', "exactly one of key"),
    ("neither key", '[[keys]]\nactions = ["read"]', "exactly one of key and key_sha256"),
    ("short digest", '[[keys]]\nkey_sha256 = "abc"\nactions = ["read"]', "keys.0.key_sha256: String should match"),
    ("scoped admin", f'[[keys]]\nkey = "{LONG}"\nruns = ["a-*"]\nactions = ["admin"]', '"admin" stands alone'),
    ("admin and more", f'[[keys]]\nkey = "{LONG}"\nactions = ["admin", "read"]', '"admin" stands alone'),
    ("empty pattern", f'[[keys]]\nkey = "{LONG}"\nruns = [""]\nactions = ["read"]', "keys.0.runs.0: String should"),
    ("repeated key", f'[[keys]]\nkey = "{LONG}"\nactions = ["read"]\n' * 2, "keys[1] repeats the key of"),
    ("placeholder", '[[keys]]\nkey = "REPLACE-ME-please"\nactions = ["read"]', "example placeholder"),
    ("space in key", f'[[keys]]\nkey = "{LONG} x"\nactions = ["read"]', "visible ASCII only"),
]


@pytest.mark.parametrize(("text", "message"), [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES])
def test_bad_key_files_refuse_to_start(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ValueError, match="MEDS_API_KEYS_FILE") as caught:
        Settings(data_dir=tmp_path, api_keys_file=write(tmp_path, text))
    assert message in str(caught.value)


def test_a_missing_key_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("MEDS_API_KEYS_FILE", str(tmp_path / "absent.toml"))
    assert cli.main(["serve", "--data-dir", str(tmp_path)]) == cli.EXIT_SETTINGS
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("meds: bad settings: MEDS_API_KEYS_FILE=") and "cannot be read" in line


def test_a_key_env_repeating_a_file_key_is_refused(tmp_path: Path, key_file: Path) -> None:
    with pytest.raises(ValueError, match=r"keys\[1\] repeats the key of MEDS_API_KEYS entry 1"):
        Settings(data_dir=tmp_path, api_keys=KEYS["score"], api_keys_file=key_file)


@pytest.mark.parametrize("source", ["env", "file"])
def test_production_refuses_short_keys_and_says_so(
    tmp_path: Path, source: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    short = "s" * 31
    monkeypatch.setenv("MEDS_ENV", "production")
    if source == "env":
        monkeypatch.setenv("MEDS_API_KEYS", f"{LONG},{short}")
    else:
        monkeypatch.setenv("MEDS_API_KEYS_FILE", str(write(tmp_path, f'[[keys]]\nkey = "{short}"\nactions = ["read"]')))
    assert cli.main(["serve", "--data-dir", str(tmp_path)]) == cli.EXIT_SETTINGS
    [line] = capsys.readouterr().err.splitlines()
    assert "MEDS_ENV=production refuses API keys shorter than 32 characters" in line
    assert ("MEDS_API_KEYS entry 2" if source == "env" else "MEDS_API_KEYS_FILE keys[0]") in line
    assert short not in line  # the key itself is never printed


def test_production_accepts_long_keys_digests_and_closes_the_docs(tmp_path: Path, key_file: Path) -> None:
    settings = Settings(env="production", data_dir=tmp_path, api_keys=LONG, api_keys_file=key_file)
    assert len(settings.keyring().keys) == len(KEYS)  # the file's six and the one of MEDS_API_KEYS
    assert not settings.docs_open() and settings.metrics_enabled
    assert Settings(data_dir=tmp_path).docs_open()
    with pytest.raises(ValueError, match="requires MEDS_API_KEYS or MEDS_API_KEYS_FILE"):
        Settings(env="production", data_dir=tmp_path)


# -- operational endpoints ---------------------------------------------------------------------------

DOCS_PATHS = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", "/static/swagger-ui/swagger-ui.css"]


@pytest.mark.parametrize(("docs", "metrics"), [(True, False), (False, True)])
def test_metrics_and_docs_close(make_settings: Callable[..., Settings], docs: bool, metrics: bool) -> None:
    settings = make_settings(refit_processes=False, refit_background=False, docs_enabled=docs, metrics_enabled=metrics)
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics").status_code == (200 if metrics else 404)
        for path in DOCS_PATHS:
            assert c.get(path).status_code == (200 if docs else 404), path
        assert c.get("/ui").status_code == 200 and c.get("/healthz").status_code == 200


def test_metrics_on_a_port_of_their_own(make_settings: Callable[..., Settings]) -> None:
    port = free_port()
    settings = make_settings(refit_processes=False, refit_background=False, metrics_port=port)
    with TestClient(create_app(settings)) as c:
        assert c.get("/metrics").status_code == 404  # not on the API's port
        c.put("/v1/runs/m")
        scrape = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert 'meds_http_requests_total{method="PUT",route="/v1/runs/{run}",status="201"} 1.0' in scrape
    with pytest.raises(httpx.ConnectError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)


def test_a_taken_metrics_port_is_one_line_and_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        monkeypatch.setenv("MEDS_METRICS_PORT", str(port))
        monkeypatch.setenv("MEDS_REFIT_PROCESSES", "false")
        monkeypatch.setenv("MEDS_PORT", str(free_port()))
        assert cli.main(["serve", "--data-dir", str(tmp_path), "--log-format", "text"]) == cli.EXIT_ADDRESS
    [line] = [line for line in capsys.readouterr().err.splitlines() if "CRITICAL" in line]
    assert f"cannot serve metrics on port {port}" in line and "MEDS_METRICS_PORT" in line


def test_the_keys_module_needs_no_web_framework() -> None:
    """Settings import it, and workers and refit processes import the settings."""
    assert not [name for name in imports(SERVICE / "api" / "keys.py") if name.startswith(("fastapi", "starlette"))]
    assert not [name for name in imports(SERVICE / "settings.py") if name.startswith("meds_service.api.auth")]
