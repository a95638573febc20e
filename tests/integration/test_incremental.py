"""Incremental runs on the real servers: label what changed, carry the rest."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests import images
from tests.fixtures.stack import Pipeline

pytestmark = pytest.mark.integration


def _json(p: Pipeline, key: str) -> dict[str, Any]:
    body = p.s3.get_object(Bucket=p.bucket, Key=key)["Body"].read()
    data: dict[str, Any] = json.loads(body)
    return data


def _listing(p: Pipeline) -> dict[str, str]:
    """URI -> ETag of the images under photos/ now."""
    found = {}
    for page in p.s3.get_paginator("list_objects_v2").paginate(Bucket=p.bucket, Prefix="photos/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(".jpg"):
                found[f"s3://{p.bucket}/{obj['Key']}"] = obj["ETag"].strip('"')
    return found


def _with_base(p: Pipeline, job_id: str) -> list[dict[str, Any]]:
    res = p.producer("results", job_id, "--with-base")
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_an_incremental_job_labels_only_what_changed_and_its_picture_is_complete(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    src, dst = f"s3://{p.bucket}/photos/", f"s3://{p.bucket}/labels/"
    for i in range(20):
        p.put(f"photos/img-{i:02d}.jpg", images.jpeg(40, 30, seed=i))
    p.put("photos/readme.txt", b"not an image")
    p.start_worker()
    first = p.enqueue(src, dst, "--batch-size", "4")
    assert first["base"] is None
    p.wait_done(first["job_id"])

    added = [f"photos/img-{i:02d}.jpg" for i in range(20, 25)]
    overwritten = ["photos/img-03.jpg", "photos/img-11.jpg"]
    for n, key in enumerate(added + overwritten):
        p.put(key, images.jpeg(40, 30, seed=100 + n))
    for key in ("photos/img-07.jpg", "photos/img-15.jpg"):
        p.s3.delete_object(Bucket=p.bucket, Key=key)

    second = p.enqueue(src, dst, "--batch-size", "4", "--incremental")
    job = second["job_id"]
    expected = {"carried": 16, "new": 5, "changed": 2, "retried": 0, "gone": 2}
    assert second["base"] == first["job_id"]
    assert second["incremental"] == expected
    assert second["images_total"] == 7
    status = p.wait_done(job)
    assert status["images"] == {"total": 7, "ok": 7, "error": 0, "skipped": 1, "carried": 16}
    assert status["incremental"] == {"base": first["job_id"], **expected}
    cli_status = json.loads(p.producer("status", job, "--json").stdout)
    assert cli_status["images"]["carried"] == 16

    # Exactly the 7 new and changed objects were sent and labelled.
    own = p.part_lines(job)
    assert sorted(r["uri"] for r in own) == sorted(
        f"s3://{p.bucket}/{k}" for k in added + overwritten
    )
    assert len(p.ledger.attempts(job)) == 2  # two batches, of 4 and 3

    manifest = _json(p, f"labels/{job}/_manifest.json")
    assert manifest["spec"]["base"] == first["job_id"]
    assert manifest["incremental"] == {"base": first["job_id"], **expected}
    assert manifest["images"]["total"] == 7
    spec_file = _json(p, f"labels/{job}/_job.json")
    assert spec_file["base"] == first["job_id"]
    assert spec_file["incremental"] == expected

    # The complete picture: one line per object present, in key order, each
    # with the ETag it has now.
    now = _listing(p)
    picture = _with_base(p, job)
    assert [r["uri"] for r in picture] == sorted(now)
    assert {r["uri"]: r["etag"] for r in picture} == now
    changed = {f"s3://{p.bucket}/{k}" for k in added + overwritten}
    assert {r["uri"] for r in picture if r["job_id"] == job} == changed
    assert {r["job_id"] for r in picture if r["uri"] not in changed} == {first["job_id"]}

    # A third run bases itself on the second; what the second carried still
    # points at the first job's lines, not at a chain of bases.
    p.put("photos/img-20.jpg", images.jpeg(40, 30, seed=300))
    p.put("photos/img-25.jpg", images.jpeg(40, 30, seed=301))
    third = p.enqueue(src, dst, "--batch-size", "4", "--incremental")
    assert third["base"] == job
    assert third["incremental"] == {"carried": 22, "new": 1, "changed": 1, "retried": 0, "gone": 0}
    p.wait_done(third["job_id"])
    picture = _with_base(p, third["job_id"])
    now = _listing(p)
    assert [r["uri"] for r in picture] == sorted(now)
    assert {r["uri"]: r["etag"] for r in picture} == now
    owners = {r["uri"].rsplit("/", 1)[1]: r["job_id"] for r in picture}
    assert owners["img-00.jpg"] == first["job_id"]
    assert owners["img-03.jpg"] == job
    assert owners["img-20.jpg"] == owners["img-25.jpg"] == third["job_id"]


def test_errors_are_tried_again_and_another_model_version_carries_nothing(
    pipeline: Pipeline,
) -> None:
    p = pipeline
    src, dst = f"s3://{p.bucket}/photos/", f"s3://{p.bucket}/labels/"
    for i in range(6):
        p.put(f"photos/img-{i}.jpg", images.jpeg(40, 30, seed=i))
    p.put("photos/broken.jpg", images.truncated_jpeg())
    p.start_worker()
    first = p.enqueue(src, dst, "--batch-size", "4")
    p.wait_done(first["job_id"])

    second = p.enqueue(src, dst, "--batch-size", "4", "--incremental")
    assert second["incremental"] == {"carried": 6, "new": 0, "changed": 0, "retried": 1, "gone": 0}
    p.wait_done(second["job_id"])
    assert [r["uri"] for r in p.part_lines(second["job_id"])] == [
        f"s3://{p.bucket}/photos/broken.jpg"
    ]

    # Named explicitly, a base labelled by another model version carries
    # nothing (no worker runs these: the model server serves version 1 only).
    p.stop_workers()
    third = p.enqueue(
        src, dst, "--batch-size", "4", "--base", first["job_id"], "--model-version", "2"
    )
    assert third["base"] == first["job_id"]
    assert third["incremental"] == {"carried": 0, "new": 0, "changed": 6, "retried": 1, "gone": 0}
    # And --incremental finds no base for version 2: nothing to compare with.
    res = p.producer("enqueue", src, "--output", dst, "--incremental", "--model-version", "2")
    assert "no finished job to compare with" in res.stderr
