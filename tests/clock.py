"""A fake clock for code that takes ``clock`` and ``sleep`` callables: sleeping advances it."""

from __future__ import annotations


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.sleeps: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.t += s
