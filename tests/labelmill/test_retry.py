from __future__ import annotations

from collections.abc import Iterator

import pytest

from labelmill.errors import InferenceError, ModelUnavailable, StorageUnavailable
from labelmill.retry import BASE_S, Deadline, record_reserve_s, resumable, retry
from tests.clock import Clock


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


class FlakyListing:
    """Keys ``k00``..``k09`` from after a key; fails once at each key in ``fail_at``."""

    def __init__(self, fail_at: set[str], clock: Clock, *, down_s: float = 0.0) -> None:
        self.keys = [f"k{i:02d}" for i in range(10)]
        self.fail_at = set(fail_at)
        self.opened: list[str | None] = []
        self.clock = clock
        self.down_until = down_s

    def __call__(self, after: str | None) -> Iterator[str]:
        self.opened.append(after)
        for key in self.keys:
            if after is not None and key <= after:
                continue
            if key in self.fail_at or self.clock.t < self.down_until:
                self.fail_at.discard(key)
                raise StorageUnavailable(f"listing broke before {key}")
            yield key


def test_a_listing_resumes_after_the_last_key_it_yielded() -> None:
    c = Clock()
    listing = FlakyListing({"k03", "k07"}, c)
    got = list(resumable(listing, key=str, budget_s=30, what="list", sleep=c.sleep, clock=c.now))
    assert got == listing.keys  # nothing skipped, nothing twice
    assert listing.opened == [None, "k02", "k06"]


def test_a_listing_gives_up_after_its_budget_without_progress() -> None:
    c = Clock()
    listing = FlakyListing(set(), c, down_s=1e9)
    with pytest.raises(StorageUnavailable):
        list(resumable(listing, key=str, budget_s=30, what="list", sleep=c.sleep, clock=c.now))
    assert c.t <= 30 and len(listing.opened) > 5


def test_each_stretch_of_a_listing_gets_the_whole_budget() -> None:
    """Progress renews the budget: a listing of hours is not held to one deadline."""
    c = Clock()
    outage_s = {"1": 20.0, "2": 20.0}  # down 20 s before each: 40 s in all, budget 30 s
    down_until: dict[str, float] = {}

    def listing(after: str | None) -> Iterator[str]:
        for key in ("0", "1", "2"):
            if after is not None and key <= after:
                continue
            if key in outage_s and c.t < down_until.setdefault(key, c.t + outage_s[key]):
                raise StorageUnavailable(f"down before {key}")
            yield key

    got = list(resumable(listing, key=str, budget_s=30, what="list", sleep=c.sleep, clock=c.now))
    assert got == ["0", "1", "2"]
    assert c.t >= 40
