"""The production store: Redis (or Redis Cluster), shared by any number of API replicas and refit workers.

Layout (every key prefixed `meds:`; `{...}` is a Redis Cluster hash tag):

    runs                       set of run names
    {r:RUN}:run                hash: config, created_at, keys, vectors, rollouts (counters)
    {r:RUN}:keys               set of "GROUP:PROMPT_ID" members, one per memory key
    {r:RUN}:pending            set of members whose refit is queued and not yet done
    {p:RUN:H}:m0|m1|m2         per memory key (H = XXH3 of the prompt id, group 0/1/2): hash with
                               prompt, n, start, base, sbase, fit_start, fitted_upto, labels (int32 bytes)
    {p:RUN:H}:v0|v1|v2         the key's float32 rows from sequence number `base`, appended in place
    {p:RUN:H}:s0|s1|s2         the training step of each of the key's vectors from sequence number
                               `sbase` (int64, -1 = none); kept whole, like the ids, when vectors are
                               forgotten. Keys stored before steps were kept start at their n then.
    {p:RUN:H}:ids              hash: rollout_id -> group byte + result record (idempotent retries)
                               (and "" -> _TABLE_MARK, which keeps the hash a table)
    {p:RUN:H}:lock             per-prompt lock held while a replica scores that prompt: a token fresh to each
                               acquisition, on a short lease renewed while held; the commit checks it
    refits                     stream of refit jobs, consumer group `workers`

All of one prompt's data shares a hash slot, so each prompt's update is one atomic Lua script even on
Redis Cluster; on a single Redis a whole batch is one script (atomic as a whole). On a cluster the
run-level keys live in other slots and are updated after the prompts' scripts, for the prompts stored
(the functions under "Redis Cluster" below). Run every shipped config with `appendonly yes` and
`appendfsync always`: then an acknowledged batch is on disk.

One module for the whole adapter, over the usual ~400 lines: the Lua scripts and the Python that builds
their KEYS and ARGV must change together, and reading them side by side is how they stay in step.
"""

from __future__ import annotations

import functools
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import redis
import redis.cluster
import xxhash
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from .. import faults
from ..core.config import RunConfig
from ..core.errors import IdCollision, StoreUnavailable
from ..core.records import KeyHead, RunCounts, RunRecord, StoreSpec
from ..core.types import (
    NO_STEP,
    RESULT_DTYPE,
    Fit,
    Group,
    KeyAppend,
    KeyDelta,
    KeyState,
    MemoryKey,
    QueuedRefit,
    RolloutResult,
    RolloutStatus,
    ScoredBatch,
)

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

STREAM = b"meds:refits"
GROUP = b"workers"
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, redis.exceptions.BusyLoadingError)
# What redis-py raises when no node of a Redis Cluster answers, or none serves a slot (after its own retries).
_CLUSTER_ERRORS = (redis.exceptions.RedisClusterException, redis.exceptions.ClusterError)

