"""The streaming comparison of a listing with a base job's picture, and its input manifest."""

from __future__ import annotations

from itertools import dropwhile

import pytest

from labelmill.errors import UsageError
from labelmill.job import Batch
from labelmill.job.folder import JobFolder
from labelmill.job.inputs import InputLog
from labelmill.job.model import Carried, JobSpec
from labelmill.job.picture import Entry, LineFinder, base_spec, find_base, picture
from labelmill.job.record import Label, ModelInfo, OkRecord
from labelmill.storage import ObjectInfo
from producer import listing
from producer.listing import Base, batch_objects
from tests.memory_storage import memory_storage


def _obj(name: str, etag: str = "e") -> ObjectInfo:
    return ObjectInfo(f"s3://in/p/{name}", 1, etag)


def _entry(name: str, etag: str = "e", ok: bool = True, job: str = "j1", batch: int = 0) -> Entry:
    return Entry(f"s3://in/p/{name}", "ok" if ok else "error", job, batch, etag)


def _uris(batches: list[Batch]) -> list[str]:
    return [u.rsplit("/", 1)[1] for b in batches for u in b.uris]


def test_each_listed_object_is_carried_new_changed_or_retried_and_the_rest_is_gone() -> None:
    listed = [_obj("a.jpg"), _obj("b.jpg", "new-etag"), _obj("c.jpg"), _obj("d.txt")]
    listed += [_obj("e.jpg"), _obj("g.jpg")]
    base = [_entry("a.jpg", batch=3), _entry("b.jpg"), _entry("bb.jpg"), _entry("c.jpg", ok=False)]
    base += [_entry("f.jpg"), _entry("g.jpg", job="j0", batch=9), _entry("h.jpg")]
    batches = list(batch_objects(listed, 2, base=Base(base)))
    assert _uris(batches) == ["b.jpg", "c.jpg", "e.jpg"]
    tail = batches[-1]
    assert tail.is_tail and tail.batch_no == 2
    assert tail.incremental == {"carried": 2, "new": 1, "changed": 1, "retried": 1, "gone": 3}
    # Carried objects point at the job that labelled them, not at the base.
    carried = [c for b in batches for c in b.carried]
    assert carried == [
        Carried("s3://in/p/a.jpg", "e", "j1", 3),
        Carried("s3://in/p/g.jpg", "e", "j0", 9),
    ]
    assert tail.images == 3 and tail.position().images_total == 3


def test_another_model_version_carries_nothing() -> None:
    listed = [_obj("a.jpg"), _obj("b.jpg")]
    batches = list(batch_objects(listed, 4, base=Base([_entry("a.jpg")], carry=False)))
    assert _uris(batches) == ["a.jpg", "b.jpg"]
    assert batches[-1].incremental == {
        "carried": 0,
        "new": 1,
        "changed": 1,
        "retried": 0,
        "gone": 0,
    }


