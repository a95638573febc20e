"""The cluster's DNS for headless Services, and the pods' addresses it hands out.

A headless Service (``clusterIP: None``) has no virtual address: cluster DNS
answers its name with the address of every ready pod it selects, and the
client picks and balances (the workers' gRPC channel, ``round_robin`` over
``dns:///tf-serving.labelmill.svc.cluster.local:8500``). This server answers
those names as CoreDNS's *kubernetes* plugin does (plugin/kubernetes/README.md
and ``kubernetes.go`` ``Records``/``findServices``):

- ``A`` for ``<service>.<namespace>.svc.cluster.local``: one record per
  ready endpoint (not-ready pods are left out, ``publishNotReadyAddresses``
  being false), TTL 5 s (the plugin's default ``ttl``);
- a headless Service with no ready endpoint: NOERROR with no answer (NODATA;
  NXDOMAIN only under ``ignore empty_service``), and so for ``AAAA`` (the
  pods have IPv4 addresses only);
- any other name in ``cluster.local``: NXDOMAIN. Names outside the zone,
  which CoreDNS would forward upstream, are REFUSED: nothing here asks for
  them.

It listens on UDP only: even 20 pods' records fit one 512-byte answer, and
c-ares (gRPC's resolver) uses TCP only after a truncated reply.

Each pod gets its own loopback address (:class:`PodAddresses`): on Linux all
of 127.0.0.0/8 reaches the loopback interface with no setup, so a headless
Service's pods can all listen on the Service's declared port, each at its
own address, as pods do on a pod network.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
from collections.abc import Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger(__name__)

ZONE = dns.name.from_text("cluster.local.")
TTL_S = 5  # CoreDNS kubernetes plugin: "The default is 5 seconds."


class PodAddresses:
    """Pod IPs from one /16 of loopback, like host-local IPAM from a node's podCIDR."""

    def __init__(self, second_octet: int | None = None) -> None:
        # A random /16 so that two clusters on one machine do not share addresses.
        self.octet = second_octet if second_octet is not None else random.randint(16, 239)
        self._next = 0
        self._lock = threading.Lock()

    @property
    def cidr(self) -> str:
        return f"127.{self.octet}.0.0/16"

    def allocate(self) -> str:
        with self._lock:
            self._next += 1
            n = self._next
        if n > 0xFFFE:
            raise RuntimeError(f"pod network {self.cidr} is exhausted")
        return f"127.{self.octet}.{n >> 8}.{n & 0xFF}"


class ClusterDNS:
    """A UDP DNS server on ``127.0.0.1`` answering for headless Services."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((host, port))
        self._sock.settimeout(0.5)  # the serving thread looks at close() this often
        self._records: dict[dns.name.Name, tuple[str, ...]] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cluster-dns", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def set_service(self, fqdn: str, addresses: Iterable[str]) -> None:
        """The ready endpoints' addresses of one headless Service, in the order given."""
        name = dns.name.from_text(fqdn if fqdn.endswith(".") else fqdn + ".")
        with self._lock:
            self._records[name] = tuple(addresses)

    def records(self) -> Mapping[str, tuple[str, ...]]:
        with self._lock:
            return {n.to_text(omit_final_dot=True): a for n, a in self._records.items()}

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._sock.close()

    def answer(self, wire: bytes) -> bytes | None:
        """The reply to one query, or None for a packet that is not one."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if len(query.question) != 1:
            reply.set_rcode(dns.rcode.FORMERR)
            return reply.to_wire()
        question = query.question[0]
        if not question.name.is_subdomain(ZONE):
            reply.flags &= ~dns.flags.AA
            reply.set_rcode(dns.rcode.REFUSED)
            return reply.to_wire()
        with self._lock:
            addresses = self._records.get(question.name)
        if addresses is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
        elif question.rdtype == dns.rdatatype.A and addresses:
            reply.answer.append(
                dns.rrset.from_text_list(question.name, TTL_S, dns.rdataclass.IN, "A", addresses)
            )
        return reply.to_wire()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                wire, client = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self.answer(wire)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendto(reply, client)