# Commit of one batch. KEYS: run-level keys (5, or 0 on Redis Cluster) then meta, vec, ids, steps, lock per
# append. ARGV: _CommitHead (rowbytes, recordbytes, appends, run, config json, created_at, lock token), then per
# append the 13 values of _AppendArgs: its rollouts' stored records come as one blob of fixed-width records and
# their ids as one blob with a list of byte lengths, split here, so that a batch is a few ARGV per key instead
# of two per rollout. Fencing: with a token, every append's prompt lock must still hold it (the lease did not
# expire), else nothing is applied; an empty token commits unfenced. The first loop only reads (and refuses the
# whole batch before any write); the second writes each key's hash once. The last ARGV is _TABLE_MARK.
_COMMIT = """
local rowbytes, recbytes, napp, run, token = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[7]
local runlevel = (#KEYS - 5 * napp) == 5
local k0 = runlevel and 5 or 0
local heads, fenced = {}, {}
for i = 1, napp do
  local p = 8 + 13 * (i - 1)
  local meta, lock = KEYS[k0 + 5 * i - 4], KEYS[k0 + 5 * i]
  if token ~= '' and not fenced[lock] then
    if redis.call('GET', lock) ~= token then return redis.error_reply('MEDSFENCED ' .. lock) end
    fenced[lock] = true
  end
  local head = redis.call('HMGET', meta, 'n', 'prompt', 'start', 'base', 'sbase')
  if tonumber(head[1] or '0') ~= tonumber(ARGV[p]) then return redis.error_reply('MEDSCONFLICT ' .. meta) end
  if head[2] and head[2] ~= ARGV[p + 4] then return redis.error_reply('MEDSHASH ' .. meta) end
  heads[i] = head
end
local new_keys, new_vectors, new_rollouts = 0, 0, 0
for i = 1, napp do
  local p = 8 + 13 * (i - 1)
  local meta, vec, ids, steps = KEYS[k0 + 5 * i - 4], KEYS[k0 + 5 * i - 3], KEYS[k0 + 5 * i - 2], KEYS[k0 + 5 * i - 1]
  local first, newstart, vectors = tonumber(ARGV[p]), tonumber(ARGV[p + 1]), ARGV[p + 2]
  local member, prompt, refit = ARGV[p + 3], ARGV[p + 4], ARGV[p + 5]
  local fs, fu, labels = ARGV[p + 6], ARGV[p + 7], ARGV[p + 8]
  local stepbytes, records, idlens, idblob = ARGV[p + 9], ARGV[p + 10], ARGV[p + 11], ARGV[p + 12]
  local head = heads[i]
  local npairs = #records / recbytes
  local n = first + npairs
  local oldstart, base = tonumber(head[3] or '0'), tonumber(head[4] or '0')
  local fields = {'n', n, 'start', newstart}
  if first == 0 then
    fields[#fields + 1] = 'prompt'; fields[#fields + 1] = prompt
    fields[#fields + 1] = 'sbase'; fields[#fields + 1] = 0
    new_keys = new_keys + 1
    if runlevel then redis.call('SADD', KEYS[2], member) end
    redis.call('HSET', ids, '', ARGV[8 + 13 * napp])
  elseif not head[5] then
    fields[#fields + 1] = 'sbase'; fields[#fields + 1] = first
  end
  redis.call('APPEND', steps, stepbytes)
  redis.call('APPEND', vec, vectors)
  if newstart > base and (newstart - base) >= (n - newstart) then
    redis.call('SET', vec, redis.call('GETRANGE', vec, (newstart - base) * rowbytes, -1))
    base = newstart
  end
  fields[#fields + 1] = 'base'; fields[#fields + 1] = base
  if fu ~= '' then
    fields[#fields + 1] = 'fit_start'; fields[#fields + 1] = fs
    fields[#fields + 1] = 'fitted_upto'; fields[#fields + 1] = fu
    fields[#fields + 1] = 'labels'; fields[#fields + 1] = labels
  end
  redis.call('HSET', meta, unpack(fields))
  local kv, at, r = {}, 1, 1
  for len in string.gmatch(idlens, '%d+') do
    local after = at + tonumber(len)
    kv[#kv + 1] = string.sub(idblob, at, after - 1)
    kv[#kv + 1] = string.sub(records, r, r + recbytes - 1)
    at, r = after, r + recbytes
    if #kv >= 4000 then redis.call('HSET', ids, unpack(kv)); kv = {} end
  end
  if #kv > 0 then redis.call('HSET', ids, unpack(kv)) end
  if runlevel and refit == '1' then
    redis.call('SADD', KEYS[3], member)
    redis.call('XADD', KEYS[4], '*', 'run', run, 'key', member)
  end
  new_vectors = new_vectors + npairs - (newstart - oldstart)
  new_rollouts = new_rollouts + npairs
end
if runlevel then
  redis.call('HSET', KEYS[1], 'config', ARGV[5])
  redis.call('HSETNX', KEYS[1], 'created_at', ARGV[6])
  redis.call('SADD', KEYS[5], run)
  redis.call('HINCRBY', KEYS[1], 'keys', new_keys)
  redis.call('HINCRBY', KEYS[1], 'vectors', new_vectors)
  redis.call('HINCRBY', KEYS[1], 'rollouts', new_rollouts)
end
return {new_keys, new_vectors, new_rollouts}
"""

# Save one fit unless an equal or newer one is stored. KEYS: meta [, pending set]. ARGV: fs, fu, labels, member.
# Returns 0 (not saved), 1 (saved; the key has vectors it does not cover) or 2 (saved and current).
_SAVE_FIT = """
local cur = redis.call('HMGET', KEYS[1], 'fit_start', 'fitted_upto', 'n', 'start')
if not cur[3] then return 0 end
local fs, fu = tonumber(ARGV[1]), tonumber(ARGV[2])
if fu < tonumber(cur[2] or '0') or fs < tonumber(cur[1] or '0') then return 0 end
redis.call('HSET', KEYS[1], 'fit_start', fs, 'fitted_upto', fu, 'labels', ARGV[3])
if fu ~= tonumber(cur[3]) or fs ~= tonumber(cur[4]) then return 1 end
if KEYS[2] then redis.call('SREM', KEYS[2], ARGV[4]) end
return 2
"""

# What keys gained since a cached view of them (read only). KEYS: meta, vec per key. ARGV: rowbytes, a budget of
# row bytes, then per key the view's n, fit_start, fitted_upto. Returns per key eight values: start, n, base,
# fit_start, fitted_upto, prompt (nil when not stored), the rows after the view's n (nil when none, or when they
# are past the budget: the caller reads those apart, so a script never holds Redis for a large read) and the
# labels (nil when the view's fit is the stored one's). One script reads a chunk of keys on a single Redis; one
# key per script on a cluster.
_CHANGES = """
local rowbytes, budget, out = tonumber(ARGV[1]), tonumber(ARGV[2]), {}
for i = 1, #KEYS / 2 do
  local meta, vec, p = KEYS[2 * i - 1], KEYS[2 * i], 3 * i
  local h = redis.call('HMGET', meta, 'start', 'n', 'base', 'fit_start', 'fitted_upto', 'prompt')
  local start, n, base = tonumber(h[1] or '0'), tonumber(h[2] or '0'), tonumber(h[3] or '0')
  local fs, fu = tonumber(h[4] or '0'), tonumber(h[5] or '0')
  local first = math.max(tonumber(ARGV[p]), start)
  local rows, labels = false, false
  if first < n and (n - first) * rowbytes <= budget then
    budget = budget - (n - first) * rowbytes
    rows = redis.call('GETRANGE', vec, (first - base) * rowbytes, (n - base) * rowbytes - 1)
  end
  if fs ~= tonumber(ARGV[p + 1]) or fu ~= tonumber(ARGV[p + 2]) then
    labels = redis.call('HGET', meta, 'labels') or ''
  end
  out[#out + 1] = start; out[#out + 1] = n; out[#out + 1] = base; out[#out + 1] = fs; out[#out + 1] = fu
  out[#out + 1] = h[6] or false; out[#out + 1] = rows; out[#out + 1] = labels
end
return out
"""

