"""The job ledger in Redis: specs, counters, the done bitmap, the outstanding set.

Keys (prefix ``p``, default ``labelmill``)::

    p:jobs                  zset  job id -> creation time
    p:job:<id>              hash  spec, state, totals, counters, the pinned
                                  model version (``model_version``)
    p:job:<id>:done         bitmap of finished batch numbers (dead ones too)
    p:job:<id>:dead         set of batch numbers declared dead
    p:job:<id>:attempts     hash  batch number -> deliveries
    p:outstanding           zset  "<job>:<batch>" -> enqueue time (KEDA reads ZCARD)
    p:producers             zset  job id -> lease expiry of its running producer
                                  (labelmill/orphans.py)

Every counter update that could race goes through a Lua script, so a
redelivered batch never double-counts and exactly one caller learns that a
job has finished (and so writes its manifest).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import redis

from labelmill.errors import JobNotFound, LedgerUnavailable
from labelmill.ledger_scripts import COMPLETE, FINISH_ENQUEUE, REOPEN_DEAD


@dataclass(frozen=True)
class JobSpec:
    """What a job is: where from, where to, how, with which model version.

    ``model_version`` is None until the version is pinned: at enqueue when a
    model server answers then, or else by the job's first batch to meet an
    AVAILABLE server (``Ledger.pin_model_version``).
    """

    job_id: str
    input: str
    output: str
    batch_size: int
    model_name: str
    model_version: int | None
    created_at: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "input": self.input,
            "output": self.output,
            "batch_size": self.batch_size,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        return cls(
            job_id=str(d["job_id"]),
            input=str(d["input"]),
            output=str(d["output"]),
            batch_size=int(d["batch_size"]),
            model_name=str(d["model_name"]),
            model_version=None if d.get("model_version") is None else int(d["model_version"]),
            created_at=float(d["created_at"]),
        )


@dataclass(frozen=True)
class BatchStart:
    """What a worker needs to know when a batch is delivered."""

    spec: JobSpec | None  # None: the job is unknown (expired or never created)
    state: str
    already_done: bool
    attempt: int


@dataclass
class JobCounts:
    """A snapshot of a job's hash, parsed."""

    spec: JobSpec
    state: str
    listed: int = 0
    last_key: str = ""
    images_total: int = 0
    images_ok: int = 0
    images_error: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    batches_sent: int = 0
    batches_total: int | None = None
    batches_done: int = 0
    batches_dead: int = 0
    enqueue_complete: bool = False
    model_weights: str = ""
    created_at: float = 0.0
    finished_at: float | None = None

    @property
    def images_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def batches_outstanding(self) -> int:
        return max(0, self.batches_sent - self.batches_done)


def _spec(raw: str, pinned: str | None) -> JobSpec:
    """The spec saved at creation, with the version pinned since, if any."""
    spec = JobSpec.from_dict(json.loads(raw))
    if spec.model_version is None and pinned:
        spec = replace(spec, model_version=int(pinned))
    return spec


def _fields(fields: Mapping[str, str | int | float]) -> dict[Any, Any]:
    return dict(fields)


def _wrap(exc: redis.RedisError) -> LedgerUnavailable:
    return LedgerUnavailable(f"Redis: {type(exc).__name__}: {exc}")


