"""Service settings: one class, read from `MEDS_*` environment variables, validated at start."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from . import faults
from .api.keys import KeyRing
from .core.records import StoreSpec

MiB = 1024 * 1024


class Settings(BaseSettings):
    """Every knob of the service. Defaults suit one machine and the embedded SQLite store."""

    model_config = SettingsConfigDict(env_prefix="MEDS_", extra="ignore")

    env: Literal["dev", "production"] = "dev"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"  # one JSON object per line, or human-readable lines

    # Storage: the embedded SQLite file in data_dir, unless redis_url is given.
    data_dir: Path = Path("./meds-data")
    redis_url: str | None = None
    redis_cluster: bool = False  # MEDS_REDIS_URL names a node of a Redis Cluster
    redis_timeout_s: float = Field(5.0, gt=0)
    lock_wait_s: float = Field(20.0, gt=0)  # how long a replica waits for another's prompt locks (then 503)
    lock_lease_s: float = Field(3.0, ge=0.05)  # a prompt lock's lease, renewed every third of it while held
    sqlite_synchronous: Literal["FULL", "NORMAL"] = "FULL"

    # Auth: comma-separated admin API keys, and/or a TOML file of scoped keys (api/auth.py); none at all = no
    # auth (refused in production, where keys need 32+ characters).
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    _keyring: KeyRing = PrivateAttr(default_factory=KeyRing)
    # Operational endpoints: /metrics, and /docs, /redoc, /openapi.json with their /static assets.
    # Docs default to on in dev and off in production.
    metrics_enabled: bool = True
    metrics_port: int | None = Field(None, ge=1, le=65535)  # serve /metrics on this port (at MEDS_HOST) only
    docs_enabled: bool | None = None

    # Limits.
    max_body_bytes: int = Field(32 * MiB, ge=1024)
    max_batch: int = Field(65_536, ge=1)
    max_dim: int = Field(8192, ge=1)

    # Connections (the HTTP layer, service/meds_service/server.py): a request head must arrive within
    # header_timeout_s and its body within body_timeout_s (else 408 and close); idle keep-alive connections
    # close after keepalive_s; past max_connections a new connection replaces the oldest idle one (or is
    # closed at once); past max_requests in progress the answer is 503 with Retry-After.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(60.0, gt=0)
    keepalive_s: int = Field(5, ge=1)
    max_connections: int = Field(4096, ge=1)
    max_requests: int = Field(256, ge=1)

    # Admission: score requests in flight (taken before the body is read, until the answer is built) per run
    # and in all; past either bound a request is refused at once with 503 and Retry-After (at most
    # max_retry_after_s), never queued.
    max_inflight_per_run: int = Field(4, ge=1)
    max_inflight_total: int = Field(32, ge=1)
    max_retry_after_s: float = Field(5.0, gt=0)

    # Refits. refit_background=false leaves refits to the exact rule, POST /recluster and `meds worker`s.
    refit_background: bool = True
    refit_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    refit_processes: bool = True
    refit_interval_s: float = Field(0.5, gt=0)
    refit_max_keys_per_job: int = Field(256, ge=1)
    refit_max_vectors_per_job: int = Field(50_000, ge=1)
    # Redis refit queue: jobs left unacknowledged this long by a consumer are taken over (it died).
    refit_claim_idle_s: float = Field(60.0, gt=0)
    refit_queue_batch: int = Field(512, ge=1)
    worker_metrics_port: int = Field(9101, ge=0, le=65535)  # `meds worker` serves /metrics here; 0 = none

    # Index snapshots (a cache of the store on local disk, for fast restarts): folder and period; 0 = only at
    # shutdown. Default folder: MEDS_DATA_DIR/snapshots.
    snapshot_dir: Path | None = None
    snapshot_interval_s: float = Field(300.0, ge=0)

    # kNN index: FAISS on a GPU when CUDA is visible ("auto"), or forced to one device.
    index_device: Literal["auto", "cpu", "cuda"] = "auto"
    index_threads: int = Field(1, ge=1)
    # Threads a request's per-key searches are dealt over when they are large (storage/index.py, SPLIT_MIN_WORK).
    index_split_threads: int = Field(2, ge=1)

    # Tests only: points where the service SIGKILLs itself (faults.py); refused in production.
    fault_points: str = ""
    fault_seed: int | None = None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _load_keys(self) -> Settings:
        plain = [key.get_secret_value() for key in self.api_keys]
        self._keyring = KeyRing.build(plain, self.api_keys_file, production=self.env == "production")
        return self

    @model_validator(mode="after")
    def _faults_outside_production(self) -> Settings:
        faults.check(self.fault_points, self.env)  # a misspelt point is a start-up error, not one that never fires
        return self

    def keyring(self) -> KeyRing:
        """The API keys, read and checked when the settings were."""
        return self._keyring

    def docs_open(self) -> bool:
        return self.docs_enabled if self.docs_enabled is not None else self.env == "dev"

    def snapshots(self) -> Path:
        return self.snapshot_dir or self.data_dir / "snapshots"

    def store_options(self) -> dict[str, float]:
        """Keyword options of the store the spec names (Redis timeouts and lock waits)."""
        if not self.redis_url:
            return {}
        return {"timeout_s": self.redis_timeout_s, "lock_wait_s": self.lock_wait_s, "lock_lease_s": self.lock_lease_s}

    def store_spec(self) -> StoreSpec:
        if self.redis_url:
            return StoreSpec("redis-cluster" if self.redis_cluster else "redis", self.redis_url)
        return StoreSpec("sqlite", str(self.data_dir))


def settings_error(exc: ValidationError) -> str:
    """One line for a settings failure: where and what, never the values (they may hold API keys)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        where = ".".join(str(part) for part in error["loc"])
        parts.append(f"MEDS_{where.upper()}: {message}" if where else message)
    return "; ".join(parts)