# Keys one _CHANGES script reads on a single Redis (a step's keys in a script or two), and the row bytes it
# returns at most (a step's new rows fit; a whole key's history is read with plain commands).
_CHANGES_CHUNK = 1024
_CHANGES_BUDGET = 4 << 20

# Take the locks KEYS for one lease, all or none (returns 1 or 0): one script for a whole batch on a single Redis,
# one per prompt on a cluster (a script's keys share a slot). A lock that already holds this token counts as
# free (a reply lost to a retried connection: tokens are fresh per acquisition, so no one else has it).
# ARGV: token, lease in ms.
_LOCK = """
for _, lock in ipairs(KEYS) do
  local holder = redis.call('GET', lock)
  if holder and holder ~= ARGV[1] then return 0 end
end
for _, lock in ipairs(KEYS) do redis.call('SET', lock, ARGV[1], 'PX', ARGV[2]) end
return 1
"""

# Extend the lease of the locks KEYS that still hold this token. ARGV: token, lease in ms. Returns how many did
# (the others were lost).
_RENEW = """
local held = 0
for _, lock in ipairs(KEYS) do
  if redis.call('GET', lock) == ARGV[1] then held = held + redis.call('PEXPIRE', lock, ARGV[2]) end
end
return held
"""

# Release the locks KEYS that still hold this token. ARGV: token.
_UNLOCK = """
for _, lock in ipairs(KEYS) do
  if redis.call('GET', lock) == ARGV[1] then redis.call('DEL', lock) end
end
return 0
"""


def _check_prompt(key: MemoryKey, stored: bytes | None) -> None:
    """IdCollision when the prompt id stored under a key's hash tag is another prompt's (None: nothing stored)."""
    if stored is not None and stored.decode() != key.prompt_id:
        raise IdCollision(f"prompt ids {key.prompt_id!r} and {stored.decode()!r} share a hash; rename one")


