"""Unusual and hostile images: the right line for each, a worker that never crashes,
and memory that stays bounded however often the corpus comes round."""

from __future__ import annotations

import os

import pytest

from tests import images
from tests.faults.helpers import check_job, frozen, pool_children, put_many, rss_kb, tiny_photos
from tests.fixtures.stack import Pipeline

pytestmark = [pytest.mark.integration, pytest.mark.security]

CAP = 1_000_000  # LABELMILL_MAX_OBJECT_BYTES for this test's worker

DEEP = "/".join(f"level-{i}" for i in range(40))

UNUSUAL = {  # valid but unusual: each must give an ok line
    "c/png16.png": images.png16(),
    "c/cmyk.jpg": images.cmyk_jpeg(),
    "c/palette-transparent.png": images.palette_transparent_png(),
    "c/animated.gif": images.animated_gif(),
    "c/exif-rotated.jpg": images.exif_rotated_jpeg(40, 20),
    "c/progressive.jpg": images.progressive_jpeg(32, 24),
    "c/photo.tiff": images.tiff(),
    "c/photo.webp": images.webp(),
    "c/one-by-one.png": images.one_by_one_png(),
    "c/strip-8000x4.png": images.strip_png(),
    "c/UPPER.JPG": images.jpeg(16, 16),
    "c/ünïcödé 写真 with spaces #1?.jpg": images.jpeg(16, 16, seed=3),
    f"c/{DEEP}/deep.png": images.png(16, 16),
}

HOSTILE = {  # broken or hostile: each must give an error line of this kind
    "c/bad/empty.jpg": ("empty", images.empty()),
    "c/bad/truncated.jpg": ("decode", images.truncated_jpeg()),
    "c/bad/page.jpg": ("decode", images.html_bytes()),
    "c/bad/drawing-svg.png": ("decode", images.svg_bytes()),
    "c/bad/archive-zip.png": ("decode", images.zip_bytes()),
    "c/bad/bomb-30000.png": ("decompression_bomb", images.decompression_bomb_png(30_000)),
    "c/bad/huge-header.png": ("decompression_bomb", images.huge_header_png()),
    "c/bad/huge-header.bmp": ("decompression_bomb", images.huge_header_bmp()),
    "c/bad/over-cap.jpg": ("too_large", os.urandom(CAP + 1)),
    "c/bad/deleted.jpg": ("not_found", images.jpeg(16, 16)),  # deleted after listing
}


def test_unusual_and_hostile_images_bounded_memory(pipeline: Pipeline) -> None:
    p = pipeline
    corpus = {**UNUSUAL, **{k: v for k, (_kind, v) in HOSTILE.items()}}
    inputs = put_many(p, corpus)
    put_many(p, tiny_photos("warm/", 16))
    worker = p.start_worker(concurrency=1, extra={"LABELMILL_MAX_OBJECT_BYTES": str(CAP)})
    [child] = pool_children(worker)

    # Warm-up: the pool process loads its codecs and clients first.
    warm = p.enqueue(f"s3://{p.bucket}/warm/", f"s3://{p.bucket}/out/", "--batch-size", "8")
    p.wait_done(warm["job_id"])
    before = rss_kb(child)

    for round_no in range(3):
        deleted = "c/bad/deleted.jpg"
        p.put(deleted, HOSTILE[deleted][1])
        # Listed and enqueued, then gone before the (frozen) worker fetches it.
        with frozen([worker.pid, child]):
            job = p.enqueue(
                f"s3://{p.bucket}/c/",
                f"s3://{p.bucket}/out/",
                "--batch-size",
                "4",
                "--job-id",
                f"corpus-{round_no}",
            )
            p.s3.delete_object(Bucket=p.bucket, Key=deleted)
        assert job["images_total"] == len(corpus)
        p.wait_done(job["job_id"], timeout=180)
        checked = check_job(p, job["job_id"], inputs, f"s3://{p.bucket}/out/")
        wrong = {}
        for key in UNUSUAL:
            line = checked.by_uri[f"s3://{p.bucket}/{key}"]
            if line["status"] != "ok":
                wrong[key] = line.get("error")
        for key, (kind, _data) in HOSTILE.items():
            line = checked.by_uri[f"s3://{p.bucket}/{key}"]
            got = line["error"]["kind"] if line["status"] == "error" else "ok"
            if got != kind:
                wrong[key] = (got, line.get("error"))
        assert not wrong, wrong

    # Never a crashed worker: the same pool process served every round.
    assert pool_children(worker) == [child]
    after = rss_kb(child)
    assert after - before < 100 * 1024, f"RSS grew from {before} KiB to {after} KiB"
