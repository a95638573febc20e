"""The worker's message consumer: Celery's, hardened against one broker-loss path.

When the broker connection breaks, Celery 5.7's consumer first *collects* the
broken connection, which detaches kombu's Redis transport from it
(``transport.client = None``), and then *closes* it. If the consumer's channel
could not be closed during the collect (Redis already unreachable while a
BRPOP was outstanding), two things then fail with ``AttributeError``
("'NoneType' object has no attribute 'hostname'") instead of a connection
error:

- the close itself, when it tries to requeue the channel's unacknowledged
  messages: Celery does not expect that error there, and the worker exits
  with "Unrecoverable error";
- the ack (or reject) of a task that was running during the outage and
  finishes after the reconnect: it goes to the old channel, through the same
  detached transport, and also ends the worker.

This consumer lets the failed close go (the messages are still in Redis's
``unacked`` index and come back after the visibility timeout) and re-attaches
the old transport to its connection, so a late ack reaches Redis again, or
fails with a connection error that Celery logs and survives.
``tests/faults/test_servers.py`` reproduces the event order.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer as CeleryConsumer

log = logging.getLogger(__name__)


class Consumer(CeleryConsumer):
    """Celery's consumer that reconnects even when closing the broken connection fails."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        connection = self.connection
        transport = getattr(connection, "_transport", None)
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError as close_error:
            log.warning(
                "broker connection lost (%r) and could not be closed cleanly (%r); "
                "its unacknowledged messages stay in Redis until acked or redelivered",
                exc,
                close_error,
            )
        finally:
            if transport is not None and transport.client is None:
                transport.client = connection
