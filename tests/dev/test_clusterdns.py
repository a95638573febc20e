"""labelmill.dev.cluster.clusterdns: headless Services' names, asked over real UDP."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from concurrent import futures

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import grpc
import pytest

from labelmill.dev.cluster.clusterdns import TTL_S, ClusterDNS, PodAddresses
from tests.fixtures.procs import wait_until

NAME = "tf-serving.labelmill.svc.cluster.local"


@pytest.fixture
def server() -> Iterator[ClusterDNS]:
    s = ClusterDNS()
    s.start()
    try:
        yield s
    finally:
        s.close()


def _ask(server: ClusterDNS, name: str, rdtype: str = "A") -> dns.message.Message:
    host, port = server.address
    return dns.query.udp(dns.message.make_query(name, rdtype), host, port=port, timeout=5)


def _addresses(reply: dns.message.Message) -> list[str]:
    return [r.address for rrset in reply.answer for r in rrset]


def test_a_headless_service_resolves_to_every_ready_endpoint(server: ClusterDNS) -> None:
    server.set_service(NAME, ["127.9.0.1", "127.9.0.2"])
    reply = _ask(server, NAME)
    assert reply.rcode() == dns.rcode.NOERROR
    assert sorted(_addresses(reply)) == ["127.9.0.1", "127.9.0.2"]
    assert {rrset.ttl for rrset in reply.answer} == {TTL_S}
    server.set_service(NAME, ["127.9.0.2"])
    assert _addresses(_ask(server, NAME)) == ["127.9.0.2"]


def test_no_ready_endpoint_no_ipv6_unknown_and_foreign_names(server: ClusterDNS) -> None:
    server.set_service(NAME, [])
    empty = _ask(server, NAME)  # NODATA, as CoreDNS without "ignore empty_service"
    assert (empty.rcode(), empty.answer) == (dns.rcode.NOERROR, [])
    server.set_service(NAME, ["127.9.0.1"])
    aaaa = _ask(server, NAME, "AAAA")
    assert (aaaa.rcode(), aaaa.answer) == (dns.rcode.NOERROR, [])
    assert _ask(server, "nothing.labelmill.svc.cluster.local").rcode() == dns.rcode.NXDOMAIN
    assert _ask(server, "example.com").rcode() == dns.rcode.REFUSED


def test_pod_addresses_are_distinct_loopback_addresses_of_one_16() -> None:
    pool = PodAddresses(42)
    got = [pool.allocate() for _ in range(300)]
    assert len(set(got)) == 300
    assert all(a.startswith("127.42.") for a in got)
    assert pool.cidr == "127.42.0.0/16"


class _Pod:
    """A gRPC server at one pod address that answers with its own name."""

    def __init__(self, ip: str, port: int, calls: Counter[str]) -> None:
        self.ip = ip

        def who(_request: bytes, _context: grpc.ServicerContext) -> bytes:
            calls[ip] += 1
            return ip.encode()

        handler = grpc.method_handlers_generic_handler(
            "t.Who", {"Who": grpc.unary_unary_rpc_method_handler(who)}
        )
        # TF Serving's flags in k8s/ end every connection after a while, as
        # here: that is what makes a client resolve again and find new pods.
        self.server = grpc.server(
            futures.ThreadPoolExecutor(4),
            options=[
                ("grpc.max_connection_age_ms", 500),
                ("grpc.max_connection_age_grace_ms", 500),
            ],
        )
        self.server.add_generic_rpc_handlers([handler])
        self.port = self.server.add_insecure_port(f"{ip}:{port}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)


def test_a_round_robin_grpc_channel_follows_the_ready_pods(server: ClusterDNS) -> None:
    pool = PodAddresses()
    calls: Counter[str] = Counter()
    lock = threading.Lock()
    a = _Pod(pool.allocate(), 0, calls)
    pods = [a, _Pod(pool.allocate(), a.port, calls)]
    server.set_service(NAME, [p.ip for p in pods])
    target = "dns://{}:{}/{}:{}".format(*server.address, NAME, a.port)
    channel = grpc.insecure_channel(
        target,
        options=[
            ("grpc.service_config", '{"loadBalancingConfig": [{"round_robin": {}}]}'),
            ("grpc.dns_min_time_between_resolutions_ms", 200),
        ],
    )
    who = channel.unary_unary("/t.Who/Who")

    def reached(ips: set[str]) -> bool:
        with lock:
            calls.clear()
        for _ in range(20):
            who(b"", timeout=5, wait_for_ready=True)
        return set(calls) == ips

    try:
        wait_until(lambda: reached({p.ip for p in pods}), timeout=30, what="both pods reached")
        # One pod goes (its address leaves the answer first, as the endpoints
        # do for a terminating pod), a new one comes.
        gone = pods.pop(0)
        server.set_service(NAME, [p.ip for p in pods])
        gone.stop()
        pods.append(_Pod(pool.allocate(), a.port, calls))
        server.set_service(NAME, [p.ip for p in pods])
        wait_until(lambda: reached({p.ip for p in pods}), timeout=30, what="the new pod reached")
    finally:
        channel.close()
        for p in pods:
            p.stop()
