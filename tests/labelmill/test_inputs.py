"""The input manifest: chunks of batches, read back exactly, found by batch number."""

from __future__ import annotations

import pytest

from labelmill.errors import UsageError
from labelmill.job.folder import JobFolder
from labelmill.job.inputs import InputLog
from labelmill.job.model import Batch
from tests.memory_storage import memory_storage


def _batch(n: int, size: int = 2) -> Batch:
    uris = [f"s3://in/p/{n:03d}-{i}.jpg" for i in range(size)]
    skipped = {"not_image_name": n} if n else {}
    return Batch(n, uris, [f"etag-{n}-{i}" for i in range(size)], 3 * n + 3, uris[-1], skipped)


def _log() -> InputLog:
    storage, _objects = memory_storage()
    return InputLog(JobFolder(storage, "s3://out/labels", "j-1"))


def test_chunks_read_back_as_the_batches_written() -> None:
    log = _log()
    assert log.last() is None and list(log.batches()) == []
    tail = Batch(7, [], [], 30, "s3://in/p/zz.txt", {"not_image_name": 9})
    chunks = [
        [_batch(0)],
        [_batch(1), _batch(2), _batch(3)],
        [_batch(4), _batch(5), _batch(6), tail],
    ]
    for chunk in chunks:
        log.write(chunk)
    assert [first for first, _uri in log.chunks()] == [0, 1, 4]
    assert all(uri.startswith("s3://out/labels/j-1/_inputs/") for _f, uri in log.chunks())
    assert list(log.batches()) == [b for chunk in chunks for b in chunk]
    assert log.last() == tail
    assert tail.position().batches_sent == 7 and tail.images == 21


def test_batches_are_found_by_number_reading_only_their_chunks() -> None:
    log = _log()
    for first in range(0, 3000, 1000):
        log.write([_batch(n, size=1) for n in range(first, first + 1000)])
    read: list[str] = []
    real_read = log.read

    def counting(uri: str) -> list[Batch]:
        read.append(uri.rsplit("/", 1)[1])
        return real_read(uri)

    log.read = counting  # type: ignore[method-assign]
    assert [b.batch_no for b in log.batches(wanted={5, 2999, 2500})] == [5, 2500, 2999]
    assert read == ["000000000.jsonl", "000002000.jsonl"]
    read.clear()
    assert [b.batch_no for b in log.batches(start=2998)] == [2998, 2999]
    assert read == ["000002000.jsonl"]


def test_a_corrupt_chunk_is_one_clear_error() -> None:
    log = _log()
    log.write([_batch(0)])
    ((_first, uri),) = log.chunks()
    log.folder.storage.put(uri, b'{"batch": 0, "uris": ["a"]}\n')
    with pytest.raises(UsageError, match="corrupt"):
        list(log.batches())
