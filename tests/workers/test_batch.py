"""The batch body with in-memory storage and a fake model; the ledger is real Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest

from labelmill.errors import InferenceError, ModelNotFound, ModelUnavailable, StorageUnavailable
from labelmill.job import JobSpec, Ledger, Position
from labelmill.job.record import loads_lines
from labelmill.model_client import Prediction
from labelmill.settings import Settings
from labelmill.storage import Storage
from tests import images
from tests.memory_storage import MemoryObjects, memory_storage
from workers.batch import Services, run_batch

pytestmark = pytest.mark.integration  # the ledger is a real Redis


class FakeModel:
    """Answers like the model server; can fail a given number of times."""

    def __init__(self, version: int = 3) -> None:
        self.version = version
        self.calls: list[tuple[int, int | None]] = []
        self.failures: list[Exception] = []

    def predict(self, images: Sequence[np.ndarray], *, version: int | None = None) -> Prediction:
        batch = np.stack(images)
        self.calls.append((len(batch), version))
        if self.failures:
            raise self.failures.pop(0)
        n = len(batch)
        means = batch.reshape(n, -1).mean(axis=1)
        ids = np.array([[int(m) % 1000, 1, 2, 3, 4] for m in means], dtype=np.int32)
        return Prediction(
            class_ids=ids,
            classes=[[f"class-{i}" for i in row] for row in ids],
            scores=np.tile(np.array([0.5, 0.2, 0.1, 0.1, 0.1], np.float32), (n, 1)),
            weights=["random:seed=1"] * n,
            version=self.version,
        )

    def close(self) -> None:
        pass


@pytest.fixture
def memory() -> MemoryObjects:
    return MemoryObjects()


@pytest.fixture
def svc(redis_url: str, memory: MemoryObjects) -> Iterator[Services]:
    settings = Settings(redis_url=redis_url, retry_budget_s=2.0, max_deliveries=3)
    s = Services(
        settings=settings,
        storage=Storage(settings, backends={"s3": memory, "file": memory}),
        ledger=Ledger.from_url(redis_url),
        model=FakeModel(),  # type: ignore[arg-type]
    )
    yield s
    s.close()


def _job(svc: Services, n_batches: int = 1) -> JobSpec:
    spec, _ = svc.ledger.create_job(
        JobSpec("j", "s3://src-bucket/p/", "s3://dst-bucket/l", 4, "inception", 3, 1.0)
    )
    svc.ledger.finish_enqueue(
        "j", n_batches, Position(n_batches, 4 * n_batches, "", images_total=4 * n_batches)
    )
    return spec


def _put(svc: Services, name: str, data: bytes) -> str:
    uri = f"s3://src-bucket/p/{name}"
    svc.storage.put(uri, data)
    return uri


def _part(svc: Services, batch: int = 0) -> list[dict[str, Any]]:
    data = svc.storage.read(f"s3://dst-bucket/l/j/part-{batch:09d}.jsonl")
    assert data is not None
    return loads_lines(data)


def test_good_and_bad_images_each_get_one_line(svc: Services) -> None:
    _job(svc)
    uris = [
        _put(svc, "a.jpg", images.jpeg(40, 30, seed=1)),
        _put(svc, "b.png", b""),
        _put(svc, "c.jpg", images.truncated_jpeg()),
        "s3://src-bucket/p/gone.jpg",
    ]
    out = run_batch(svc, job_id="j", batch_no=0, uris=uris)
    assert out.status == "done" and out.finished_job
    lines = _part(svc)
    assert [r["uri"] for r in lines] == uris
    assert [r["status"] for r in lines] == ["ok", "error", "error", "error"]
    assert [r.get("error", {}).get("kind") for r in lines[1:]] == ["empty", "decode", "not_found"]
    assert lines[0]["model"] == {
        "name": "inception",
        "version": 3,
        "weights": "random:seed=1",
        "note": "random weights: labels are meaningless",
    }
    assert svc.model.calls == [(1, 3)]  # type: ignore[attr-defined]
    manifest = json.loads(svc.storage.read("s3://dst-bucket/l/j/_manifest.json") or b"{}")
    assert manifest["images"]["ok"] == 1 and manifest["errors"]["not_found"] == 1
    assert svc.storage.exists("s3://dst-bucket/l/j/_SUCCESS")
    assert svc.ledger.counts("j").state == "done"


def test_redelivery_is_a_no_op(svc: Services) -> None:
    _job(svc, n_batches=2)
    uris = [_put(svc, "a.jpg", images.jpeg(20, 20))]
    run_batch(svc, job_id="j", batch_no=0, uris=uris)
    before = svc.storage.read("s3://dst-bucket/l/j/part-000000000.jsonl")
    again = run_batch(svc, job_id="j", batch_no=0, uris=uris)
    assert again.status == "skipped:already-done"
    assert svc.storage.read("s3://dst-bucket/l/j/part-000000000.jsonl") == before
    assert svc.ledger.counts("j").images_ok == 1


def test_model_down_then_up_is_retried(svc: Services) -> None:
    _job(svc)
    svc.model.failures = [ModelUnavailable("down"), ModelUnavailable("down")]  # type: ignore[attr-defined]
    out = run_batch(svc, job_id="j", batch_no=0, uris=[_put(svc, "a.jpg", images.jpeg())])
    assert out.status == "done" and out.ok == 1


def test_model_down_past_budget_makes_the_batch_dead(svc: Services) -> None:
    _job(svc)
    svc.model.failures = [ModelUnavailable("down")] * 1000  # type: ignore[attr-defined]
    uris = [_put(svc, "a.jpg", images.jpeg()), _put(svc, "b.jpg", images.jpeg(seed=2))]
    out = run_batch(svc, job_id="j", batch_no=0, uris=uris)
    assert out.status == "dead"
    lines = _part(svc)
    assert [r["error"]["kind"] for r in lines] == ["dead", "dead"]
    assert "retry budget" in lines[0]["error"]["message"]
    assert svc.ledger.dead_batches("j") == [0]


def test_invalid_batch_gives_inference_lines(svc: Services) -> None:
    _job(svc)
    svc.model.failures = [InferenceError("bad shape")]  # type: ignore[attr-defined]
    out = run_batch(svc, job_id="j", batch_no=0, uris=[_put(svc, "a.jpg", images.jpeg())])
    assert out.errors == {"inference": 1}
    assert svc.model.calls == [(1, 3)]  # type: ignore[attr-defined]  # not retried


def test_a_version_the_server_reached_does_not_serve_yet_is_waited_for(svc: Services) -> None:
    # While a version rolls out, the next try may reach a pod that serves it.
    _job(svc)
    svc.model.failures = [ModelNotFound("Specific(inception, 3)")] * 2  # type: ignore[attr-defined]
    out = run_batch(svc, job_id="j", batch_no=0, uris=[_put(svc, "a.jpg", images.jpeg())])
    assert out.status == "done" and out.ok == 1
    assert svc.model.calls == [(1, 3)] * 3  # type: ignore[attr-defined]


def test_a_version_still_not_served_after_the_version_wait_is_dead(svc: Services) -> None:
    _job(svc)
    svc.settings = svc.settings.model_copy(update={"version_wait_s": 0.0})
    svc.model.failures = [ModelNotFound("inception version 3 is not served")]  # type: ignore[attr-defined]
    out = run_batch(svc, job_id="j", batch_no=0, uris=[_put(svc, "a.jpg", images.jpeg())])
    assert out.status == "dead"
    assert "not served" in _part(svc)[0]["error"]["message"]
    assert svc.model.calls == [(1, 3)]  # type: ignore[attr-defined]  # not retried


def test_transient_storage_errors_are_retried(svc: Services, memory: MemoryObjects) -> None:
    _job(svc)
    uri = _put(svc, "a.jpg", images.jpeg())
    memory.fail(uri, StorageUnavailable("503 SlowDown"), times=2)
    out = run_batch(svc, job_id="j", batch_no=0, uris=[uri])
    assert out.ok == 1


def test_too_many_deliveries_make_the_batch_dead(svc: Services) -> None:
    _job(svc)
    svc.ledger.r.hset("labelmill:job:j:attempts", "0", 3)
    out = run_batch(svc, job_id="j", batch_no=0, uris=[_put(svc, "a.jpg", images.jpeg())])
    assert out.status == "dead" and out.attempt == 4
    assert "delivered 4 times" in _part(svc)[0]["error"]["message"]
    assert svc.model.calls == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("job_id", "batch_no", "uris", "etags"),
    [
        ("../x", 0, [], None),
        ("j", -1, [], None),
        ("j", 0, "s3://src-bucket/p/a.jpg", None),
        ("j", 0, ["s3://src-bucket/p/a.jpg"], ["e1", "e2"]),  # one ETag too many
        ("j", 0, ["s3://src-bucket/p/a.jpg"], [7]),
    ],
)
def test_a_malformed_message_is_refused_before_redis(
    svc: Services, job_id: Any, batch_no: Any, uris: Any, etags: Any
) -> None:
    _job(svc)
    out = run_batch(svc, job_id=job_id, batch_no=batch_no, uris=uris, etags=etags)
    assert out.status == "skipped:malformed"
    assert svc.ledger.attempts("j") == {}  # not even counted as a delivery


def test_an_image_changed_since_listing_gets_a_changed_line(svc: Services) -> None:
    _job(svc)
    same = _put(svc, "same.jpg", images.jpeg(20, 20, seed=1))
    changed = _put(svc, "changed.jpg", images.jpeg(20, 20, seed=2))
    etags = {o.uri: o.etag for o in svc.storage.list("s3://src-bucket/p/")}
    svc.storage.put(changed, images.jpeg(20, 20, seed=3))
    out = run_batch(
        svc, job_id="j", batch_no=0, uris=[same, changed], etags=[etags[same], etags[changed]]
    )
    assert out.status == "done" and out.errors == {"changed": 1}
    ok, bad = _part(svc)
    assert ok["status"] == "ok" and ok["etag"] == etags[same]
    assert bad["error"]["kind"] == "changed"
    assert bad["error"]["listed_etag"] == etags[changed] != bad["error"]["etag"]


def test_cancelled_and_unknown_jobs_are_dropped(svc: Services) -> None:
    _job(svc)
    svc.ledger.mark_outstanding("j", 0)
    svc.ledger.cancel("j")
    out = run_batch(svc, job_id="j", batch_no=0, uris=["s3://src-bucket/p/a.jpg"])
    assert out.status == "skipped:cancelled"
    assert run_batch(svc, job_id="nope", batch_no=0, uris=[]).status == "skipped:unknown-job"
    assert svc.storage.read("s3://dst-bucket/l/j/part-000000000.jsonl") is None


def test_local_files_refused_when_disabled(redis_url: str) -> None:
    settings = Settings(redis_url=redis_url, allow_local_files=False, retry_budget_s=1)
    svc = Services(
        settings=settings,
        storage=memory_storage(settings)[0],
        ledger=Ledger.from_url(redis_url),
        model=FakeModel(),  # type: ignore[arg-type]
    )
    _job(svc)
    out = run_batch(svc, job_id="j", batch_no=0, uris=["file:///etc/passwd"])
    assert out.errors == {"forbidden": 1}
    svc.close()


def test_metrics_count_stages_retries_and_outcomes(svc: Services) -> None:
    from prometheus_client import REGISTRY

    def value(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    stages = ("fetch", "preprocess", "predict", "store", "ledger")
    before = {st: value("labelmill_stage_seconds_count", stage=st) for st in stages}
    retries = value("labelmill_retries_total", what="model")
    ok_before = value("labelmill_images_total", status="ok", kind="")
    empty_before = value("labelmill_images_total", status="error", kind="empty")
    _job(svc)
    svc.model.failures = [ModelUnavailable("down")]  # type: ignore[attr-defined]
    uris = [_put(svc, "a.jpg", images.jpeg()), _put(svc, "b.jpg", b"")]
    run_batch(svc, job_id="j", batch_no=0, uris=uris)
    for st in stages:
        assert value("labelmill_stage_seconds_count", stage=st) == before[st] + 1, st
    assert value("labelmill_retries_total", what="model") == retries + 1
    assert value("labelmill_images_total", status="ok", kind="") == ok_before + 1
    assert value("labelmill_images_total", status="error", kind="empty") == empty_before + 1
