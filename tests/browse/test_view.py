"""producer/browse/view.py: a job's aggregates, streamed from its part files."""

from __future__ import annotations

import pytest

from labelmill.job.folder import JobFolder
from labelmill.job.model import JobSpec
from labelmill.job.record import ErrorRecord, Label, ModelInfo, OkRecord, Record
from producer.browse import view as view_module
from producer.browse.view import JobView
from tests.memory_storage import memory_storage


@pytest.fixture(autouse=True)
def _refresh_every_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view_module, "REFRESH_S", 0.0)


SPEC = JobSpec("j-1", "s3://in/p/", "s3://out/labels", 4, "inception", 1, 0.0)
MODEL = ModelInfo("inception", 1, "random:0")


def ok(n: int, label: str, score: float, batch: int) -> OkRecord:
    labels = [Label(label, 1, score), Label("other", 2, (1 - score) / 2)]
    return OkRecord(f"s3://in/p/{n:03d}.jpg", "e", labels, MODEL, "j-1", batch)


def error(n: int, kind: str, batch: int) -> ErrorRecord:
    return ErrorRecord(f"s3://in/p/{n:03d}.jpg", kind, f"{kind} at {n}", "j-1", batch)  # type: ignore[arg-type]


def test_aggregates_count_labels_scores_and_errors_and_follow_new_part_files() -> None:
    storage, _objects = memory_storage()
    folder = JobFolder.of(storage, SPEC)
    parts: list[list[Record]] = [
        [
            ok(0, "cat", 0.91, 0),
            ok(1, "dog", 0.42, 0),
            ok(2, "cat", 0.55, 0),
            error(3, "decode", 0),
        ],
        [ok(4, "cat", 0.08, 1), ok(5, "dog", 0.99, 1), error(6, "empty", 1), error(7, "decode", 1)],
    ]
    folder.write_part(0, parts[0])
    view = JobView(storage, SPEC)
    view.refresh()
    assert view.summary()["lines"] == 4
    folder.write_part(1, parts[1])
    view.refresh()
    summary = view.summary()
    assert summary["lines"] == 8
    assert summary["labels"] == [{"label": "cat", "count": 3}, {"label": "dog", "count": 2}]
    counts = summary["histogram"]["counts"]
    assert sum(counts) == 5 and counts[1] == 1 and counts[19] == 1  # 0.08 and 0.99
    least = [(i["uri"][-7:], i["score"]) for i in summary["least_confident"]]
    assert least == [
        ("004.jpg", 0.08),
        ("001.jpg", 0.42),
        ("002.jpg", 0.55),
        ("000.jpg", 0.91),
        ("005.jpg", 0.99),
    ]
    errors = {e["kind"]: [(x["batch"], x["index"]) for x in e["lines"]] for e in summary["errors"]}
    assert errors == {"decode": [(0, 3), (1, 3)], "empty": [(1, 2)]}
    count, images = view.gallery("cat")
    assert count == 3 and [i["score"] for i in images] == [0.91, 0.55, 0.08]
    assert images[0]["top"][0] == {"label": "cat", "score": 0.91}
    assert view.gallery("zebra") == (0, [])

    # A part file rewritten (a retried batch) starts the aggregates over.
    folder.write_part(
        1, [ok(4, "dog", 0.7, 1), ok(5, "dog", 0.8, 1), ok(6, "dog", 0.9, 1), ok(7, "dog", 0.6, 1)]
    )
    view.refresh()
    summary = view.summary()
    assert summary["lines"] == 8
    assert summary["labels"] == [{"label": "dog", "count": 5}, {"label": "cat", "count": 2}]


def test_galleries_and_the_least_confident_keep_a_bounded_number(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage, _objects = memory_storage()
    folder = JobFolder.of(storage, SPEC)
    for b in range(10):
        folder.write_part(b, [ok(b * 4 + i, "cat", (b * 4 + i) / 40, b) for i in range(4)])
    monkeypatch.setattr(view_module, "GALLERY", 5)
    monkeypatch.setattr(view_module, "LEAST", 3)
    view = JobView(storage, SPEC)
    view.refresh()
    count, images = view.gallery("cat")
    assert count == 40
    assert [i["score"] for i in images] == [0.975, 0.95, 0.925, 0.9, 0.875]
    assert [i["score"] for i in view.summary()["least_confident"]] == [0.0, 0.025, 0.05]


def test_an_image_is_named_by_its_place_in_the_part_files_and_only_inside_the_input() -> None:
    storage, _objects = memory_storage()
    folder = JobFolder.of(storage, SPEC)
    stray = OkRecord("s3://elsewhere/secret.jpg", "e", [Label("cat", 1, 0.5)], MODEL, "j-1", 0)
    folder.write_part(0, [ok(0, "cat", 0.5, 0), stray])
    view = JobView(storage, SPEC)
    assert view.uri_of(0, 0) == "s3://in/p/000.jpg"
    assert view.uri_of(0, 1) is None  # not under the job's input
    assert view.uri_of(0, 2) is None
    assert view.uri_of(7, 0) is None  # no such part
