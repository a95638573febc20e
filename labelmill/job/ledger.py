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
    p:missing               hash  "<job>:<batch>" -> when a sweep first found the
                                  outstanding batch with no message (labelmill/lost.py)
    p:sweep:<name>          a worker's claim on the next sweep of that name

Every counter update that could race goes through a Lua script, so a
redelivered batch never double-counts and exactly one caller learns that a
job has finished (and so writes its manifest).
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from dataclasses import replace
from typing import Any, NamedTuple, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from labelmill.errors import JobNotFound, LedgerUnavailable
from labelmill.job.model import BatchStart, JobCounts, JobSpec, JobState, Position
from labelmill.job.record import Tally
from labelmill.job.scripts import COMPLETE, FINISH_ENQUEUE, REOPEN_DEAD, TAKE_OVER
from labelmill.settings import Settings

# The job hash's counters that hold a tally by kind: "skip:<reason>" for
# objects that are no image, "err:<kind>" for images that failed, "inc:<what>"
# for an incremental job's comparison with its base (carried, new, ...).
SKIP, ERR, INC = "skip:", "err:", "inc:"


class JobKeys(NamedTuple):
    """One job's keys (see the module's docstring)."""

    job: str
    done: str
    outstanding: str
    dead: str
    attempts: str


def _spec(raw: str, pinned: str | None) -> JobSpec:
    """The spec saved at creation, with the version pinned since, if any."""
    spec = JobSpec.from_dict(json.loads(raw))
    if spec.model_version is None and pinned:
        spec = replace(spec, model_version=int(pinned))
    return spec


def _position_fields(position: Position) -> dict[str, str | int | float]:
    return {
        "batches_sent": position.batches_sent,
        "listed": position.listed,
        "last_key": position.last_key,
        "images_total": position.images_total,
        **{f"{SKIP}{k}": v for k, v in position.skipped.items()},
        **{f"{INC}{k}": v for k, v in position.incremental.items()},
    }


def _fields(fields: Mapping[str, str | int | float]) -> dict[Any, Any]:
    return dict(fields)


@contextlib.contextmanager
def _redis() -> Iterator[None]:
    """Every Redis error inside, as the ledger's own LedgerUnavailable."""
    try:
        yield
    except redis.RedisError as exc:
        raise LedgerUnavailable(f"Redis: {type(exc).__name__}: {exc}") from None


# How long a claim on a job's manifest holds before another worker (the
# sweep, or a redelivery) may take it over: its holder is presumed dead.
MANIFEST_LEASE_S = 60.0


