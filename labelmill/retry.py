"""Retrying transient failures with exponential backoff and full jitter, on a time budget."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

from labelmill.errors import TransientError

T = TypeVar("T")
log = logging.getLogger(__name__)


def retry_transient(
    fn: Callable[[], T],
    *,
    budget_s: float,
    what: str,
    base_s: float = 0.2,
    cap_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    on_retry: Callable[[TransientError], None] | None = None,
) -> T:
    """Call ``fn`` until it succeeds; retry only :class:`TransientError`.

    Waits ``uniform(0, min(cap, base * 2**n))`` between tries (full jitter) and
    re-raises the last error once ``budget_s`` would be exceeded.
    """
    deadline = clock() + budget_s
    attempt = 0
    while True:
        try:
            return fn()
        except TransientError as exc:
            delay = random.uniform(0, min(cap_s, base_s * 2**attempt))
            if clock() + delay > deadline:
                raise
            attempt += 1
            if on_retry is not None:
                on_retry(exc)
            log.warning("%s: %s; retry %d in %.1fs", what, exc, attempt, delay)
            sleep(delay)
