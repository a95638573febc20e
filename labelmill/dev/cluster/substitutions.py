"""Everything the local cluster substitutes: the one table, and the rewriter.

Nothing in ``k8s/`` or ``keda/`` is edited to run here. What a cluster
provides and this machine does not is stood in for as follows; every rule
is applied by :class:`Rewriter` to a container's command, args and env
values (after the kubelet's ``$(VAR)`` expansion) and to the files written
into its configMap and secret volumes.

============================  ==============================================
in the manifests              on this machine
============================  ==============================================
image ``registry.example.com  the project's virtual environment: ``python``
/labelmill/worker:*``         is ``sys.executable``, ``celery`` and
                              ``producer`` the scripts beside it; the
                              image's ``ENV`` (PYTHONUNBUFFERED...) and
                              ``WORKDIR /tmp`` (the Dockerfile) are applied
``/opt/labelmill/             ``deploy/scripts/model_sync.py`` of this
model_sync.py`` (in image)    checkout (the Dockerfile copies it there)
image ``tensorflow/serving:*``  ``<venv>/bin/serving local --host=<pod IP>``
with ``tensorflow_model_      followed by the container's own args (TF
server``                      Serving's flags); WORKDIR ``/``
image ``redis:*``             the system ``redis-server`` / ``redis-cli``;
                              ``redis-server`` gets ``--bind <pod IP>``
                              appended (without it Redis listens on every
                              interface, where every pod's 6379 would
                              meet); ``redis-cli`` gets ``-h <pod IP> -p
                              PORT``, its implicit defaults; WORKDIR
                              ``/data``
``volumeMounts[].mountPath``  the pod's volume folder
                              ``DIR/pods/<pod>/volumes/<volume>`` (emptyDir,
                              configMap, secret) or ``DIR/pvc/<claim>-<pod>``
                              (volumeClaimTemplates: kept across pod
                              restarts, like a PersistentVolumeClaim);
                              ``TMPDIR`` follows the ``/tmp`` mount, or the
                              pod's own ``rootfs/tmp`` without one
the pod network               a loopback address per pod, ``127.X.n.n``
                              from one /16 (``clusterdns.PodAddresses``);
                              ``status.podIP`` is it, ``status.hostIP``
                              and ``spec.nodeName`` are ``127.0.0.1`` and
                              ``localhost``
a declared ``containerPort``  kept as declared where a headless Service
                              targets it (DNS gives clients addresses, not
                              ports); any other: a free port per pod,
                              rewritten where the number stands as a port
                              (``--port=5555``, ``"9100"``, ``port
                              6379``), since processes that bind every
                              interface would meet on one number; probes
                              by port number or name use the mapping
Service DNS name with a       the Service port's local address
Service port (``redis:6379``, ``127.0.0.1:P`` (a :class:`ServiceProxy`
``redis.labelmill``,          spreading connections over ready pods, like
``....svc``, ``....svc.       kube-proxy), also inside URLs
cluster.local``)
a gRPC target ``dns:///``     ``dns://127.0.0.1:D/<name>.<ns>.svc.cluster.
naming a headless Service     local:PORT``: the same name and port, asked
                              of the cluster's DNS (:class:`~labelmill.dev.
                              cluster.clusterdns.ClusterDNS`, standing in
                              for the kubelet's resolv.conf and CoreDNS),
                              which answers every ready pod's address.
                              Other references to a headless Service
                              (which the system resolver would have to
                              answer) get the proxy above
bucket ``REPLACE-models-      the local bucket :data:`MODELS_BUCKET` on the
bucket``                      SeaweedFS S3 gateway that stands in for the
                              cloud bucket
Secret ``labelmill-s3``       the local gateway's identity and endpoint
                              (``labelmill.dev.stack``'s local keys)
a Secret value starting with  a random hex value made at ``up`` (the
``REPLACE_WITH``              example files' placeholders), kept in
                              ``DIR/secrets.json`` for the next ``up``
node environment              every container also gets
                              :data:`NODE_ENV` (SeaweedFS needs boto's
                              checksums "when_required"; no instance
                              metadata service here)
============================  ==============================================

Not substituted (real behaviour kept): ``$(VAR)`` expansion, Service
environment variables (``enableServiceLinks``), probes, grace periods,
restart back-off.
"""

