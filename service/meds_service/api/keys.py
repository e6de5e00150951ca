"""API keys and their scopes, read and checked at start (docs/architecture.md, "Authorisation").

Keys come from `MEDS_API_KEYS` (comma-separated plain keys, each an admin) and from the TOML file named by
`MEDS_API_KEYS_FILE`:

    [[keys]]
    name = "team-a trainer"            # optional; named in start-up errors only
    key_sha256 = "9f86d081884c7d65..." # or key = "..." (the digest keeps the key itself out of the file)
    runs = ["team-a-*"]                # glob patterns of run names; default ["*"]
    actions = ["read", "score"]        # read, score, configure, delete; or ["admin"]

A presented key is hashed and its SHA-256 digest compared with every configured digest in constant time:
how long a check takes depends neither on the key's length nor on which entry, if any, matched.
Settings import this module, so it needs no web framework (workers and refit processes load it too).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Action = Literal["read", "score", "configure", "delete"]
ACTIONS: tuple[Action, ...] = ("read", "score", "configure", "delete")
ADMIN = "admin"
PRODUCTION_MIN_KEY_LENGTH = 32
PLACEHOLDER = "REPLACE-ME"
_KEY_CHARS = re.compile(r"^[\x21-\x7e]+$")  # visible ASCII: no spaces, sent as-is in a header
_FILE_ENV = "MEDS_API_KEYS_FILE"


def digest_of(key: str) -> bytes:
    """The SHA-256 digest a key is known by (what `key_sha256` holds, as hex)."""
    return hashlib.sha256(key.encode("utf-8")).digest()


@dataclass(frozen=True)
class ApiKey:
    """One configured key: its digest and what it may do. `runs` are glob patterns of run names."""

    digest: bytes
    runs: tuple[str, ...]
    actions: frozenset[str]

    def may(self, action: Action, run: str) -> bool:
        return action in self.actions and any(fnmatchcase(run, pattern) for pattern in self.runs)

    def readable(self, runs: Iterable[str]) -> list[str]:
        """The runs of `runs` this key may read, in their order."""
        return [run for run in runs if self.may("read", run)]


OPEN = ApiKey(b"", ("*",), frozenset(ACTIONS))  # no keys configured (dev): every request may do everything


class KeyEntry(BaseModel):
    """One `[[keys]]` table of the key file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    key: str | None = Field(None, min_length=1)
    key_sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    runs: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=lambda: ["*"], min_length=1)
    actions: list[Literal["read", "score", "configure", "delete", "admin"]] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_key_and_clear_admin(self) -> KeyEntry:
        if (self.key is None) == (self.key_sha256 is None):
            raise ValueError("give exactly one of key and key_sha256")
        if ADMIN in self.actions and (len(self.actions) > 1 or self.runs != ["*"]):
            raise ValueError('"admin" stands alone: it means every action on every run (leave runs out)')
        return self

    def api_key(self) -> ApiKey:
        digest = bytes.fromhex(self.key_sha256) if self.key_sha256 else digest_of(self.key or "")
        actions = frozenset(ACTIONS) if ADMIN in self.actions else frozenset(self.actions)
        return ApiKey(digest, tuple(self.runs), actions)


class KeyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[KeyEntry] = Field(min_length=1)


def _check_plain_key(key: str, where: str, production: bool) -> None:
    """Start-up rules for a key given in clear (never echoed: `where` says which entry)."""
    if key.startswith(PLACEHOLDER):
        raise ValueError(f"{where} still holds the example placeholder; set real keys")
    if not _KEY_CHARS.match(key):
        raise ValueError(f"{where} holds a key with spaces or non-ASCII characters; use visible ASCII only")
    if production and len(key) < PRODUCTION_MIN_KEY_LENGTH:
        raise ValueError(
            f"MEDS_ENV=production refuses API keys shorter than {PRODUCTION_MIN_KEY_LENGTH} characters: {where} "
            f"has {len(key)} (generate one with `openssl rand -hex 32`)"
        )


def _read_file(path: Path) -> KeyFile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{_FILE_ENV}={path} cannot be read: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{_FILE_ENV}={path} is not valid TOML: {exc}") from None
    try:
        return KeyFile.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "file"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ValueError(f"{_FILE_ENV}={path}: {where}: {first['msg']}{more}") from None


def _entry_label(index: int, entry: KeyEntry) -> str:
    return f"{_FILE_ENV} keys[{index}]" + (f" ({entry.name!r})" if entry.name else "")


@dataclass(frozen=True)
class KeyRing:
    """Every configured key. Empty means open (dev only: production refuses to start without keys)."""

    keys: tuple[ApiKey, ...] = ()

    @classmethod
    def build(cls, plain: Sequence[str], file: Path | None, *, production: bool) -> KeyRing:
        """The keys of `MEDS_API_KEYS` (admins) and of the key file, checked; ValueError with one line if not."""
        keys: list[ApiKey] = []
        labels: list[str] = []
        for index, secret in enumerate(plain):
            _check_plain_key(secret, f"MEDS_API_KEYS entry {index + 1}", production)
            keys.append(ApiKey(digest_of(secret), ("*",), frozenset(ACTIONS)))
            labels.append(f"MEDS_API_KEYS entry {index + 1}")
        if file is not None:
            for index, entry in enumerate(_read_file(file).keys):
                if entry.key is not None:
                    _check_plain_key(entry.key, _entry_label(index, entry), production)
                keys.append(entry.api_key())
                labels.append(_entry_label(index, entry))
        seen: dict[bytes, str] = {}
        for key, label in zip(keys, labels, strict=True):
            if key.digest in seen:  # two scopes for one key: which would hold is a guess
                raise ValueError(f"{label} repeats the key of {seen[key.digest]}; give each key one entry")
            seen[key.digest] = label
        if production and not keys:
            raise ValueError(f"MEDS_ENV=production requires MEDS_API_KEYS or {_FILE_ENV} (API keys)")
        return cls(tuple(keys))

    @property
    def open(self) -> bool:
        return not self.keys

    def identify(self, presented: str) -> ApiKey | None:
        """The entry of the presented key, or None. Every digest is compared (no early exit), each in
        constant time, so the time taken says nothing about the key or which entry matched."""
        digest = digest_of(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found
