"""A live worker keeps its messages; a dead worker's come back within a minute or two.

kombu's Redis transport emulates acknowledgements: a delivered message sits
in the ``unacked`` hash and the ``unacked_index`` sorted set, scored with its
delivery time, until the worker acks it (kombu/transport/redis.py:
``QoS.append``, ``QoS.ack``). Every live consumer sweeps the index and puts
back the messages scored more than ``visibility_timeout`` seconds ago
(``QoS.restore_visible``, every ``unacked_restore_interval`` seconds; labelmill
sets the throttle to 1, see labelmill/queue.py). When a worker's whole
container dies (an OOM kill takes Celery's main process and its pool
together), nobody is left to reject its messages: the visibility timeout is
how long they wait.

So labelmill keeps that timeout short (``LABELMILL_VISIBILITY_TIMEOUT_S``,
60 s) and each live worker re-scores the messages it holds (received and not
yet finished: running, or prefetched) every quarter of it, from a thread of
its main process. ``ZADD XX`` only touches members still in the index, so a
message acknowledged meanwhile is never brought back. A batch that runs for
an hour is thus never taken from a worker that is alive, and a dead
worker's messages are back on the queue within visibility_timeout +
refresh interval + restore interval of its death (60 + 15 + 10 s by default).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis
from celery.worker import state
from kombu.transport.redis import Channel

log = logging.getLogger(__name__)

# kombu's key for the unacked index (Channel.unacked_index_key); labelmill
# sets no global_keyprefix, so this is the key in Redis.
UNACKED_INDEX = Channel.unacked_index_key


def held_tags() -> list[str]:
    """Delivery tags of every message this worker process holds (main process only).

    ``celery.worker.state.requests`` has each request from reception
    (``task_reserved``) until it is finished (``task_ready``).
    """
    requests = state.requests.copy()  # one C-level copy: safe beside the consumer thread
    return [str(r.message.delivery_tag) for r in requests.values() if r.message is not None]


class VisibilityRefresher:
    """Re-scores held messages in the unacked index every ``every_s`` seconds."""

    def __init__(
        self,
        client: redis.Redis,
        every_s: float,
        held: Callable[[], list[str]] = held_tags,
        index_key: str = UNACKED_INDEX,
    ) -> None:
        self.client = client
        self.every_s = every_s
        self.held = held
        self.index_key = index_key
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> int:
        """Mark every held message as delivered now; return how many were still unacked."""
        tags = self.held()
        if not tags:
            return 0
        now = time.time()
        # XX: never re-add a message that was acked between held() and now.
        # CH: the count of members whose score changed, i.e. still unacked.
        changed = self.client.zadd(self.index_key, dict.fromkeys(tags, now), xx=True, ch=True)
        return int(changed or 0)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.refresh()
            except redis.RedisError as exc:
                # Redis is down: nobody can restore anything either. Keep trying.
                log.warning("could not refresh the visibility of held messages: %s", exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="visibility", daemon=True)
        self._thread.start()
        log.info(
            "refreshing held messages every %.0fs (unacked index %s)", self.every_s, self.index_key
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