class Ledger:
    """All of labelmill's Redis state for jobs, behind one small interface.

    The only code that knows the ledger's key and field names (with the Lua
    scripts beside it). ``r`` is the client, for tests that look underneath.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        prefix: str = "labelmill",
        ttl_s: int = 604800,
        lease_s: float = MANIFEST_LEASE_S,
    ):
        self.r = client
        self.p = prefix
        self.ttl_s = ttl_s
        self.lease_s = lease_s  # how long a claim on a job's manifest holds
        self._complete = self.r.register_script(COMPLETE)
        self._finish_enqueue = self.r.register_script(FINISH_ENQUEUE)
        self._take_over = self.r.register_script(TAKE_OVER)
        self._reopen_dead = self.r.register_script(REOPEN_DEAD)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "labelmill",
        ttl_s: int = 604800,
        lease_s: float = MANIFEST_LEASE_S,
    ) -> Ledger:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=10,
            socket_connect_timeout=5,
            health_check_interval=30,
            # One attempt per call: retrying is labelmill.retry's business
            # (redis-py would otherwise retry three times on its own).
            retry=Retry(NoBackoff(), 0),
        )
        return cls(client, prefix=prefix, ttl_s=ttl_s, lease_s=lease_s)

    @classmethod
    def from_settings(cls, s: Settings) -> Ledger:
        """The ledger as configured: a manifest claim lapses like a held message."""
        return cls.from_url(
            s.redis_url, prefix=s.key_prefix, ttl_s=s.ledger_ttl_s, lease_s=s.visibility_timeout_s
        )

    # -- keys --------------------------------------------------------------
    def keys(self, job_id: str) -> JobKeys:
        k = f"{self.p}:job:{job_id}"
        return JobKeys(k, f"{k}:done", self.outstanding_key, f"{k}:dead", f"{k}:attempts")

    def job_key(self, job_id: str) -> str:
        return self.keys(job_id).job

    @property
    def outstanding_key(self) -> str:
        return f"{self.p}:outstanding"

    @property
    def closing_key(self) -> str:
        """Jobs whose manifest is claimed, scored by when the claim lapses."""
        return f"{self.p}:closing"

    @property
    def producers_key(self) -> str:
        return f"{self.p}:producers"

    @property
    def jobs_key(self) -> str:
        return f"{self.p}:jobs"

    @property
    def missing_key(self) -> str:
        return f"{self.p}:missing"

    @staticmethod
    def member(job_id: str, batch_no: int) -> str:
        return f"{job_id}:{batch_no}"

    @staticmethod
    def batch_of(member: str) -> tuple[str, int]:
        """The (job, batch number) that ``member`` names."""
        job_id, _, batch_no = member.rpartition(":")
        return job_id, int(batch_no)

    # -- health ------------------------------------------------------------
    def ping(self) -> None:
        """Raise LedgerUnavailable unless Redis answers."""
        with _redis():
            self.r.ping()

    # -- producer side -------------------------------------------------------
    def create_job(self, spec: JobSpec) -> tuple[JobSpec, bool]:
        """Record a new job, or return the existing one with the same id (resume)."""
        key = self.job_key(spec.job_id)
        with _redis():
            created = bool(self.r.hsetnx(key, "spec", json.dumps(spec.as_dict())))
            if created:
                pipe = self.r.pipeline()
                fields: dict[str, str | float | int] = {
                    "state": JobState.ENQUEUING,
                    "created_at": spec.created_at,
                }
                if spec.model_version is not None:
                    fields["model_version"] = spec.model_version
                pipe.hset(key, mapping=_fields(fields))
                pipe.zadd(self.jobs_key, {spec.job_id: spec.created_at})
                pipe.execute()
                return spec, True
            raw, pinned = cast(list[str | None], self.r.hmget(key, ["spec", "model_version"]))
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
        with _redis():
            _, pinned = pipe.execute()
        return int(pinned)

    def restore_job(self, spec: JobSpec) -> None:
        """Recreate a job's hash from its spec (after Redis lost it)."""
        key = self.job_key(spec.job_id)
        pipe = self.r.pipeline()
        pipe.hsetnx(key, "spec", json.dumps(spec.as_dict()))
        pipe.hsetnx(key, "state", JobState.RUNNING)
        pipe.hsetnx(key, "created_at", spec.created_at)
        if spec.model_version is not None:
            pipe.hsetnx(key, "model_version", spec.model_version)
        pipe.zadd(self.jobs_key, {spec.job_id: spec.created_at})
        pipe.persist(key)
        with _redis():
            pipe.execute()

    def mark_outstanding(self, job_id: str, *batch_nos: int) -> None:
        """Count batches as outstanding (one round trip) before their messages are sent."""
        now = time.time()
        with _redis():
            self.r.zadd(self.outstanding_key, {self.member(job_id, b): now for b in batch_nos})

    def hold_producer(self, job_id: str, lease_s: float) -> None:
        """A producer is enqueuing ``job_id``, for ``lease_s`` more seconds (renew it)."""
        with _redis():
            self.r.zadd(self.producers_key, {job_id: time.time() + lease_s})

    def release_producer(self, job_id: str) -> None:
        with _redis():
            self.r.zrem(self.producers_key, job_id)

    def expired_producers(self, now: float) -> list[str]:
        """Jobs whose producer stopped renewing its lease before ``now``."""
        with _redis():
            return [str(j) for j in self.r.zrangebyscore(self.producers_key, "-inf", now)]

    def is_outstanding(self, job_id: str, batch_no: int) -> bool:
        with _redis():
            return self.r.zscore(self.outstanding_key, self.member(job_id, batch_no)) is not None

    def outstanding_total(self) -> int:
        """Batches outstanding over all jobs: what KEDA's trigger reads (ZCARD)."""
        with _redis():
            return int(self.r.zcard(self.outstanding_key))

    def record_enqueued(self, job_id: str, position: Position) -> None:
        """Save the producer's position (after a group's messages were sent)."""
        with _redis():
            self.r.hset(self.job_key(job_id), mapping=_fields(_position_fields(position)))

    def count_sent(self, job_id: str, n: int) -> None:
        """Count ``n`` more batches sent (``reconcile`` re-sends them out of order)."""
        with _redis():
            self.r.hincrby(self.job_key(job_id), "batches_sent", n)

    def finish_enqueue(self, job_id: str, batches_total: int, position: Position | None) -> bool:
        """Mark enqueuing complete; True if the job is already finished and ours to close."""
        fields = _position_fields(position) if position else {}
        with _redis():
            claimed = self._finish_enqueue(
                keys=[self.job_key(job_id), self.closing_key],
                args=[batches_total, json.dumps(fields), uuid.uuid4().hex, job_id, self.lease_s],
            )
        return bool(claimed)

    def take_over_manifest(self, job_id: str) -> bool:
        """Claim a complete job's manifest whose claim lapsed (its holder died); True if ours."""
        with _redis():
            return bool(
                self._take_over(
                    keys=[self.job_key(job_id), self.closing_key],
                    args=[uuid.uuid4().hex, job_id, self.lease_s],
                )
            )

    def lapsed_claims(self) -> list[str]:
        """Jobs whose manifest claim lapsed before its holder wrote the manifest."""
        with _redis():
            seconds, micros = self.r.time()
            now = seconds + micros / 1e6
            return [str(j) for j in self.r.zrangebyscore(self.closing_key, "-inf", now)]

    def window(self, job_id: str) -> tuple[JobState, int]:
        """The job's state and how many of its batches are queued or running."""
        with _redis():
            state, sent, done = self.r.hmget(
                self.job_key(job_id), ["state", "batches_sent", "batches_done"]
            )
        if state is None:
            raise JobNotFound(f"unknown job {job_id}")
        return JobState(str(state)), int(sent or 0) - int(done or 0)

    # -- worker side ---------------------------------------------------------
    def begin_batch(self, job_id: str, batch_no: int) -> BatchStart:
        """Count a delivery and say whether the batch still needs doing."""
        keys = self.keys(job_id)
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(keys.job, ["spec", "state", "model_version"])
        pipe.getbit(keys.done, batch_no)
        pipe.hincrby(keys.attempts, str(batch_no), 1)
        with _redis():
            (raw_spec, state, pinned), done, attempt = pipe.execute()
        return BatchStart(
            spec=_spec(raw_spec, pinned) if raw_spec else None,
            # The spec is written an instant before the state (create_job).
            state=JobState(state or JobState.ENQUEUING) if raw_spec else None,
            already_done=bool(done),
            attempt=int(attempt),
        )

    def complete_batch(
        self,
        job_id: str,
        batch_no: int,
        tally: Tally,
        *,
        token: str | None = None,
    ) -> tuple[bool, bool]:
        """Count a finished batch once. Returns (counted, job_finished_and_ours).

        A batch whose every record is a ``dead`` error counts as dead.

        Retry a failed call with the same ``token`` (one per delivery): if the
        first call claimed the manifest before its reply was lost, the retry
        still returns ``job_finished_and_ours``.
        """
        token = token or uuid.uuid4().hex
        keys = self.keys(job_id)
        with _redis():
            counted, claimed = self._complete(
                keys=[keys.job, keys.done, keys.outstanding, keys.dead, self.closing_key],
                args=[
                    batch_no,
                    self.member(job_id, batch_no),
                    tally.ok,
                    sum(tally.errors.values()),
                    int(tally.dead),
                    json.dumps(dict(tally.errors)) if tally.errors else "{}",
                    token,
                    tally.weights or "",
                    job_id,
                    self.lease_s,
                ],
            )
        return bool(counted), bool(claimed)

    def drop_outstanding(self, job_id: str, *batch_nos: int) -> None:
        with _redis():
            self.r.zrem(self.outstanding_key, *(self.member(job_id, b) for b in batch_nos))

    def mark_done(self, job_id: str) -> None:
        """The manifest is written: the job is done; its keys now expire."""
        keys = self.keys(job_id)
        pipe = self.r.pipeline()
        pipe.hset(keys.job, "state", JobState.DONE)
        pipe.hsetnx(keys.job, "finished_at", time.time())  # set by the claim, normally
        pipe.zrem(self.closing_key, job_id)
        for k in (keys.job, keys.done, keys.dead, keys.attempts):
            pipe.expire(k, self.ttl_s)
        with _redis():
            pipe.execute()

    # -- queries ---------------------------------------------------------------
    def counts(self, job_id: str) -> JobCounts:
        """Everything the ledger knows about a job."""
        with _redis():
            h = cast(dict[str, str], self.r.hgetall(self.job_key(job_id)))
        if not h or "spec" not in h:
            raise JobNotFound(f"unknown job {job_id}")

        def num(name: str) -> int:
            return int(h.get(name, 0) or 0)

        def opt(name: str) -> float | None:
            return float(h[name]) if h.get(name) else None

        return JobCounts(
            spec=_spec(h["spec"], h.get("model_version")),
            state=JobState(h.get("state", JobState.ENQUEUING)),
            listed=num("listed"),
            last_key=h.get("last_key", ""),
            images_total=num("images_total"),
            images_ok=num("images_ok"),
            images_error=num("images_error"),
            skipped={k.removeprefix(SKIP): int(v) for k, v in h.items() if k.startswith(SKIP)},
            incremental={k.removeprefix(INC): int(v) for k, v in h.items() if k.startswith(INC)},
            errors={
                k.removeprefix(ERR): int(v) for k, v in h.items() if k.startswith(ERR) and int(v)
            },
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
        with _redis():
            return sorted(int(b) for b in self.r.smembers(self.keys(job_id).dead))

    def is_done(self, job_id: str, batch_no: int) -> bool:
        with _redis():
            return bool(self.r.getbit(self.keys(job_id).done, batch_no))

    def settled(self, job_id: str, batch_no: int) -> bool:
        """The batch is done and no manifest of its job is being written.

        What a stopping worker waits for (``workers.shutdown``): past this
        point its pool has nothing of the batch left to do.
        """
        pipe = self.r.pipeline(transaction=False)
        pipe.getbit(self.keys(job_id).done, batch_no)
        pipe.zscore(self.closing_key, job_id)
        with _redis():
            done, closing = pipe.execute()
        return bool(done) and closing is None

    def attempts(self, job_id: str) -> dict[int, int]:
        """Deliveries so far, by batch number."""
        with _redis():
            raw = cast(dict[str, str], self.r.hgetall(self.keys(job_id).attempts))
        return {int(b): int(n) for b, n in raw.items()}

    def outstanding_batches(self, job_id: str) -> Iterator[int]:
        """Batch numbers of this job in the outstanding set."""
        prefix = f"{job_id}:"
        with _redis():
            for member, _score in self.r.zscan_iter(self.outstanding_key, match=f"{prefix}*"):
                yield int(str(member)[len(prefix) :])

    def outstanding_by_job(self) -> dict[str, list[int]]:
        """Every outstanding batch, by job."""
        found: dict[str, list[int]] = {}
        with _redis():
            for member, _score in self.r.zscan_iter(self.outstanding_key, count=1000):
                job_id, batch_no = self.batch_of(str(member))
                found.setdefault(job_id, []).append(batch_no)
        return found

    def done_among(self, job_id: str, batch_nos: Collection[int]) -> set[int]:
        """Which of ``batch_nos`` are done (one round trip)."""
        key = self.keys(job_id).done
        pipe = self.r.pipeline(transaction=False)
        for b in batch_nos:
            pipe.getbit(key, b)
        with _redis():
            bits = pipe.execute()
        return {b for b, bit in zip(batch_nos, bits, strict=True) if bit}

    # -- sweeps (labelmill/orphans.py, labelmill/lost.py) ----------------------
    def claim_sweep(self, name: str, period_s: float) -> bool:
        """True for one caller per ``period_s``: the worker that runs this round's sweep."""
        with _redis():
            return bool(
                self.r.set(f"{self.p}:sweep:{name}", "1", nx=True, px=max(1, int(period_s * 1000)))
            )

    def missing_since(self) -> dict[tuple[str, int], float]:
        """The batches the last sweep found without a message, and since when."""
        with _redis():
            raw = cast(dict[str, str], self.r.hgetall(self.missing_key))
        return {self.batch_of(member): float(since) for member, since in raw.items()}

    def set_missing(self, since: Mapping[tuple[str, int], float], keep_s: float) -> None:
        """Replace that list; it lapses ``keep_s`` after this sweep."""
        pipe = self.r.pipeline()
        pipe.delete(self.missing_key)
        if since:
            pipe.hset(
                self.missing_key, mapping={self.member(j, b): t for (j, b), t in since.items()}
            )
            pipe.pexpire(self.missing_key, max(1, int(keep_s * 1000)))
        with _redis():
            pipe.execute()

    def recent_jobs(self, limit: int = 20) -> list[str]:
        with _redis():
            return [str(j) for j in self.r.zrevrange(self.jobs_key, 0, limit - 1)]

    # -- operator commands -------------------------------------------------------
    def cancel(self, job_id: str) -> int:
        """Cancel a job: its queued batches are dropped when delivered. Returns how many."""
        self.counts(job_id)  # raises JobNotFound
        members = [self.member(job_id, b) for b in self.outstanding_batches(job_id)]
        pipe = self.r.pipeline()
        pipe.hset(
            self.job_key(job_id), mapping={"state": JobState.CANCELLED, "finished_at": time.time()}
        )
        if members:
            pipe.zrem(self.outstanding_key, *members)
        with _redis():
            pipe.execute()
        return len(members)

    def reopen_dead(self, job_id: str, batch_no: int, n_images: int) -> bool:
        """Undo a dead batch's counts so that `retry` can run it again."""
        with _redis():
            return bool(
                self._reopen_dead(
                    keys=[*self.keys(job_id), self.closing_key],
                    args=[batch_no, self.member(job_id, batch_no), n_images, time.time(), job_id],
                )
            )

    def reset_counts(self, job_id: str, *, done_batches: Mapping[int, Tally]) -> None:
        """Rebuild a job's counters from the part files storage holds (`reconcile`).

        ``done_batches``: batch number -> the tally of its part file. The job
        runs again.
        """
        keys = self.keys(job_id)
        ok = sum(t.ok for t in done_batches.values())
        errors: Counter[str] = Counter()
        for t in done_batches.values():
            errors.update(t.errors)
        with _redis():
            old = [str(k) for k in self.r.hkeys(keys.job) if str(k).startswith(ERR)]
        pipe = self.r.pipeline()
        pipe.delete(keys.done, keys.dead, keys.attempts)
        if old:
            pipe.hdel(keys.job, *old)
        for b, t in done_batches.items():
            pipe.setbit(keys.done, b, 1)
            if t.dead:
                pipe.sadd(keys.dead, b)
        mapping: dict[str, str | int | float] = {
            "images_ok": ok,
            "images_error": sum(errors.values()),
            "batches_done": len(done_batches),
            # What is in flight is sent again and counted as it goes (count_sent).
            "batches_sent": len(done_batches),
            "batches_dead": sum(1 for t in done_batches.values() if t.dead),
            **{f"{ERR}{k}": v for k, v in errors.items()},
            "state": JobState.RUNNING,
        }
        pipe.hset(keys.job, mapping=_fields(mapping))
        pipe.hdel(keys.job, "manifest_claim", "manifest_until", "finished_at")
        pipe.zrem(self.closing_key, job_id)
        with _redis():
            pipe.execute()
