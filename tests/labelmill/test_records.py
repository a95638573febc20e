from __future__ import annotations

from labelmill.records import (
    Label,
    ModelInfo,
    dumps_lines,
    error_record,
    loads_lines,
    ok_record,
    part_name,
)


def test_records_round_trip_and_are_deterministic() -> None:
    model = ModelInfo("inception", 3, "random:seed=1")
    recs = [
        ok_record(
            uri="s3://b/ü.jpg",
            etag="e1",
            labels=[Label("cat", 281, 0.5123456789)],
            model=model,
            job_id="j",
            batch=7,
        ),
        error_record(uri="s3://b/x.jpg", kind="decode", message="bad", job_id="j", batch=7),
    ]
    data = dumps_lines(recs)
    assert data == dumps_lines(recs)
    assert data.count(b"\n") == 2
    back = loads_lines(data)
    assert back[0]["labels"] == [{"label": "cat", "class_id": 281, "score": 0.512346}]
    assert back[0]["model"]["note"] == "random weights: labels are meaningless"
    assert back[1]["error"] == {"kind": "decode", "message": "bad"}
    assert "ü" in data.decode()


def test_real_weights_carry_no_note() -> None:
    assert "note" not in ModelInfo("inception", 1, "imagenet").as_dict()


def test_part_name() -> None:
    assert part_name(17) == "part-000000017.jsonl"
