"""A Service's local address: a TCP proxy that spreads connections over ready pods.

kube-proxy gives each Service port one virtual address and sends every new
connection to one of the Service's ready endpoints; an established connection
stays where it went (conntrack) until one side closes it. This proxy does the
same for one Service port on loopback: round-robin over the endpoints it was
last given, the connection closed at once when there are none (kube-proxy
answers such a connection with a reject, see pkg/proxy/iptables/proxier.go,
``syncProxyRules``: "has no endpoints" -> REJECT). A pod that leaves the
endpoints keeps its open connections, as under kube-proxy; they end when the
pod's process does.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
_CHUNK = 256 * 1024


class ServiceProxy:
    """One Service port: listens on ``host:port`` (0 picks a free port)."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self._listener = socket.create_server((host, port), backlog=128)
        self._endpoints: tuple[tuple[str, int], ...] = ()
        self._turn = itertools.count()
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"svc-{name}", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def set_endpoints(self, endpoints: Sequence[tuple[str, int]]) -> None:
        """Replace the ready endpoints; open connections are left alone."""
        with self._lock:
            self._endpoints = tuple(endpoints)

    def endpoints(self) -> tuple[tuple[str, int], ...]:
        with self._lock:
            return self._endpoints

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Stop listening and close every connection still open."""
        self._closed.set()
        # shutdown() wakes the accept() blocked in the other thread; close() alone does not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._open)
            self._open.clear()
        for conn in conns:
            _close(conn)
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _pick(self) -> tuple[str, int] | None:
        with self._lock:
            if not self._endpoints:
                return None
            return self._endpoints[next(self._turn) % len(self._endpoints)]

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(client,), name=f"svc-{self.name}-conn", daemon=True
            ).start()

    def _serve(self, client: socket.socket) -> None:
        endpoint = self._pick()
        if endpoint is None:
            _close(client)
            return
        try:
            upstream = socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            log.debug("service %s: %s:%d refused: %s", self.name, *endpoint, exc)
            _close(client)
            return
        upstream.settimeout(None)
        with self._lock:
            if self._closed.is_set():
                _close(client)
                _close(upstream)
                return
            self._open.update((client, upstream))
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
        with self._lock:
            self._open.difference_update((client, upstream))
        _close(client)
        _close(upstream)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    """Copy ``src`` to ``dst`` until ``src`` ends, then end ``dst``'s write side."""
    try:
        while data := src.recv(_CHUNK):
            dst.sendall(data)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()
