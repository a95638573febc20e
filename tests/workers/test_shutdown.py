"""The soft shutdown's wait (workers.shutdown), on a fake clock.

The real worker, stopped as Kubernetes stops it with a batch running, is in
tests/faults/test_workers.py.
"""

from __future__ import annotations

from types import SimpleNamespace

from tests.clock import Clock
from workers.shutdown import POLL_S, Batch, request_batch, wait_until_over


def _wait(batches: list[Batch | None], over_at: dict[Batch, float], clock: Clock) -> bool:
    def settled(job_id: str, batch_no: int) -> bool:
        return clock.t >= over_at[(job_id, batch_no)]

    return wait_until_over(batches, settled, 60.0, clock=clock.now, sleep=clock.sleep)


def test_it_ends_once_every_running_batch_is_over() -> None:
    clock = Clock()
    assert _wait([("j", 0), ("j", 1)], {("j", 0): 1.2, ("j", 1): 3.1}, clock)
    assert 3.1 <= clock.t < 3.1 + POLL_S


def test_nothing_left_to_finish_means_no_wait() -> None:
    clock = Clock()
    assert _wait([("j", 0)], {("j", 0): 0.0}, clock)
    assert clock.sleeps == []


def test_it_gives_up_at_the_timeout() -> None:
    clock = Clock()
    assert not _wait([("j", 0)], {("j", 0): 1000.0}, clock)
    assert clock.t == 60.0


def test_a_task_that_is_no_batch_waits_the_timeout_out_as_celery_does() -> None:
    clock = Clock()
    assert not _wait([("j", 0), None], {("j", 0): 0.0}, clock)
    assert clock.t == 60.0


def test_a_ledger_that_never_answers_waits_the_timeout_out_without_raising() -> None:
    clock = Clock()

    def settled(job_id: str, batch_no: int) -> bool:
        raise ConnectionError("Redis is gone")

    assert not wait_until_over([("j", 0)], settled, 60.0, clock=clock.now, sleep=clock.sleep)
    assert clock.t == 60.0


def test_a_ledger_back_after_a_blip_still_ends_the_wait_early() -> None:
    clock = Clock()

    def settled(job_id: str, batch_no: int) -> bool:
        if clock.t < 2.0:
            raise ConnectionError("Redis restarting")
        return True

    assert wait_until_over([("j", 0)], settled, 60.0, clock=clock.now, sleep=clock.sleep)
    assert 2.0 <= clock.t < 2.0 + POLL_S


def test_the_request_batch_a_request_comes_from_its_keyword_arguments() -> None:
    request = SimpleNamespace(kwargs={"job_id": "j", "batch_no": 3, "uris": []})
    assert request_batch(request) == ("j", 3)
    assert request_batch(SimpleNamespace(kwargs={"x": 1})) is None
    assert request_batch(SimpleNamespace(kwargs=None)) is None
