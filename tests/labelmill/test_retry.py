from __future__ import annotations

import pytest

from labelmill.errors import InferenceError, ModelUnavailable
from labelmill.retry import retry_transient


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s


def test_transient_errors_are_retried_until_success() -> None:
    calls = []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise ModelUnavailable("down")
        return "ok"

    c = Clock()
    assert retry_transient(fn, budget_s=100, what="x", sleep=c.sleep, clock=c.now) == "ok"
    assert len(calls) == 4 and len(c.sleeps) == 3
    assert all(0 <= s <= 0.2 * 2**i for i, s in enumerate(c.sleeps))


def test_budget_is_a_time_not_a_count() -> None:
    c = Clock()

    def fn() -> None:
        raise ModelUnavailable("down")

    with pytest.raises(ModelUnavailable):
        retry_transient(fn, budget_s=30, what="x", sleep=c.sleep, clock=c.now, cap_s=1.0)
    assert c.t <= 30
    assert len(c.sleeps) > 10


def test_permanent_errors_are_not_retried() -> None:
    c = Clock()
    calls = []

    def fn() -> None:
        calls.append(1)
        raise InferenceError("bad shape")

    with pytest.raises(InferenceError):
        retry_transient(fn, budget_s=30, what="x", sleep=c.sleep, clock=c.now)
    assert calls == [1] and c.sleeps == []
