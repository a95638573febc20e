from __future__ import annotations

import pytest

from labelmill.errors import UsageError
from labelmill.job import JobSpec
from labelmill.job.folder import JobFolder, part_name
from labelmill.job.record import (
    DEAD,
    ErrorRecord,
    Label,
    ModelInfo,
    OkRecord,
    dumps_lines,
    from_dict,
    loads_lines,
    tally,
)
from tests.memory_storage import memory_storage

MODEL = ModelInfo("inception", 3, "random:seed=1")


def _ok(uri: str, batch: int = 7) -> OkRecord:
    return OkRecord(uri, "e1", (Label("cat", 281, 0.5123456789),), MODEL, "j", batch)


def test_records_round_trip_and_are_deterministic() -> None:
    recs = [_ok("s3://b/ü.jpg"), ErrorRecord("s3://b/x.jpg", "decode", "bad", "j", 7)]
    data = dumps_lines(recs)
    assert data == dumps_lines(recs)
    assert data.count(b"\n") == 2
    back = loads_lines(data)
    assert back[0]["labels"] == [{"label": "cat", "class_id": 281, "score": 0.512346}]
    assert back[0]["model"]["note"] == "random weights: labels are meaningless"
    assert back[1]["error"] == {"kind": "decode", "message": "bad"}
    assert "ü" in data.decode()
    # Read back as records, written again: the same bytes.
    assert dumps_lines([from_dict(d) for d in back]) == data


def test_a_changed_object_s_line_names_both_etags() -> None:
    detail = {"listed_etag": "e1", "etag": "e2"}
    rec = ErrorRecord("s3://b/x.jpg", "changed", "changed since listing", "j", 7, detail)
    (line,) = loads_lines(dumps_lines([rec]))
    assert line["error"] == {
        "kind": "changed", "message": "changed since listing", "listed_etag": "e1", "etag": "e2",
    }  # fmt: skip
    assert from_dict(line) == rec


def test_a_line_that_is_no_record_is_refused() -> None:
    with pytest.raises(ValueError, match="not a result record"):
        from_dict({"status": "ok", "uri": "s3://b/a.jpg"})
    with pytest.raises(ValueError, match="status 'maybe'"):
        from_dict({"status": "maybe"})


def test_real_weights_carry_no_note() -> None:
    assert "note" not in ModelInfo("inception", 1, "imagenet").as_dict()


def test_tally_counts_a_batch_and_knows_a_dead_one() -> None:
    t = tally([_ok("a"), _ok("b"), ErrorRecord("c", "decode", "bad", "j", 7)])
    assert (t.ok, dict(t.errors), t.weights, t.versions, t.dead) == (
        2, {"decode": 1}, "random:seed=1", {3}, False,
    )  # fmt: skip
    dead = tally([ErrorRecord(u, DEAD, "gave up", "j", 7) for u in "ab"])
    assert (dead.ok, dict(dead.errors), dead.dead) == (0, {DEAD: 2}, True)
    # One dead line among others is an image's error, not a dead batch.
    assert not tally([_ok("a"), ErrorRecord("b", DEAD, "x", "j", 7)]).dead
    assert not tally([]).dead


def test_part_name() -> None:
    assert part_name(17) == "part-000000017.jsonl"


def test_the_job_folder_writes_and_reads_back_its_files() -> None:
    storage, _memory = memory_storage()
    spec = JobSpec("j", "s3://in/p/", "s3://out/labels", 2, "inception", 3, 1.0)
    folder = JobFolder.of(storage, spec)
    assert folder.uri == "s3://out/labels/j"
    folder.write_spec(spec, {"max_outstanding": 4})
    assert folder.read_spec() == spec
    folder.write_part(1, [_ok("s3://in/p/b.jpg", batch=1)])
    folder.write_part(0, [_ok("s3://in/p/a.jpg", batch=0)])
    # Not part files of this job: another name, a sub-folder, another job.
    storage.put("s3://out/labels/j/notes.txt", b"x")
    storage.put("s3://out/labels/j/old/part-000000002.jsonl", b"")
    storage.put("s3://out/labels/j2/part-000000003.jsonl", b"")
    assert [no for no, _uri in folder.parts()] == [0, 1]
    assert [r["uri"] for r in folder.lines()] == ["s3://in/p/a.jpg", "s3://in/p/b.jpg"]
    # Read back as written (scores as stored: rounded to 6 places).
    back = folder.part_records(folder.part_uri(0))
    assert dumps_lines(back) == dumps_lines([_ok("s3://in/p/a.jpg", batch=0)])
    storage.put(folder.part_uri(5), b"{not json\n")
    with pytest.raises(UsageError, match="corrupt"):
        folder.read_part(folder.part_uri(5))
    folder.write_manifest({"job_id": "j"})
    assert storage.exists("s3://out/labels/j/_manifest.json")
    assert storage.exists("s3://out/labels/j/_SUCCESS")