from __future__ import annotations

import fnmatch
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]
VENV_BIN = Path(sys.executable).parent
MODELS_BUCKET = "lm-cluster-models"
PLACEHOLDER_BUCKETS = {"REPLACE-models-bucket": MODELS_BUCKET}
PLACEHOLDER_PREFIX = "REPLACE_WITH"
HOST_IP = "127.0.0.1"
NODE_NAME = "localhost"

NODE_ENV = {
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
    "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
}


@dataclass(frozen=True)
class Image:
    """How one image runs here: its binaries, ENV, WORKDIR and files."""

    pattern: str
    binaries: Mapping[str, Sequence[str]]
    workdir: str = "/"
    env: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    # Appended after the container's own args, by command name.
    append_args: Mapping[str, Sequence[str]] = field(default_factory=dict)
    # Inserted right after the command. In all three: "{ip}" is the pod's
    # address, "{port:N}" its local port for containerPort N.
    default_args: Mapping[str, Sequence[str]] = field(default_factory=dict)


def _venv(name: str) -> str:
    return sys.executable if name == "python" else str(VENV_BIN / name)


_WORKER_ENV = {
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "PIP_NO_CACHE_DIR": "1",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "VIRTUAL_ENV": str(VENV_BIN.parent),
}

IMAGES: tuple[Image, ...] = (
    Image(
        "registry.example.com/labelmill/worker:*",
        binaries={name: [_venv(name)] for name in ("python", "celery", "producer", "serving")},
        workdir="/tmp",
        env=_WORKER_ENV,
        files={"/opt/labelmill/model_sync.py": str(REPO_ROOT / "deploy/scripts/model_sync.py")},
    ),
    Image(
        "registry.example.com/labelmill/export:*",
        binaries={name: [_venv(name)] for name in ("python", "serving")},
        workdir="/tmp",
        env=_WORKER_ENV,
        files={"/opt/labelmill/model_sync.py": str(REPO_ROOT / "deploy/scripts/model_sync.py")},
    ),
    Image(
        "tensorflow/serving:*",
        binaries={"tensorflow_model_server": [_venv("serving"), "local", "--host={ip}"]},
        workdir="/",
    ),
    Image(
        "redis:*",
        binaries={"redis-server": ["redis-server"], "redis-cli": ["redis-cli"]},
        workdir="/data",
        append_args={"redis-server": ["--bind", "{ip}"]},
        default_args={"redis-cli": ["-h", "{ip}", "-p", "{port:6379}"]},
    ),
)


class SubstitutionError(Exception):
    """The manifests name something this table cannot stand in for."""


def image_for(ref: str) -> Image:
    for image in IMAGES:
        if fnmatch.fnmatchcase(ref, image.pattern):
            return image
    raise SubstitutionError(f"image {ref!r} has no local stand-in (see substitutions.IMAGES)")


def local_argv(image: Image, argv: Sequence[str], ports: Mapping[int, int], ip: str) -> list[str]:
    """The container's command + args as a local command line, for the pod at ``ip``."""
    if not argv:
        raise SubstitutionError("a container without command: image defaults are not modelled")
    name = argv[0]
    if name not in image.binaries:
        raise SubstitutionError(f"{name!r} is not in image {image.pattern!r}'s table")

    def fill(args: Sequence[str]) -> list[str]:
        def one(m: re.Match[str]) -> str:
            return ip if m.group(1) is None else str(ports.get(int(m.group(1)), int(m.group(1))))

        return [re.sub(r"\{(?:ip|port:(\d+))\}", one, a) for a in args]

    return [
        *fill(image.binaries[name]),
        *fill(image.default_args.get(name, ())),
        *argv[1:],
        *fill(image.append_args.get(name, ())),
    ]