class Ledger:
    """All of labelmill's Redis state for jobs, behind one small interface."""

    def __init__(self, client: redis.Redis, *, prefix: str = "labelmill", ttl_s: int = 604800):
        self.r = client
        self.p = prefix
        self.ttl_s = ttl_s
        self._complete = self.r.register_script(COMPLETE)
        self._finish_enqueue = self.r.register_script(FINISH_ENQUEUE)
        self._reopen_dead = self.r.register_script(REOPEN_DEAD)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "labelmill", ttl_s: int = 604800) -> Ledger:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        return cls(client, prefix=prefix, ttl_s=ttl_s)

    # -- keys --------------------------------------------------------------
    def job_key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    @property
    def outstanding_key(self) -> str:
        return f"{self.p}:outstanding"

    @property
    def producers_key(self) -> str:
        return f"{self.p}:producers"

    @property
    def jobs_key(self) -> str:
        return f"{self.p}:jobs"

    def _keys(self, job_id: str) -> list[str]:
        k = self.job_key(job_id)
        return [k, f"{k}:done", self.outstanding_key, f"{k}:dead", f"{k}:attempts"]

    @staticmethod
    def member(job_id: str, batch_no: int) -> str:
        return f"{job_id}:{batch_no}"

    # -- health ------------------------------------------------------------
    def ping(self) -> None:
        """Raise LedgerUnavailable unless Redis answers."""
        try:
            self.r.ping()
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    # -- producer side -------------------------------------------------------
    def create_job(self, spec: JobSpec) -> tuple[JobSpec, bool]:
        """Record a new job, or return the existing one with the same id (resume)."""
        key = self.job_key(spec.job_id)
        try:
            created = bool(self.r.hsetnx(key, "spec", json.dumps(spec.as_dict())))
            if created:
                pipe = self.r.pipeline()
                fields: dict[str, str | float | int] = {
                    "state": "enqueuing",
                    "created_at": spec.created_at,
                }
                if spec.model_version is not None:
                    fields["model_version"] = spec.model_version
                pipe.hset(key, mapping=_fields(fields))
                pipe.zadd(self.jobs_key, {spec.job_id: spec.created_at})
                pipe.execute()
                return spec, True
            raw, pinned = cast(list[str | None], self.r.hmget(key, ["spec", "model_version"]))
        except redis.RedisError as exc:
            raise _wrap(exc) from None
        return _spec(str(raw), pinned), False

    def pin_model_version(self, job_id: str, version: int) -> int:
        """Pin ``version`` for the whole job unless one is pinned already; return the pin.

        HSETNX makes the first caller win: every batch of a job then asks the
        model server for the same version (one version per job).
        """
        key = self.job_key(job_id)
        pipe = self.r.pipeline()  # MULTI: the read sees the write that won
        pipe.hsetnx(key, "model_version", version)
        pipe.hget(key, "model_version")
        try:
            _, pinned = pipe.execute()
        except redis.RedisError as exc:
            raise _wrap(exc) from None
        return int(pinned)

    def restore_job(self, spec: JobSpec) -> None:
        """Recreate a job's hash from its spec (after Redis lost it)."""
        key = self.job_key(spec.job_id)
        pipe = self.r.pipeline()
        pipe.hsetnx(key, "spec", json.dumps(spec.as_dict()))
        pipe.hsetnx(key, "state", "running")
        pipe.hsetnx(key, "created_at", spec.created_at)
        if spec.model_version is not None:
            pipe.hsetnx(key, "model_version", spec.model_version)
        pipe.zadd(self.jobs_key, {spec.job_id: spec.created_at})
        pipe.persist(key)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def mark_outstanding(self, job_id: str, *batch_nos: int) -> None:
        """Count batches as outstanding (one round trip) before their messages are sent."""
        now = time.time()
        try:
            self.r.zadd(self.outstanding_key, {self.member(job_id, b): now for b in batch_nos})
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def hold_producer(self, job_id: str, lease_s: float) -> None:
        """A producer is enqueuing ``job_id``, for ``lease_s`` more seconds (renew it)."""
        try:
            self.r.zadd(self.producers_key, {job_id: time.time() + lease_s})
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def release_producer(self, job_id: str) -> None:
        try:
            self.r.zrem(self.producers_key, job_id)
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def expired_producers(self, now: float) -> list[str]:
        """Jobs whose producer stopped renewing its lease before ``now``."""
        try:
            return [str(j) for j in self.r.zrangebyscore(self.producers_key, "-inf", now)]
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def is_outstanding(self, job_id: str, batch_no: int) -> bool:
        try:
            return self.r.zscore(self.outstanding_key, self.member(job_id, batch_no)) is not None
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def record_enqueued(self, job_id: str, fields: Mapping[str, str | int | float]) -> None:
        """Save the producer's position (after a batch's message was sent)."""
        try:
            self.r.hset(self.job_key(job_id), mapping=_fields(fields))
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def finish_enqueue(
        self, job_id: str, batches_total: int, fields: Mapping[str, str | int | float]
    ) -> bool:
        """Mark enqueuing complete; True if the job is already finished and ours to close."""
        try:
            claimed = self._finish_enqueue(
                keys=[self.job_key(job_id)], args=[batches_total, json.dumps(dict(fields))]
            )
        except redis.RedisError as exc:
            raise _wrap(exc) from None
        return bool(claimed)

    def window(self, job_id: str) -> tuple[str, int]:
        """The job's state and how many of its batches are queued or running."""
        try:
            state, sent, done = self.r.hmget(
                self.job_key(job_id), ["state", "batches_sent", "batches_done"]
            )
        except redis.RedisError as exc:
            raise _wrap(exc) from None
        if state is None:
            raise JobNotFound(f"unknown job {job_id}")
        return str(state), int(sent or 0) - int(done or 0)

    # -- worker side ---------------------------------------------------------
    def begin_batch(self, job_id: str, batch_no: int) -> BatchStart:
        """Count a delivery and say whether the batch still needs doing."""
        key = self.job_key(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(key, ["spec", "state", "model_version"])
        pipe.getbit(f"{key}:done", batch_no)
        pipe.hincrby(f"{key}:attempts", str(batch_no), 1)
        try:
            (raw_spec, state, pinned), done, attempt = pipe.execute()
        except redis.RedisError as exc:
            raise _wrap(exc) from None
        spec = _spec(raw_spec, pinned) if raw_spec else None
        return BatchStart(
            spec=spec, state=str(state or ""), already_done=bool(done), attempt=int(attempt)
        )

    def complete_batch(
        self,
        job_id: str,
        batch_no: int,
        *,
        ok: int,
        errors: Mapping[str, int],
        dead: bool = False,
        weights: str | None = None,
        token: str | None = None,
    ) -> tuple[bool, bool]:
        """Count a finished batch once. Returns (counted, job_finished_and_ours).

        Retry a failed call with the same ``token`` (one per delivery): if the
        first call claimed the manifest before its reply was lost, the retry
        still returns ``job_finished_and_ours``.
        """
        token = token or uuid.uuid4().hex
        keys = self._keys(job_id)[:4]
        n_err = sum(errors.values())
        try:
            counted, claimed = self._complete(
                keys=keys,
                args=[
                    batch_no,
                    self.member(job_id, batch_no),
                    ok,
                    n_err,
                    int(dead),
                    json.dumps(dict(errors)) if errors else "{}",
                    token,
                    weights or "",
                ],
            )
        except redis.RedisError as exc:
            raise _wrap(exc) from None
        return bool(counted), bool(claimed)

    def drop_outstanding(self, job_id: str, *batch_nos: int) -> None:
        try:
            self.r.zrem(self.outstanding_key, *(self.member(job_id, b) for b in batch_nos))
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def mark_done(self, job_id: str) -> None:
        """The manifest is written: the job is done; its keys now expire."""
        keys = self._keys(job_id)
        pipe = self.r.pipeline()
        pipe.hset(keys[0], mapping={"state": "done", "finished_at": time.time()})
        for k in (keys[0], keys[1], keys[3], keys[4]):
            pipe.expire(k, self.ttl_s)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    # -- queries ---------------------------------------------------------------
    def counts(self, job_id: str) -> JobCounts:
        """Everything the ledger knows about a job."""
        try:
            h = cast(dict[str, str], self.r.hgetall(self.job_key(job_id)))
        except redis.RedisError as exc:
            raise _wrap(exc) from None
        if not h or "spec" not in h:
            raise JobNotFound(f"unknown job {job_id}")

        def num(name: str) -> int:
            return int(h.get(name, 0) or 0)

        def opt(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        return JobCounts(
            spec=_spec(h["spec"], h.get("model_version")),
            state=h.get("state", ""),
            listed=num("listed"),
            last_key=h.get("last_key", ""),
            images_total=num("images_total"),
            images_ok=num("images_ok"),
            images_error=num("images_error"),
            skipped={k[5:]: int(v) for k, v in h.items() if k.startswith("skip:")},
            errors={k[4:]: int(v) for k, v in h.items() if k.startswith("err:") and int(v)},
            batches_sent=num("batches_sent"),
            batches_total=int(h["batches_total"]) if h.get("batches_total") else None,
            batches_done=num("batches_done"),
            batches_dead=num("batches_dead"),
            enqueue_complete=h.get("enqueue_complete") == "1",
            model_weights=h.get("model_weights", ""),
            created_at=float(h.get("created_at", 0) or 0),
            finished_at=opt("finished_at"),
        )

    def dead_batches(self, job_id: str) -> list[int]:
        try:
            return sorted(int(b) for b in self.r.smembers(f"{self.job_key(job_id)}:dead"))
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def is_done(self, job_id: str, batch_no: int) -> bool:
        try:
            return bool(self.r.getbit(f"{self.job_key(job_id)}:done", batch_no))
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def outstanding_batches(self, job_id: str) -> Iterator[int]:
        """Batch numbers of this job in the outstanding set."""
        prefix = f"{job_id}:"
        try:
            for member, _score in self.r.zscan_iter(self.outstanding_key, match=f"{prefix}*"):
                yield int(str(member)[len(prefix) :])
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def recent_jobs(self, limit: int = 20) -> list[str]:
        try:
            return [str(j) for j in self.r.zrevrange(self.jobs_key, 0, limit - 1)]
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    # -- operator commands -------------------------------------------------------
    def cancel(self, job_id: str) -> int:
        """Cancel a job: its queued batches are dropped when delivered. Returns how many."""
        self.counts(job_id)  # raises JobNotFound
        members = [self.member(job_id, b) for b in self.outstanding_batches(job_id)]
        pipe = self.r.pipeline()
        pipe.hset(self.job_key(job_id), mapping={"state": "cancelled", "finished_at": time.time()})
        if members:
            pipe.zrem(self.outstanding_key, *members)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise _wrap(exc) from None
        return len(members)

    def reopen_dead(self, job_id: str, batch_no: int, n_images: int) -> bool:
        """Undo a dead batch's counts so that `retry` can run it again."""
        try:
            return bool(
                self._reopen_dead(
                    keys=self._keys(job_id),
                    args=[batch_no, self.member(job_id, batch_no), n_images, time.time()],
                )
            )
        except redis.RedisError as exc:
            raise _wrap(exc) from None

    def reset_counts(
        self,
        job_id: str,
        *,
        done_batches: Mapping[int, tuple[int, dict[str, int], bool]],
        fields: Mapping[str, str | int | float],
    ) -> None:
        """Rebuild a job's counters from what storage holds (`reconcile`).

        ``done_batches`` maps batch number -> (ok, errors by kind, dead).
        """
        key, done_key, _out, dead_key, att_key = self._keys(job_id)
        ok = sum(v[0] for v in done_batches.values())
        errors: dict[str, int] = {}
        for _ok, errs, _dead in done_batches.values():
            for kind, n in errs.items():
                errors[kind] = errors.get(kind, 0) + n
        old = [str(k) for k in self.r.hkeys(key) if str(k).startswith("err:")]
        pipe = self.r.pipeline()
        pipe.delete(done_key, dead_key, att_key)
        if old:
            pipe.hdel(key, *old)
        for b, (_ok, _errs, dead) in done_batches.items():
            pipe.setbit(done_key, b, 1)
            if dead:
                pipe.sadd(dead_key, b)
        mapping: dict[str, str | int | float] = {
            "images_ok": ok,
            "images_error": sum(errors.values()),
            "batches_done": len(done_batches),
            "batches_dead": sum(1 for v in done_batches.values() if v[2]),
            **{f"err:{k}": v for k, v in errors.items()},
            **fields,
        }
        pipe.hset(key, mapping=_fields(mapping))
        pipe.hdel(key, "manifest_claim", "finished_at")
        try:
            pipe.execute()
        except redis.RedisError as exc:
            raise _wrap(exc) from None