def _translated(method: Callable[P, T]) -> Callable[P, T]:
    """Redis outages become StoreUnavailable (503 + Retry-After), never a 500."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except _REDIS_ERRORS as exc:
            raise StoreUnavailable(f"Redis is unreachable: {exc}", retry_after=1) from exc
        except _CLUSTER_ERRORS as exc:
            raise StoreUnavailable(f"the Redis Cluster is unavailable: {exc}", retry_after=1) from exc
        except redis.exceptions.ResponseError as exc:
            if "MEDSCONFLICT" in str(exc):
                raise StoreUnavailable("a key changed under this batch; retry", retry_after=1) from exc
            if "MEDSFENCED" in str(exc):
                raise StoreUnavailable("a prompt lock's lease expired before this batch was stored; retry",
                                       retry_after=1) from exc  # fmt: skip
            if "MEDSHASH" in str(exc):
                raise IdCollision("two prompt ids of this run share a hash; rename one") from exc
            raise StoreUnavailable(f"Redis refused a command: {exc}", retry_after=1) from exc

    return wrapper


@_translated
def _connect_cluster(url: str, options: dict[str, Any]) -> redis.cluster.RedisCluster:
    """A Redis Cluster client: it reads the slot map from the node `url` names (or another it lists) now."""
    return redis.cluster.RedisCluster.from_url(url, **options)


def _member(key: MemoryKey) -> str:
    return f"{int(key.group)}:{key.prompt_id}"


def _key_of(member: bytes | str) -> MemoryKey:
    text = member.decode() if isinstance(member, bytes) else member
    group, _, prompt = text.partition(":")
    return MemoryKey(prompt, Group(int(group)))


@dataclass(frozen=True)
class _CommitHead:
    """The first seven ARGV of _COMMIT."""

    rowbytes: int
    appends: int
    run: str
    config: str  # JSON
    created_at: float
    token: str  # the prompt locks' token the commit is fenced by ("" = unfenced)

    def argv(self) -> list[str | int | bytes]:
        return [self.rowbytes, _STORED_RECORD.itemsize, self.appends, self.run, self.config, repr(self.created_at),
                self.token]  # fmt: skip


# A rollout's value in a prompt's `ids` hash: its group, then its result record.
_STORED_RECORD = np.dtype([("group", "u1"), ("result", RESULT_DTYPE)])

# The value of field "" (no rollout id is empty) that every new prompt's `ids` hash gets: longer than
# `hash-max-listpack-value` (64 by default), it makes Redis keep that hash as a table from the start. A hash
# under `hash-max-listpack-entries` (512 by default) is otherwise a listpack, searched linearly by every HSET and
# HMGET: 16 ids a step into hundreds was half of the server's time per step at 20 epochs.
_TABLE_MARK = b"meds: this field keeps the hash a table (a listpack is searched linearly)"


@dataclass(frozen=True)
class _AppendArgs:
    """One append's ARGV of _COMMIT, in the script's order. Its rollouts travel as two blobs: their stored
    records (fixed width) and their ids (with their byte lengths), which the script splits into hash fields."""

    first: int
    new_start: int
    vectors: bytes
    member: str
    prompt: str
    refit: bool
    fit: Fit | None  # labels known without HDBSCAN, saved with the append
    steps: bytes
    records: bytes
    id_lengths: str  # the byte length of each rollout id, space-separated
    ids: bytes

    @classmethod
    def of_batch(
        cls, appends: Sequence[KeyAppend], fits: Mapping[MemoryKey, Fit], refits: set[MemoryKey]
    ) -> list[_AppendArgs]:
        """The arguments of every append, their arrays converted for the whole batch at once and then cut."""
        sizes = [len(a.rollout_ids) for a in appends]
        bounds = np.cumsum([0, *sizes]).tolist()
        records = np.empty(bounds[-1], dtype=_STORED_RECORD)
        records["group"] = np.repeat([int(a.key.group) for a in appends], sizes)
        # Joined as bytes: np.concatenate of structured arrays promotes their dtypes one by one (slow).
        results = b"".join(a.results.astype(RESULT_DTYPE, copy=False).tobytes() for a in appends)
        records["result"] = np.frombuffer(results, dtype=RESULT_DTYPE)
        rows = np.concatenate([a.vectors for a in appends]).astype("<f4", copy=False)
        steps = np.repeat([NO_STEP if a.step is None else a.step for a in appends], sizes).astype("<i8")
        record_blob, vector_blob, step_blob = records.tobytes(), rows.tobytes(), steps.tobytes()
        rowbytes, recbytes = rows.itemsize * (rows.shape[1] if rows.ndim == 2 else 0), records.itemsize
        if len(rows) != bounds[-1]:
            raise ValueError("an append has not one vector per rollout id")
        ids = [rollout_id.encode() for a in appends for rollout_id in a.rollout_ids]
        lengths = list(map(str, map(len, ids)))
        return [
            cls(a.first_seq, a.new_start, vector_blob[lo * rowbytes : hi * rowbytes], _member(a.key),
                a.key.prompt_id, a.key in refits, fits.get(a.key), step_blob[lo * 8 : hi * 8],
                record_blob[lo * recbytes : hi * recbytes], " ".join(lengths[lo:hi]), b"".join(ids[lo:hi]))
            for a, lo, hi in zip(appends, bounds, bounds[1:], strict=False)
        ]  # fmt: skip

    def argv(self) -> list[str | int | bytes]:
        fit = self.fit
        return [
            self.first, self.new_start, self.vectors, self.member, self.prompt, "1" if self.refit else "0",
            "" if fit is None else fit.fit_start, "" if fit is None else fit.fitted_upto,
            b"" if fit is None else fit.labels.astype("<i4").tobytes(), self.steps, self.records, self.id_lengths,
            self.ids,
        ]  # fmt: skip


class _Lease:
    """One acquisition's prompt locks: renewed every third of the lease by a thread of its own until
    released. A renewal only extends locks still under the token; a lost one stays lost."""

    def __init__(self, store: RedisStore, run: str, names: list[str], token: str) -> None:
        self.run = run
        self.token = token
        self._store = store
        self._names = names
        self._released = threading.Event()
        self._thread = threading.Thread(target=self._renew_until_released, name="meds-lock-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop renewing. Waits at most one lease for a renewal in flight (it cannot outlive the release:
        it extends only locks under this token)."""
        self._released.set()
        self._thread.join(self._store.lock_lease_ms / 1000)

    def _renew_until_released(self) -> None:
        interval_s = self._store.lock_lease_ms / 3000
        lost = False
        while not self._released.wait(interval_s):
            try:
                held = self._store._renew_locks(self._names, self.token)
            except StoreUnavailable as exc:
                log.warning("prompt locks of run %r not renewed: %s", self.run, exc)
                continue
            if held < len(self._names) and not lost:
                lost = True
                log.warning("%d prompt lock(s) of run %r expired while held; the batch's commit will be refused",
                            len(self._names) - held, self.run)  # fmt: skip


class _HeldLeases(threading.local):
    """The leases this thread holds. A commit fenced by one is made in the thread that took it: the engine
    scores and commits a batch inside `locked`, in one thread."""

    def __init__(self) -> None:
        self.leases: list[_Lease] = []

    def token(self, run: str) -> str:
        """The token of this thread's lease on the run's prompts ("" when it holds none: an unfenced commit)."""
        return next((lease.token for lease in reversed(self.leases) if lease.run == run), "")