def service_names(name: str, namespace: str) -> list[str]:
    """The DNS names a Service answers to, longest first."""
    return [
        f"{name}.{namespace}.svc.cluster.local",
        f"{name}.{namespace}.svc",
        f"{name}.{namespace}",
        name,
    ]


def _const(text: str) -> Callable[[re.Match[str]], str]:
    return lambda _m: text


def _ask(server: str, fqdn: str) -> Callable[[re.Match[str]], str]:
    # Rules are joined into one pattern: only group 0 is a rule's own.
    return lambda m: f"dns://{server}/{fqdn}:{m.group(0).rpartition(':')[2]}"


class Rewriter:
    """One pass over a text, applying every rule; replaced text is not rescanned.

    Rules at the same position are tried in order: gRPC targets of headless
    Services, Service references, then placeholders and image files, then
    mount paths, then port numbers.
    """

    def __init__(self) -> None:
        self._rules: list[tuple[str, Callable[[re.Match[str]], str]]] = []
        self._compiled: re.Pattern[str] | None = None

    def add(self, pattern: str, replace: Callable[[re.Match[str]], str]) -> Rewriter:
        self._rules.append((pattern, replace))
        self._compiled = None
        return self

    def services(self, refs: Mapping[tuple[str, str, int], tuple[str, int]]) -> Rewriter:
        """``(name, namespace, port) -> local address`` for ``host:port`` references."""
        for (name, ns, port), (host, local) in sorted(refs.items(), key=lambda kv: -len(kv[0][0])):
            hosts = "|".join(re.escape(h) for h in service_names(name, ns))
            self.add(
                rf"(?<![\w.-])(?:{hosts}):{port}(?!\d)",
                _const(f"{host}:{local}"),
            )
        return self

    def dns_targets(self, names: Sequence[tuple[str, str]], server: str) -> Rewriter:
        """gRPC ``dns:///NAME:PORT`` targets of headless Services ``(name, namespace)``:
        the same name, fully qualified, asked of the DNS server at ``server``."""
        for name, ns in sorted(names, key=lambda n: -len(n[0])):
            hosts = "|".join(re.escape(h) for h in service_names(name, ns))
            fqdn = service_names(name, ns)[0]
            self.add(rf"dns:(?:///)?(?:{hosts}):\d+(?!\d)", _ask(server, fqdn))
        return self

    def literals(self, table: Mapping[str, str]) -> Rewriter:
        for old, new in sorted(table.items(), key=lambda kv: -len(kv[0])):
            self.add(re.escape(old), _const(new))
        return self

    def mounts(self, table: Mapping[str, str]) -> Rewriter:
        """``mountPath -> local folder`` where the path stands as a path prefix."""
        for mount, local in sorted(table.items(), key=lambda kv: -len(kv[0])):
            path = re.escape(mount.rstrip("/") or "/")
            self.add(rf"(?<![\w.~/-]){path}(?=/|$|[^\w.-])", _const(local))
        return self

    def ports(self, table: Mapping[int, int]) -> Rewriter:
        """Declared containerPort -> local port, where the number stands alone."""
        if table:
            alt = "|".join(str(p) for p in sorted(table, reverse=True))
            self.add(
                rf"(?<![\w.])(?:{alt})(?![\w.])",
                lambda m: str(table[int(m.group(0))]),
            )
        return self

    def __call__(self, text: str) -> str:
        if not self._rules:
            return text
        if self._compiled is None:
            self._compiled = re.compile(
                "|".join(f"(?P<r{i}>{pattern})" for i, (pattern, _) in enumerate(self._rules)),
                re.MULTILINE,
            )
        rules = self._rules

        def one(m: re.Match[str]) -> str:
            assert m.lastgroup is not None
            return rules[int(m.lastgroup[1:])][1](m)

        return self._compiled.sub(one, text)