def test_a_long_unchanged_stretch_closes_lines_and_a_resume_from_any_line_goes_on_alike(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(listing, "CARRIED_PER_LINE", 3)
    names = [f"{i:02d}.jpg" for i in range(20)]
    listed = [_obj(n, "changed" if i in (1, 12, 13) else "e") for i, n in enumerate(names)]
    listed.insert(6, _obj("05a.txt"))  # after 05.jpg
    base_entries = [_entry(n) for n in names if n != "17.jpg"] + [_entry("99.jpg")]
    whole = list(batch_objects(listed, 2, base=Base(base_entries)))
    # Memory stays flat: no line carries more than 3, so the first batch
    # (one URI, then a long unchanged stretch) went out short.
    assert max(len(b.carried) for b in whole) == 3
    assert next(b.uris for b in whole if b.uris) == ["s3://in/p/01.jpg"]
    assert sum(1 for b in whole if not b.uris and b.carried) >= 2  # lines of carried only
    assert [b.is_tail for b in whole] == [False] * (len(whole) - 1) + [True]
    assert whole[-1].incremental == {"carried": 16, "new": 1, "changed": 3, "retried": 0, "gone": 1}
    for k, line in enumerate(whole[:-1]):
        at = line.position()
        after = [o for o in listed if o.uri > at.last_key]
        rest = dropwhile(lambda e, key=at.last_key: e.uri <= key, base_entries)
        resumed = list(batch_objects(after, 2, start=at, base=Base(rest)))
        assert resumed == whole[k + 1 :], f"resumed after line {k}"


def test_lines_without_uris_name_their_chunks_apart_and_read_back_in_order() -> None:
    storage, _objects = memory_storage()
    log = InputLog(JobFolder(storage, "s3://out/labels", "j-2"))
    carried = [Carried("s3://in/p/a.jpg", "e", "j-1", 0)]
    chunks = [
        [Batch(0, [], [], 1, "s3://in/p/a.jpg", {}, carried, {"carried": 1})],
        [Batch(0, [], [], 2, "s3://in/p/b.jpg", {}, carried, {"carried": 2})],
        [Batch(0, ["s3://in/p/c.jpg"], ["e"], 3, "s3://in/p/c.jpg", {}, [], {"carried": 2})],
        [Batch(1, [], [], 3, "s3://in/p/c.jpg", {}, [], {"carried": 2})],
    ]
    for chunk in chunks:
        log.write(chunk)
    assert len(log.chunks()) == 4
    assert list(log.batches()) == [b for chunk in chunks for b in chunk]
    assert log.last() == chunks[-1][0] and log.last().is_tail
    assert [b.batch_no for b in log.batches(wanted={0}) if b.uris] == [0]


def test_a_picture_merges_own_lines_with_carried_pointers_and_finds_their_lines() -> None:
    storage, _objects = memory_storage()
    model = ModelInfo("inception", 1, "random:0")

    def ok(name: str, job: str, batch: int) -> OkRecord:
        return OkRecord(f"s3://in/p/{name}", "e", [Label("cat", 1, 0.5)], model, job, batch)

    first = JobFolder(storage, "s3://out/labels", "j-1")
    first.write_part(0, [ok("a.jpg", "j-1", 0), ok("b.jpg", "j-1", 0)])
    first.write_part(1, [ok("d.jpg", "j-1", 1)])
    second = JobFolder(storage, "s3://out/labels", "j-2")
    second.write_part(0, [ok("c.jpg", "j-2", 0)])
    InputLog(second).write(
        [
            Batch(0, ["s3://in/p/c.jpg"], ["e"], 3, "s3://in/p/c.jpg", {},
                  [Carried("s3://in/p/a.jpg", "e", "j-1", 0)], {"carried": 1}),
            Batch(1, [], [], 4, "s3://in/p/d.jpg", {},
                  [Carried("s3://in/p/d.jpg", "e", "j-1", 1)], {"carried": 2}),
            Batch(1, [], [], 4, "s3://in/p/d.jpg", {}, [], {"carried": 2}),
        ]
    )  # fmt: skip
    spec = JobSpec("j-2", "s3://in/p/", "s3://out/labels", 2, "inception", 1, 0.0, base="j-1")
    entries = list(picture(second, spec))
    assert [(e.uri[-5:], e.job_id) for e in entries] == [
        ("a.jpg", "j-1"),
        ("c.jpg", "j-2"),
        ("d.jpg", "j-1"),
    ]
    finder = LineFinder(storage, "s3://out/labels")
    lines = [finder.line(e) for e in entries]
    assert [(r["uri"][-5:], r["job_id"], r["batch"]) for r in lines] == [
        ("a.jpg", "j-1", 0),
        ("c.jpg", "j-2", 0),
        ("d.jpg", "j-1", 1),
    ]
    assert [e.uri[-5:] for e in picture(second, spec, after="s3://in/p/a.jpg")] == [
        "c.jpg",
        "d.jpg",
    ]


def test_the_base_is_the_newest_finished_job_over_the_same_input_and_model_version() -> None:
    storage, _objects = memory_storage()
    out = "s3://out/labels"

    def job(
        job_id: str, finished: str | None, source: str = "s3://in/p/", version: int = 1
    ) -> None:
        spec = JobSpec(job_id, source, out, 2, "inception", version, 0.0)
        folder = JobFolder(storage, out, job_id)
        folder.write_spec(spec, {})
        if finished is not None:
            folder.write_manifest({"spec": spec.as_dict(), "finished_at": finished})

    job("j-old", "2026-12-01T00:00:00+00:00")
    job("j-new", "2026-12-03T00:00:00+00:00")
    job("j-running", None)
    job("j-other-input", "2026-12-04T00:00:00+00:00", source="s3://in/q/")
    job("j-other-model", "2026-12-04T00:00:00+00:00", version=2)
    found = find_base(storage, out, source="s3://in/p/", model_name="inception", model_version=1)
    assert found is not None and found.job_id == "j-new"
    none = find_base(storage, out, source="s3://in/r/", model_name="inception", model_version=1)
    assert none is None
    assert base_spec(storage, out, "j-old", source="s3://in/p/").job_id == "j-old"
    with pytest.raises(UsageError, match="only a finished job"):
        base_spec(storage, out, "j-running", source="s3://in/p/")
    with pytest.raises(UsageError, match="labelled s3://in/q/"):
        base_spec(storage, out, "j-other-input", source="s3://in/p/")
