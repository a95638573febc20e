"""Pinning a job's model version while the model tier is at zero or still loading.

``producer enqueue`` pins the newest AVAILABLE version before it makes any
batch outstanding. With the model tier scaled to zero nothing serves a
version, and nothing outstanding means KEDA never scales the tier up: a
deadlock. So a producer that finds no version says so, adds itself to the
ledger's waiting set (``<prefix>:waiting``, a second trigger of the model
tier's ScaledObject) and polls until a version is AVAILABLE or
``model_wait_s`` passes. Its entry is a lease renewed by a thread: a producer
killed while waiting stops renewing, its entry lapses, and the tier is free
to scale back to zero after its cooldown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Protocol

from labelmill.errors import LedgerUnavailable, ModelUnavailable
from labelmill.ledger import Ledger

log = logging.getLogger(__name__)

# Long enough that a busy producer always renews in time (every third of
# it), short next to the model tier's cooldown, so a dead waiter costs
# the cluster at most this much extra.
LEASE_S = 30.0
POLL_S = 1.0


class VersionSource(Protocol):
    """What is asked of the model server: every version and its state."""

    def model_versions(self) -> dict[int, str]: ...


def _probe(client: VersionSource) -> int | str:
    """The newest AVAILABLE version, or why there is none yet."""
    try:
        versions = client.model_versions()
    except ModelUnavailable as exc:
        return f"model server not answering ({exc})"
    available = [v for v, state in versions.items() if state == "AVAILABLE"]
    if available:
        return max(available)
    if not versions:
        return "model server has no version of the model yet"
    shown = ", ".join(f"{v} {state}" for v, state in sorted(versions.items()))
    return f"model server is loading (versions: {shown})"


@contextlib.contextmanager
def waiting(ledger: Ledger, *, lease_s: float = LEASE_S) -> Iterator[str]:
    """Hold an entry in the waiting set, renewed every ``lease_s / 3``, for the block."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    ledger.hold_waiting(token, lease_s)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(lease_s / 3):
            try:
                ledger.hold_waiting(token, lease_s)
            except LedgerUnavailable as exc:
                # The next renewal may succeed; the lease covers two misses.
                log.warning("could not renew the waiting lease: %s", exc)

    thread = threading.Thread(target=renew, name="labelmill-waiting", daemon=True)
    thread.start()
    try:
        yield token
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(LedgerUnavailable):
            ledger.release_waiting(token)


def newest_version(
    client: VersionSource,
    ledger: Ledger,
    *,
    wait_s: float,
    say: Callable[[str], None],
    poll_s: float = POLL_S,
    lease_s: float = LEASE_S,
) -> int:
    """The newest AVAILABLE version, waiting up to ``wait_s`` for one to appear.

    Raises :class:`ModelNotFound` at once when the server does not know the
    model (a wrong name does not get better by waiting) and
    :class:`ModelUnavailable` when ``wait_s`` passes without a version.
    """
    found = _probe(client)
    if isinstance(found, int):
        return found
    say(
        f"waiting up to {wait_s:g}s for a model version: {found}; "
        f"the model tier scales up on {ledger.waiting_key}"
    )
    deadline = time.monotonic() + wait_s
    reason = found
    with waiting(ledger, lease_s=lease_s):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModelUnavailable(
                    f"no model version became AVAILABLE within {wait_s:g}s ({reason}); "
                    "check the model tier, or wait longer with LABELMILL_MODEL_WAIT_S"
                )
            time.sleep(min(poll_s, remaining))
            found = _probe(client)
            if isinstance(found, int):
                say(f"model version {found} is AVAILABLE")
                return found
            if found.split(" (")[0] != reason.split(" (")[0]:
                say(f"still waiting: {found}")
            reason = found