class RedisStore:
    """`SharedStore` on Redis, plus the `RefitQueue` (a Redis Stream) that `meds worker`s consume."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        timeout_s: float = 5.0,
        lock_lease_s: float = 3.0,
        lock_wait_s: float = 20.0,
    ) -> None:
        self.url = url
        self.cluster = cluster
        self.lock_lease_ms = max(1, int(lock_lease_s * 1000))
        self.lock_wait_s = lock_wait_s
        options: dict[str, Any] = {
            "socket_timeout": timeout_s,
            "socket_connect_timeout": min(timeout_s, 2.0),
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        }
        if cluster:
            self._r: Any = _connect_cluster(url, options)
        else:
            self._r = redis.Redis.from_url(url, health_check_interval=10, **options)
        self._commit = self._r.register_script(_COMMIT)
        self._save_fit = self._r.register_script(_SAVE_FIT)
        self._changes = self._r.register_script(_CHANGES)
        self._lock = self._r.register_script(_LOCK)
        self._unlock = self._r.register_script(_UNLOCK)
        self._renew = self._r.register_script(_RENEW)
        self._held = _HeldLeases()

    # ---- names ------------------------------------------------------------------------------------

    @staticmethod
    def _run_key(run: str, what: str) -> str:
        return f"meds:{{r:{run}}}:{what}"

    @staticmethod
    def _prompt_key(run: str, prompt_id: str, what: str) -> str:
        return f"meds:{{p:{run}:{xxhash.xxh3_64_hexdigest(prompt_id.encode())}}}:{what}"

    def _meta(self, run: str, key: MemoryKey) -> str:
        return self._prompt_key(run, key.prompt_id, f"m{int(key.group)}")

    def _vec(self, run: str, key: MemoryKey) -> str:
        return self._prompt_key(run, key.prompt_id, f"v{int(key.group)}")

    def _steps(self, run: str, key: MemoryKey) -> str:
        return self._prompt_key(run, key.prompt_id, f"s{int(key.group)}")

    def _texts(self, run: str, key: MemoryKey) -> str:
        return self._prompt_key(run, key.prompt_id, f"t{int(key.group)}")

    # ---- housekeeping -----------------------------------------------------------------------------

    finds_ids_by_hash = False  # a prompt's results are a hash of rollout ids, looked up by name

    def spec(self) -> StoreSpec:
        return StoreSpec("redis-cluster" if self.cluster else "redis", self.url)

    def info(self) -> dict[str, str]:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return {"backend": "redis-cluster" if self.cluster else "redis",
                "url": urlunsplit((parts.scheme, netloc, parts.path, "", ""))}  # fmt: skip

    @_translated
    def ping(self) -> None:
        self._r.ping()

    def checkpoint(self, idle_s: float = 0.5, force_bytes: int = 0) -> None:
        """Nothing to do: Redis persists through its append-only file."""

    def close(self) -> None:
        self._r.close()

    # ---- runs -------------------------------------------------------------------------------------

    @_translated
    def list_runs(self) -> list[RunRecord]:
        names = sorted(n.decode() for n in self._r.smembers("meds:runs"))
        return [r for r in (self.get_run(n) for n in names) if r is not None]

    @_translated
    def get_run(self, run: str) -> RunRecord | None:
        config, created = self._r.hmget(self._run_key(run, "run"), "config", "created_at")
        if config is None:
            return None
        return RunRecord(run, RunConfig.from_mapping(json.loads(config)), float(created or 0))

    @_translated
    def save_run(self, run: str, config: RunConfig) -> RunRecord:
        key = self._run_key(run, "run")
        pipe = self._r.pipeline(transaction=not self.cluster)
        pipe.hset(key, "config", json.dumps(config.as_dict()))
        pipe.hsetnx(key, "created_at", repr(time.time()))
        pipe.hget(key, "created_at")
        created = pipe.execute()[2]
        self._r.sadd("meds:runs", run)
        return RunRecord(run, config, float(created))

    @_translated
    def delete_run(self, run: str) -> bool:
        if not self._r.exists(self._run_key(run, "run")):
            return False
        members = [_key_of(m) for m in self._r.smembers(self._run_key(run, "keys"))]
        names: list[str] = []
        for key in members:
            names += [self._meta(run, key), self._vec(run, key), self._steps(run, key),
                      self._prompt_key(run, key.prompt_id, "ids"), self._texts(run, key)]  # fmt: skip
        for lo in range(0, len(names), 512):
            pipe = self._r.pipeline(transaction=False)
            for name in names[lo : lo + 512]:
                pipe.delete(name)
            pipe.execute()
        pipe = self._r.pipeline(transaction=False)
        for what in ("run", "keys", "pending"):
            pipe.delete(self._run_key(run, what))
        pipe.srem("meds:runs", run)
        pipe.execute()
        return True

    @_translated
    def counts(self, run: str) -> RunCounts:
        keys, vectors, rollouts = self._r.hmget(self._run_key(run, "run"), "keys", "vectors", "rollouts")
        return RunCounts(int(keys or 0), int(vectors or 0), int(rollouts or 0))

    @_translated
    def pending_count(self, run: str) -> int:
        return int(self._r.scard(self._run_key(run, "pending")))

    @_translated
    def list_keys(self, run: str, pending_only: bool = False) -> list[MemoryKey]:
        members = self._r.smembers(self._run_key(run, "pending" if pending_only else "keys"))
        return sorted(_key_of(m) for m in members)

    # ---- memory -----------------------------------------------------------------------------------

    @_translated
    def key_heads(self, run: str) -> dict[MemoryKey, KeyHead]:
        return self.heads(run, self.list_keys(run))

    @_translated
    def heads(self, run: str, keys: Sequence[MemoryKey]) -> dict[MemoryKey, KeyHead]:
        """Counters of the given keys (zeros for keys that are not stored)."""
        return {
            key: KeyHead(start=start, n=n, fit_start=fit_start, fitted_upto=fitted_upto)
            for key, (start, n, fit_start, fitted_upto, _, _) in zip(keys, self._heads(run, keys), strict=True)
        }

    def _heads(self, run: str, keys: Sequence[MemoryKey]) -> list[tuple[int, int, int, int, int, bytes | None]]:
        """(start, n, fit_start, fitted_upto, base, prompt) of each key (zeros for keys not stored)."""
        pipe = self._r.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(self._meta(run, key), "start", "n", "fit_start", "fitted_upto", "base", "prompt")
        heads = []
        for key, row in zip(keys, pipe.execute(), strict=True):
            _check_prompt(key, row[5])
            heads.append((*(int(v or 0) for v in row[:5]), row[5]))
        return heads

    @_translated
    def load_changes(self, run: str, since: Mapping[MemoryKey, KeyHead], dim: int) -> dict[MemoryKey, KeyDelta]:
        """For each key, the vectors appended after since[key].n and its fit when it is not since's: one
        script per chunk of keys (per key on a cluster), instead of a pipelined command or two per key; rows
        past the script's budget are read after it, in one pipeline."""
        keys, rowbytes = list(since), 4 * dim
        step = 1 if self.cluster else _CHANGES_CHUNK
        chunks = [keys[lo : lo + step] for lo in range(0, len(keys), step)]
        calls = [
            ([name for key in chunk for name in (self._meta(run, key), self._vec(run, key))],
             [rowbytes, _CHANGES_BUDGET,
              *(x for key in chunk for x in (since[key].n, since[key].fit_start, since[key].fitted_upto))])
            for chunk in chunks
        ]  # fmt: skip
        heads, rows, later = {}, {}, []
        for chunk, reply in zip(chunks, self._scripts(self._changes, calls), strict=True):
            for key, lo in zip(chunk, range(0, len(reply), 8), strict=True):
                start, n, base, fit_start, fitted_upto, prompt, rows[key], labels = reply[lo : lo + 8]
                _check_prompt(key, prompt)
                first = max(since[key].n, start)
                if first < n and rows[key] is None:
                    later.append((key, (first - base) * rowbytes, (n - base) * rowbytes - 1))
                fit = None
                if labels is not None:
                    fit = Fit(key, np.frombuffer(labels, dtype="<i4").astype(np.int64), fit_start, fitted_upto)
                heads[key] = (start, n, first, fit)
        if later:
            pipe = self._r.pipeline(transaction=False)
            for key, lo, hi in later:
                pipe.getrange(self._vec(run, key), lo, hi)
            rows.update((key, blob) for (key, _, _), blob in zip(later, pipe.execute(), strict=True))
        changes = {}
        for key, (start, n, first, fit) in heads.items():
            blob = rows[key]
            vectors = np.zeros((0, dim), dtype=np.float32)
            if blob is not None:
                vectors = np.frombuffer(blob, dtype="<f4").reshape(-1, dim).astype(np.float32)
            changes[key] = KeyDelta(start, n, first, vectors, fit)
        return changes

    @_translated
    def load_keys(self, run: str, keys: Sequence[MemoryKey] | None, dim: int) -> dict[MemoryKey, KeyState]:
        """Live vectors and last fit of the given keys (all keys of the run when `keys` is None)."""
        wanted = self.list_keys(run) if keys is None else list(keys)
        changes = self.load_changes(run, {k: KeyHead(0, 0, -1, -1) for k in wanted}, dim)
        states = {}
        for key, delta in changes.items():
            if delta.n == 0:
                continue
            fit = delta.fit or Fit(key, np.zeros(0, np.int64), 0, 0)
            states[key] = KeyState(delta.vectors, delta.start, fit.labels, fit.fit_start, fit.fitted_upto)
        return states

    @_translated
    def find_results(
        self,
        run: str,
        prompt_ids: Sequence[str],
        rollout_ids: Sequence[str],
        id_hashes: np.ndarray | None = None,  # unused: ids are looked up per prompt by name
    ) -> dict[str, RolloutResult]:
        by_prompt: dict[str, list[str]] = {}
        for prompt, rollout in zip(prompt_ids, rollout_ids, strict=True):
            by_prompt.setdefault(prompt, []).append(rollout)
        pipe = self._r.pipeline(transaction=False)
        for prompt, rollouts in by_prompt.items():
            pipe.hmget(self._prompt_key(run, prompt, "ids"), rollouts)
        found = {}
        for rollouts, values in zip(by_prompt.values(), pipe.execute(), strict=True):
            for rollout, value in zip(rollouts, values, strict=True):
                if value is not None and rollout:  # "" holds _TABLE_MARK
                    record = np.frombuffer(value, dtype=RESULT_DTYPE, offset=1)[0]
                    found[rollout] = RolloutResult.from_record(rollout, RolloutStatus.SCORED, record)
        return found

    @_translated
    def load_steps(self, run: str, keys: Sequence[MemoryKey]) -> dict[MemoryKey, np.ndarray]:
        """The training step of each vector of these keys ever stored (sequence numbers 0..n), NO_STEP where
        none was recorded (before `sbase`, or batches sent without one)."""
        pipe = self._r.pipeline(transaction=False)
        for key in keys:
            pipe.hmget(self._meta(run, key), "n", "sbase")
            pipe.get(self._steps(run, key))
        replies = pipe.execute()
        out = {}
        for i, key in enumerate(keys):
            (n, sbase), blob = replies[2 * i], replies[2 * i + 1]
            if n is None:
                continue
            steps = np.full(int(n), NO_STEP, dtype=np.int64)
            if sbase is not None and blob:
                recorded = np.frombuffer(blob, dtype="<i8")
                steps[int(sbase) : int(sbase) + len(recorded)] = recorded
            out[key] = steps
        return out

    @_translated
    def prompt_results(self, run: str, prompt_id: str) -> dict[Group, np.ndarray]:
        """The stored result of every rollout of one prompt ever scored, per group (RESULT_DTYPE)."""
        stored = self._r.hgetall(self._prompt_key(run, prompt_id, "ids"))
        by_group: dict[Group, list[bytes]] = {}
        for rollout_id, value in stored.items():
            if not rollout_id:  # _TABLE_MARK
                continue
            by_group.setdefault(Group(value[0]), []).append(value[1:])
        return {group: np.frombuffer(b"".join(parts), dtype=RESULT_DTYPE) for group, parts in by_group.items()}

    @_translated
    def commit(self, run: str, config: RunConfig, batch: ScoredBatch) -> None:
        """One atomic script per batch (per prompt on Redis Cluster); refused whole if a key moved on, or if,
        committed under `locked`, a prompt lock no longer holds that acquisition's token (its lease lapsed)."""
        if not batch.appends:
            return
        fits = {fit.key: fit for fit in batch.fits}
        refits = set(batch.refits)
        parts: dict[str, list[KeyAppend]] = {}
        for append in batch.appends:
            parts.setdefault(append.key.prompt_id if self.cluster else "", []).append(append)

        token = self._held.token(run)

        def script(appends: list[KeyAppend]) -> tuple[list[str], list[str | int | bytes]]:
            head = _CommitHead(
                4 * config.stored_dim, len(appends), run, json.dumps(config.as_dict()), time.time(), token
            )
            keys = [name for a in appends for name in self._append_keys(run, a.key)]
            args = [x for a in _AppendArgs.of_batch(appends, fits, refits) for x in a.argv()]
            return keys, [*head.argv(), *args, _TABLE_MARK]

        faults.point("redis.commit.before_script")
        if not self.cluster:
            keys, args = script(batch.appends)
            run_keys = [self._run_key(run, w) for w in ("run", "keys", "pending")] + [STREAM.decode(), "meds:runs"]
            self._commit(keys=run_keys + keys, args=args)
            faults.point("redis.commit.after_script")
            self._save_texts(run, batch)
            return
        self._cluster_commit(run, config, batch, [(prompt, *script(appends)) for prompt, appends in parts.items()])
        faults.point("redis.commit.after_script")
        self._save_texts(run, batch)

    def _save_texts(self, run: str, batch: ScoredBatch) -> None:
        """Kept texts, per key a hash of sequence number -> text, written after the batch (they illustrate
        clusters and never decide a result, so they need not be part of the atomic commit)."""
        pipe = self._r.pipeline(transaction=False)
        for a in batch.appends:
            fields = {a.first_seq + i: t for i, t in enumerate(a.texts or ()) if t is not None}
            if fields:
                pipe.hset(self._texts(run, a.key), mapping=fields)
        pipe.execute()

    @_translated
    def load_texts(self, run: str, key: MemoryKey, seqs: Sequence[int]) -> list[str | None]:
        """The stored text of the key's vectors with these sequence numbers (None where none was kept)."""
        if not seqs:
            return []
        values = self._r.hmget(self._texts(run, key), list(seqs))
        return [None if v is None else v.decode() for v in values]

    def _append_keys(self, run: str, key: MemoryKey) -> list[str]:
        """The KEYS of one append in _COMMIT (the names that _meta, _vec, _steps and _prompt_key give)."""
        prompt, group = self._prompt_key(run, key.prompt_id, ""), int(key.group)
        return [f"{prompt}m{group}", f"{prompt}v{group}", f"{prompt}ids", f"{prompt}s{group}", f"{prompt}lock"]

    # ---- Redis Cluster ----------------------------------------------------------------------------
    # A cluster runs a script only on keys of one slot, and redis-py refuses EVALSHA in a cluster pipeline.
    # So each prompt's update is its own script (sent with EVAL, routed to the prompt's slot), and the
    # run-level keys, which live in other slots, are updated after the prompts' scripts.

    def _queue_script(self, pipe: Any, script: Script, keys: Sequence[str], args: Sequence[Any]) -> None:
        """Queue a script on a pipeline: EVALSHA on a single Redis, EVAL with the script's text on a cluster."""
        if self.cluster:
            pipe.execute_command("EVAL", script.script, len(keys), *keys, *args)
        else:
            script(keys=keys, args=args, client=pipe)

    def _cluster_commit(
        self, run: str, config: RunConfig, batch: ScoredBatch, scripts: list[tuple[str, list[str], list[Any]]]
    ) -> None:
        """One atomic script per prompt, all sent in one pipeline (one round trip per node); then the run's
        counters, key set and refit queue for the prompts that were stored. A prompt whose key moved on is
        refused whole; its error is raised after the others are accounted for."""
        pipe = self._r.pipeline(transaction=False)
        for _, keys, args in scripts:
            self._queue_script(pipe, self._commit, keys, args)
        replies = pipe.execute(raise_on_error=False)
        stored = {prompt for (prompt, _, _), reply in zip(scripts, replies, strict=True)
                  if not isinstance(reply, Exception)}  # fmt: skip
        totals = [sum(int(reply[i]) for reply in replies if not isinstance(reply, Exception)) for i in range(3)]
        if stored:
            appended = [a.key for a in batch.appends if a.key.prompt_id in stored]
            refits = [key for key in batch.refits if key.prompt_id in stored]
            self._cluster_run_level(run, config, appended, refits, totals)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    def _cluster_run_level(
        self, run: str, config: RunConfig, appended: list[MemoryKey], refits: list[MemoryKey], totals: list[int]
    ) -> None:
        """What the single-Redis commit script does to run-level keys, for the prompts a cluster stored."""
        pipe = self._r.pipeline(transaction=False)
        pipe.hset(self._run_key(run, "run"), "config", json.dumps(config.as_dict()))
        pipe.hsetnx(self._run_key(run, "run"), "created_at", repr(time.time()))
        pipe.sadd("meds:runs", run)
        pipe.sadd(self._run_key(run, "keys"), *[_member(key) for key in appended])
        for field, value in zip(("keys", "vectors", "rollouts"), totals, strict=True):
            pipe.hincrby(self._run_key(run, "run"), field, value)
        for key in refits:
            pipe.sadd(self._run_key(run, "pending"), _member(key))
            pipe.xadd(STREAM, {"run": run, "key": _member(key)})
        pipe.execute()

    @_translated
    def save_fits(self, run: str, fits: Sequence[Fit]) -> int:
        """Store new labels; a fit older than the stored one is ignored. Returns how many were saved."""
        pending = self._run_key(run, "pending")
        pipe = self._r.pipeline(transaction=False)
        for fit in fits:
            keys = [self._meta(run, fit.key)] + ([] if self.cluster else [pending])
            args = [fit.fit_start, fit.fitted_upto, fit.labels.astype("<i4").tobytes(), _member(fit.key)]
            self._queue_script(pipe, self._save_fit, keys, args)
        saved = [int(reply) for reply in pipe.execute()]
        if self.cluster:  # the pending set is in the run's slot: a key leaves it once its saved fit is current
            current = [_member(fit.key) for fit, reply in zip(fits, saved, strict=True) if reply == 2]
            if current:
                self._r.srem(pending, *current)
        return sum(1 for reply in saved if reply)

    # ---- locks ------------------------------------------------------------------------------------
    # A lock is taken for a short lease under a token fresh to that acquisition, and renewed in the
    # background while its batch runs: a live owner keeps it through long refit waits, a dead one's expires
    # within one lease. A commit under `locked` (same thread) is fenced by that token, so an owner whose
    # lease lapsed (a stall, a partition) has its commit refused instead of racing the lock's next owner.

    @contextmanager
    def locked(self, run: str, prompt_ids: Sequence[str]) -> Iterator[None]:
        """Hold the locks of these prompts (all or none at a time, so two replicas never deadlock)."""
        names = sorted({self._prompt_key(run, p, "lock") for p in set(prompt_ids)})  # hashed once per prompt
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.lock_wait_s
        delay = 0.005
        while True:
            if self._acquire(names, token):
                break
            if time.monotonic() > deadline:
                raise StoreUnavailable("prompts of this batch are being scored by another replica", retry_after=1)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 0.2)
        lease = _Lease(self, run, names, token)
        self._held.leases.append(lease)
        try:
            yield
        finally:
            self._held.leases.remove(lease)
            lease.stop()
            try:
                self._release(names, token)
            except StoreUnavailable as exc:  # harmless: the locks expire within a lease
                log.warning("prompt locks not released (%s); they expire within %d ms", exc, self.lock_lease_ms)

    def _scripts(self, script: Script, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Run a script once per (keys, args): a lone call directly (one round trip), more in one pipeline."""
        if len(calls) == 1 and not self.cluster:
            keys, args = calls[0]
            return [script(keys=keys, args=args)]
        pipe = self._r.pipeline(transaction=False)
        for keys, args in calls:
            self._queue_script(pipe, script, keys, args)
        return list(pipe.execute())

    def _per_slot(self, script: Script, names: list[str], args: Sequence[Any]) -> list[tuple[list[str], Any]]:
        """Run a lock script over these locks: once for all of them on a single Redis (one round trip, atomic),
        once per lock on a cluster (a script's keys must share a slot). Replies by group of locks."""
        groups = [[name] for name in names] if self.cluster else [names]
        return list(zip(groups, self._scripts(script, [(group, args) for group in groups]), strict=True))

    @_translated
    def _acquire(self, names: list[str], token: str) -> bool:
        """Take all these locks or none. On a cluster the locks taken before a busy one are given back."""
        replies = self._per_slot(self._lock, names, [token, self.lock_lease_ms])
        if all(int(ok) for _, ok in replies):
            return True
        if self.cluster:
            self._release([name for group, ok in replies if int(ok) for name in group], token)
        return False

    @_translated
    def _renew_locks(self, names: list[str], token: str) -> int:
        """Extend the lease of the locks still under this token; returns how many were."""
        return sum(int(held) for _, held in self._per_slot(self._renew, names, [token, self.lock_lease_ms]))

    @_translated
    def _release(self, names: list[str], token: str) -> None:
        if names:
            self._per_slot(self._unlock, names, [token])

    # ---- refit queue ------------------------------------------------------------------------------

    @_translated
    def ensure_queue(self) -> None:
        try:
            self._r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    @_translated
    def claim_refits(self, consumer: str, count: int, block_ms: int, min_idle_ms: int) -> list[QueuedRefit]:
        """Jobs for this consumer: first those a dead consumer left unacknowledged, then new ones."""
        _, messages, _ = self._r.xautoclaim(STREAM, GROUP, consumer, min_idle_ms, "0-0", count=count)
        if not messages:
            reply = self._r.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count, block=block_ms)
            messages = reply[0][1] if reply else []
        return [
            QueuedRefit(mid, fields[b"run"].decode(), _key_of(fields[b"key"])) for mid, fields in messages if fields
        ]

    @_translated
    def ack_refits(self, message_ids: Sequence[bytes]) -> None:
        if message_ids:
            pipe = self._r.pipeline(transaction=False)
            pipe.xack(STREAM, GROUP, *message_ids)
            pipe.xdel(STREAM, *message_ids)
            pipe.execute()
