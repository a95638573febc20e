"""The one retry layer: transient failures retried with backoff, on one deadline per batch.

Clients (storage, the ledger, the model client) make one attempt and raise a
:class:`~labelmill.errors.TransientError` (worth another try) or a permanent
error; they never retry on their own. A batch gets one :class:`Deadline`
(``LABELMILL_RETRY_BUDGET_S``) that every stage's retries share: fetching,
pinning the model version, predicting, and recording the outcome. The work
stages stop retrying ``reserve_s`` before the end, so that the batch can
still record what happened (its part file, dead lines included, the ledger,
the manifest) when the rest of the budget was spent waiting.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from labelmill.errors import TransientError

T = TypeVar("T")
log = logging.getLogger(__name__)

BASE_S = 0.2  # the first pause is at most this; each next one doubles ...
CAP_S = 10.0  # ... up to this (full jitter: a uniform draw below the bound)


def record_reserve_s(budget_s: float) -> float:
    """What a batch keeps back from its budget to record its outcome."""
    return min(60.0, budget_s / 5)


class Deadline:
    """One batch's time for retries, ``budget_s`` from now, ``reserve_s`` of it kept back."""

    def __init__(
        self,
        budget_s: float,
        *,
        reserve_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_s = budget_s
        self.clock = clock
        self.end = clock() + budget_s
        self.work_end = self.end - min(reserve_s, budget_s)

    def remaining(self, *, record: bool = False) -> float:
        """Seconds left for a work stage, or (``record``) for recording the outcome."""
        return (self.end if record else self.work_end) - self.clock()


def retry(
    fn: Callable[[], T],
    *,
    deadline: Deadline,
    what: str,
    record: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    on_retry: Callable[[TransientError], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds; retry only :class:`TransientError`.

    Waits ``uniform(0, min(CAP_S, BASE_S * 2**n))`` between tries and re-raises
    the last error once the next wait would pass the deadline (its work part,
    or all of it for a ``record`` stage).
    """
    attempt = 0
    while True:
        try:
            return fn()
        except TransientError as exc:
            _pause(exc, attempt, deadline, record, what, sleep, on_retry)
            attempt += 1


def patiently(call: Callable[[], T], budget_s: float, what: str) -> T:
    """One call outside a batch (the producer's), its outages waited out for ``budget_s``."""
    return retry(call, deadline=Deadline(budget_s), what=what)


def resumable(
    open_after: Callable[[str | None], Iterable[T]],
    *,
    key: Callable[[T], str],
    after: str | None = None,
    budget_s: float,
    what: str,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Iterator[T]:
    """The items of a long listing that outlives outages.

    ``open_after(k)`` lists in key order from after key ``k`` (``None``: from
    the start). After a :class:`TransientError` the listing is opened again
    after the last item yielded, so nothing is skipped or repeated. Each
    stretch without progress may spend ``budget_s`` retrying: a listing that
    runs for hours is not held to one deadline.
    """
    attempt = 0
    deadline = Deadline(budget_s, clock=clock)
    while True:
        try:
            for item in open_after(after):
                yield item
                after = key(item)
                if attempt:
                    attempt, deadline = 0, Deadline(budget_s, clock=clock)
            return
        except TransientError as exc:
            _pause(exc, attempt, deadline, False, what, sleep, None)
            attempt += 1


def _pause(
    exc: TransientError,
    attempt: int,
    deadline: Deadline,
    record: bool,
    what: str,
    sleep: Callable[[float], None],
    on_retry: Callable[[TransientError], None] | None,
) -> None:
    """Wait before try ``attempt + 1``, or re-raise ``exc`` when that would pass the deadline."""
    delay = random.uniform(0, min(CAP_S, BASE_S * 2**attempt))
    if delay > deadline.remaining(record=record):
        raise exc
    if on_retry is not None:
        on_retry(exc)
    log.warning("%s: %s; retry %d in %.1fs", what, exc, attempt + 1, delay)
    sleep(delay)
