from __future__ import annotations

import pytest

from labelmill.job import Position
from labelmill.storage import ObjectInfo
from producer.listing import batch_objects, is_image_name, last_batch


@pytest.mark.parametrize(
    "uri",
    [
        "s3://b/a.jpg",
        "s3://b/A.JPEG",
        "s3://b/x/y.PnG",
        "s3://b/a.webp",
        "s3://b/a.bmp",
        "s3://b/a.gif",
        "s3://b/a.tif",
        "s3://b/a.TIFF",
        "file:///p/ü ñ.jpg",
        "s3://b/a..jpg",
    ],
)
def test_image_names_are_kept(uri: str) -> None:
    assert is_image_name(uri)


@pytest.mark.parametrize(
    "uri",
    [
        "s3://b/readme.txt",
        "s3://b/noext",
        "s3://b/folder/",
        "s3://b/a.svg",
        "s3://b/a.heic",
        "s3://b/.jpg",
        "s3://b/a.jpg.bak",
    ],
)
def test_other_names_are_skipped(uri: str) -> None:
    assert not is_image_name(uri)


def _objs(*names: str) -> list[ObjectInfo]:
    return [ObjectInfo(f"s3://b/{n}", 1, f"etag-{n}") for n in names]


def test_batches_group_images_and_count_skips() -> None:
    objs = _objs("a.jpg", "b.txt", "c.png", "d.jpg", "e/", "f.jpg", "g.txt")
    out = list(batch_objects(objs, 2))
    assert [b.uris for b in out] == [
        ["s3://b/a.jpg", "s3://b/c.png"],
        ["s3://b/d.jpg", "s3://b/f.jpg"],
        [],
    ]
    assert [b.etags for b in out] == [
        ["etag-a.jpg", "etag-c.png"],
        ["etag-d.jpg", "etag-f.jpg"],
        [],
    ]
    assert [b.batch_no for b in out] == [0, 1, 2]
    assert out[0].listed == 3 and out[0].skipped == {"not_image_name": 1}
    # The tail carries the final totals, trailing skips included.
    assert out[-1].listed == 7 and out[-1].skipped == {"not_image_name": 3}
    assert out[-1].last_key == "s3://b/g.txt"


def test_short_last_batch_and_resume_totals() -> None:
    out = list(
        batch_objects(
            _objs("x.jpg", "y.jpg", "z.jpg"),
            2,
            start=Position(5, 10, "s3://b/w.txt", 6, {"not_image_name": 4}),
        )
    )
    assert [(b.batch_no, len(b.uris)) for b in out] == [(5, 2), (6, 1), (7, 0)]
    assert out[-1].listed == 13
    assert out[-1].skipped == {"not_image_name": 4}


def test_empty_listing_has_only_a_tail() -> None:
    out = list(batch_objects([], 4, start=Position(0, 0, "s3://b/k", 0)))
    assert len(out) == 1 and out[0].batch_no == 0 and out[0].last_key == "s3://b/k"


def test_tail_totals_and_position() -> None:
    tail = last_batch(_objs("a.jpg", "b.txt", "c.png", "d/"), 2)
    assert (tail.batch_no, tail.listed, tail.images) == (1, 4, 2)
    assert tail.position() == Position(
        batches_sent=1,
        listed=4,
        last_key="s3://b/d/",
        images_total=2,
        skipped={"not_image_name": 2},
    )
    first = next(batch_objects(_objs("a.jpg", "b.jpg"), 2))
    assert first.position().batches_sent == 1
