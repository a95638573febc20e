"""labelmill.dev.cluster.proxy: a Service's address over real loopback sockets."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from labelmill.dev.cluster.proxy import ServiceProxy


class _Named(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _backend(name: bytes) -> _Named:
    """A server that answers every line with its name and the line."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(name + b":" + line)

    server = _Named(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def backends() -> Iterator[dict[bytes, tuple[str, int]]]:
    servers = {name: _backend(name) for name in (b"a", b"b")}
    yield {name: s.server_address[:2] for name, s in servers.items()}  # type: ignore[misc]
    for s in servers.values():
        s.shutdown()
        s.server_close()


@pytest.fixture
def proxy() -> Iterator[ServiceProxy]:
    p = ServiceProxy("test")
    p.start()
    yield p
    p.close()


def _ask(conn: socket.socket, line: bytes) -> bytes:
    conn.sendall(line + b"\n")
    reader = conn.makefile("rb")
    return reader.readline().rstrip(b"\n")


def test_connections_spread_round_robin_over_the_endpoints(
    proxy: ServiceProxy, backends: dict[bytes, tuple[str, int]]
) -> None:
    proxy.set_endpoints([backends[b"a"], backends[b"b"]])
    answers = []
    for i in range(4):
        with socket.create_connection(proxy.address, timeout=5) as conn:
            answers.append(_ask(conn, b"%d" % i))
    assert answers == [b"a:0", b"b:1", b"a:2", b"b:3"]


def test_an_open_connection_stays_on_its_pod_when_the_endpoints_change(
    proxy: ServiceProxy, backends: dict[bytes, tuple[str, int]]
) -> None:
    proxy.set_endpoints([backends[b"a"]])
    with socket.create_connection(proxy.address, timeout=5) as held:
        assert _ask(held, b"x") == b"a:x"
        proxy.set_endpoints([backends[b"b"]])
        assert _ask(held, b"y") == b"a:y"
        with socket.create_connection(proxy.address, timeout=5) as fresh:
            assert _ask(fresh, b"z") == b"b:z"


def test_no_ready_endpoint_closes_the_connection(proxy: ServiceProxy) -> None:
    with socket.create_connection(proxy.address, timeout=5) as conn:
        conn.sendall(b"hello\n")
        assert conn.recv(10) == b""


def test_close_ends_open_connections(backends: dict[bytes, tuple[str, int]]) -> None:
    p = ServiceProxy("closing")
    p.start()
    p.set_endpoints([backends[b"a"]])
    with socket.create_connection(p.address, timeout=5) as conn:
        assert _ask(conn, b"1") == b"a:1"
        p.close()
        assert conn.recv(10) == b""
    with pytest.raises(OSError):
        socket.create_connection(p.address, timeout=2).close()
