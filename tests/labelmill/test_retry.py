from __future__ import annotations

import pytest

from labelmill.errors import InferenceError, ModelUnavailable
from labelmill.retry import BASE_S, Deadline, record_reserve_s, retry


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def _down() -> None:
    raise ModelUnavailable("down")


def test_transient_errors_are_retried_until_success() -> None:
    calls = []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ModelUnavailable("down")
        return "ok"

    c = Clock()
    assert retry(fn, deadline=Deadline(100, clock=c.now), what="x", sleep=c.sleep) == "ok"
    assert len(calls) == 4 and len(c.sleeps) == 3
    assert all(0 <= s <= BASE_S * 2**i for i, s in enumerate(c.sleeps))


def test_the_deadline_is_a_time_not_a_count() -> None:
    c = Clock()
    with pytest.raises(ModelUnavailable):
        retry(_down, deadline=Deadline(30, clock=c.now), what="x", sleep=c.sleep)
    assert c.t <= 30
    assert len(c.sleeps) > 5


def test_permanent_errors_are_not_retried() -> None:
    c = Clock()
    calls = []

    def fn() -> None:
        calls.append(1)
        raise InferenceError("bad shape")

    with pytest.raises(InferenceError):
        retry(fn, deadline=Deadline(30, clock=c.now), what="x", sleep=c.sleep)
    assert calls == [1] and c.sleeps == []


def test_stages_share_one_deadline_and_recording_keeps_its_reserve() -> None:
    """What a batch does when the model server is down for good."""
    c = Clock()
    deadline = Deadline(100, reserve_s=record_reserve_s(100), clock=c.now)
    # A work stage (fetch, predict) gives up before the reserve ...
    with pytest.raises(ModelUnavailable):
        retry(_down, deadline=deadline, what="predict", sleep=c.sleep)
    assert 100 - record_reserve_s(100) - 10 <= c.t <= 100 - record_reserve_s(100)
    # ... a second work stage of the same batch has only what the first left ...
    with pytest.raises(ModelUnavailable):
        retry(_down, deadline=deadline, what="fetch", sleep=c.sleep)
    assert c.t <= 100 - record_reserve_s(100)
    # ... while recording the outcome still has the reserve to wait out an outage.
    outage_until = c.t + record_reserve_s(100) / 2

    def store() -> str:
        if c.t < outage_until:
            raise ModelUnavailable("store down")
        return "stored"

    assert retry(store, deadline=deadline, what="store", record=True, sleep=c.sleep) == "stored"
    assert c.t <= 100


def test_the_reserve_is_a_fraction_of_a_small_budget_and_capped_for_a_large_one() -> None:
    assert record_reserve_s(10) == 2
    assert record_reserve_s(900) == 60
    assert Deadline(5, reserve_s=60, clock=lambda: 0.0).remaining() == 0
