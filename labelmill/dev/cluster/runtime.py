"""The running cluster: S3, Services, controllers, KEDA, events, control requests."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import redis

from labelmill.dev.cluster.autoscale import (
    Autoscaler,
    RedisTrigger,
    ScaledObjectSpec,
    redis_list_length,
)
from labelmill.dev.cluster.clusterdns import ClusterDNS, PodAddresses
from labelmill.dev.cluster.controllers import Workload
from labelmill.dev.cluster.expansion import service_env
from labelmill.dev.cluster.kubelet import Pod, PodContext
from labelmill.dev.cluster.manifests import fill_placeholders, load, strategic_merge
from labelmill.dev.cluster.node import (
    CgroupError,
    MemoryCgroups,
    Node,
    Resources,
    kill_all,
    node_labels,
    schedule,
)
from labelmill.dev.cluster.proxy import ServiceProxy
from labelmill.dev.cluster.substitutions import (
    MODELS_BUCKET,
    NODE_ENV,
    NODE_NAME,
    PLACEHOLDER_BUCKETS,
    REPO_ROOT,
    VENV_BIN,
    Rewriter,
    service_names,
)
from labelmill.dev.stack import LOCAL_ACCESS_KEY, LOCAL_SECRET_KEY, StackError, _bin, s3_config
from labelmill.hardware import cpu_flags

TICK_S = 0.25
S3_START_TIMEOUT_S = 90.0
OUTSTANDING_KEY = "labelmill:outstanding"


class ClusterError(Exception):
    """A one-line reason the cluster cannot start."""


def _port_pair() -> int:
    """A free port whose +10000 twin (SeaweedFS's gRPC port) is free too."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65536:
            with socket.socket() as t:
                try:
                    t.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise ClusterError("no free port pair for SeaweedFS")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


class Cluster:
    def __init__(
        self,
        root: Path,
        *,
        k8s: Path,
        keda: Path,
        time_scale: float = 1.0,
        model_arch: str = "tiny",
        node: Resources,
    ) -> None:
        self.root = root.resolve()
        self.k8s, self.keda = k8s, keda
        self.time_scale = time_scale
        self.model_arch = model_arch
        self.node = Node(NODE_NAME, node, node_labels(NODE_NAME, cpu_flags()))
        self.cgroups: MemoryCgroups | None = None
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self._log_lock = threading.Lock()
        self.s3: subprocess.Popen[bytes] | None = None
        self.s3_endpoint = ""
        self.proxies: dict[tuple[str, str], ServiceProxy] = {}
        self.dns = ClusterDNS()
        self.pod_addresses = PodAddresses()
        self.workloads: list[Workload] = []
        self.scalers: list[tuple[ScaledObjectSpec, Autoscaler]] = []
        self.outstanding: int | None = None  # ZCARD of the ledger's outstanding set
        self.scaler_status: dict[str, dict[str, Any]] = {}
        self._last_events: dict[str, tuple[float, tuple[int, int, int], int | None]] = {}
        self._announced = False
        self._redis: redis.Redis | None = None

    # ------------------------------------------------------------ logging

    def log(self, message: str) -> None:
        with self._log_lock:
            print(f"[{time.monotonic() - self.t0:7.1f}s] {message}", flush=True)

    # ------------------------------------------------------------ start

    def up(self) -> int:
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("control", "pods", "pvc"):
            (self.root / sub).mkdir(exist_ok=True)
        (self.root / "events.jsonl").touch()
        self.m = load(self.k8s, self.keda, self.log)
        try:
            self._start_node()
            self._start_s3()
            fill_placeholders(
                self.m.secrets,
                {
                    "labelmill-s3": {
                        "access_key_id": LOCAL_ACCESS_KEY,
                        "secret_access_key": LOCAL_SECRET_KEY,
                        "endpoint_url": self.s3_endpoint,
                    }
                },
                self.root / "secrets.json",
            )
            self._publish_model()
            self._start_services()
            self._load_workloads()
            self._load_scalers()
            self._write_files()
            self._loop()
        finally:
            self.shutdown()
        return 0

    def _start_node(self) -> None:
        """Announce the node, and make ``kubepods``: every pod's memory, capped at allocatable."""
        self.log(f"node {self.node.name}: allocatable {self.node.allocatable.describe()}")
        try:
            self.cgroups = MemoryCgroups(self.node.allocatable.memory)
        except CgroupError as exc:
            self.log(
                f"node: {exc}. Containers run without memory limits; the scheduler still "
                "places pods only while their memory requests fit the node."
            )
            return
        self.log(f"node: pods run in memory cgroup {self.cgroups.root}")

    def _s3_env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
            "AWS_REGION": "us-east-1",
            **NODE_ENV,
        }

    def _start_s3(self) -> None:
        data = self.root / "s3"
        data.mkdir(exist_ok=True)
        (data / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        (self.root / "s3.json").write_text(s3_config())
        ports: list[int] = []
        while len(ports) < 4:
            p = _port_pair()
            if all(abs(p - q) not in (0, 10000) for q in ports):
                ports.append(p)
        s3, master, volume, filer = ports
        try:
            weed = _bin("weed")
        except StackError as exc:
            raise ClusterError(str(exc)) from None
        args = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
            "-master.volumeSizeLimitMB=64", "-volume.max=0", "-s3", f"-s3.port={s3}",
            f"-s3.config={self.root / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-volume.preStopSeconds=0", "-master.electionTimeout=1s", "-master.telemetry=false",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        log = open(self.root / "s3.log", "ab")  # noqa: SIM115 - lives with the process
        self.s3 = subprocess.Popen(
            args, cwd=data, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.s3_endpoint = f"http://127.0.0.1:{s3}"
        self.log(f"s3: SeaweedFS at {self.s3_endpoint} (stands in for the cloud bucket)")
        client = self._s3_client()
        deadline = time.monotonic() + S3_START_TIMEOUT_S
        while True:
            if self.s3.poll() is not None:
                raise ClusterError(f"weed exited ({self.s3.returncode}); see {self.root}/s3.log")
            try:
                client.list_buckets()
                names = {b["Name"] for b in client.list_buckets()["Buckets"]}
                if MODELS_BUCKET not in names:
                    client.create_bucket(Bucket=MODELS_BUCKET)
                return
            except Exception as exc:
                if time.monotonic() > deadline or self.stop.is_set():
                    raise ClusterError(f"S3 not up after {S3_START_TIMEOUT_S:g}s: {exc}") from None
                time.sleep(0.25)

    def _s3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=LOCAL_ACCESS_KEY,
            aws_secret_access_key=LOCAL_SECRET_KEY,
            region_name="us-east-1",
            config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}),
        )

    def _publish_model(self) -> None:
        """Export the model once and push it where the init container pulls it from."""
        base = self.root / "model" / "inception"
        env = {**os.environ, **self._s3_env(), "TF_CPP_MIN_LOG_LEVEL": "3"}
        if not any(p.name.isdigit() for p in base.glob("*")):
            self.log(f"model: exporting {self.model_arch} (random weights) to {base}")
            subprocess.run(
                [str(VENV_BIN / "serving"), "export", "--out", str(base), "--version", "1",
                 "--arch", self.model_arch, "--weights", "random", "--seed", "1"],
                env=env, check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
        dest = f"s3://{MODELS_BUCKET}/models/inception"
        self.log(f"model: pushing to {dest}")
        subprocess.run(
            [sys.executable, str(REPO_ROOT / "deploy/scripts/model_sync.py"), "push",
             str(base), dest],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip

    def _start_services(self) -> None:
        self.dns.start()
        self.log(
            "dns {}:{} answers the headless Services; pod network {}".format(
                *self.dns.address, self.pod_addresses.cidr
            )
        )
        for svc in self.m.services:
            name = svc["metadata"]["name"]
            for port in svc["spec"].get("ports") or []:
                proxy = ServiceProxy(f"{name}:{port['port']}")
                proxy.start()
                self.proxies[(name, str(port["port"]))] = proxy
        self.service_refs = {
            (svc["metadata"]["name"], self.m.namespace, int(p["port"])): self.proxies[
                (svc["metadata"]["name"], str(p["port"]))
            ].address
            for svc in self.m.services
            for p in svc["spec"].get("ports") or []
        }
        links = []
        for svc in self.m.services:
            if svc["spec"].get("clusterIP") == "None":
                continue  # headless: no Service variables (envvars.FromServices)
            name = svc["metadata"]["name"]
            ports = [
                (str(p.get("name", "")), self.proxies[(name, str(p["port"]))].address[1])
                for p in svc["spec"].get("ports") or []
            ]
            links.append((name, "127.0.0.1", ports))
        self.service_environment = service_env(links)
        for (name, port), proxy in self.proxies.items():
            self.log(f"service {name}:{port} -> {proxy.address[0]}:{proxy.address[1]}")

    def _load_workloads(self) -> None:
        self.ctx = PodContext(
            root=self.root,
            namespace=self.m.namespace,
            secrets=self.m.secrets,
            config_maps=self.m.config_maps,
            service_refs=self.service_refs,
            service_env=self.service_environment,
            literals=dict(PLACEHOLDER_BUCKETS),
            log=self.log,
            pod_ip=self.pod_addresses.allocate,
            headless=[
                (svc["spec"].get("selector") or {}, p.get("targetPort", p["port"]))
                for svc in self._headless()
                for p in svc["spec"].get("ports") or []
            ],
            headless_names=[
                (svc["metadata"]["name"], self.m.namespace) for svc in self._headless()
            ],
            dns="{}:{}".format(*self.dns.address),
            cgroups=self.cgroups,
        )
        self.workloads = [Workload(doc) for doc in self.m.workloads]
        for w in self.workloads:
            self.log(f"{w.kind.lower()}/{w.name}: replicas {w.replicas}")

    def _load_scalers(self) -> None:
        for doc in self.m.scaled_objects:
            try:
                spec = ScaledObjectSpec.from_manifest(doc)
            except ValueError as exc:
                raise ClusterError(f"keda: {exc}") from None
            if not any(w.name == spec.target for w in self.workloads):
                raise ClusterError(f"keda: scaledobject/{spec.name}: no workload {spec.target!r}")
            self.scalers.append((spec, Autoscaler(spec, time_scale=self.time_scale)))
            self.log(
                f"keda: scaledobject/{spec.name} -> deployment/{spec.target} "
                f"(polling every {spec.polling_interval_s / self.time_scale:g}s, "
                f"cooldown {spec.cooldown_period_s / self.time_scale:g}s)"
            )

    def _headless(self) -> list[Mapping[str, Any]]:
        return [svc for svc in self.m.services if svc["spec"].get("clusterIP") == "None"]

    def _make_pod(self, name: str, workload: Workload, template: Mapping[str, Any]) -> Pod:
        claims = {c: self.root / "pvc" / f"{c}-{name}" for c in workload.claim_templates}
        return Pod(name, workload.name, template, self.ctx, claims=claims)

    def _schedule(self) -> None:
        pods = [p for w in self.workloads for p in w.pods]
        for pod in schedule(self.node, pods):
            self.log(f"pod {pod.name}: Pending ({pod.unschedulable}; requests "
                     f"{pod.requests.describe()})")  # fmt: skip

    # ------------------------------------------------------------ addresses

    def _service_address(self, name: str, port: int) -> str:
        host, local = self.proxies[(name, str(port))].address
        return f"{host}:{local}"

    def redis_url(self) -> str:
        password = self.m.secrets.get("labelmill-redis", {}).get("password", "")
        auth = f":{password}@" if password else ""
        return f"redis://{auth}{self._service_address('redis', 6379)}/0"

    def env(self) -> dict[str, str]:
        env = {"LABELMILL_REDIS_URL": self.redis_url(), **self._s3_env()}
        if ("tf-serving", "8500") in self.proxies:
            env["LABELMILL_MODEL_SERVER"] = self._service_address("tf-serving", 8500)
        env["LABELMILL_ALLOW_LOCAL_FILES"] = "false"
        return env

    def _write_files(self) -> None:
        (self.root / "env").write_text(
            "".join(f"export {k}={shlex.quote(v)}\n" for k, v in self.env().items())
        )
        (self.root / "env").chmod(0o600)
        info = {
            "pid": os.getpid(),
            "dir": str(self.root),
            "s3": self.s3_endpoint,
            "s3_pid": self.s3.pid if self.s3 else None,
            "redis_url": self.redis_url(),
            "dns": "{}:{}".format(*self.dns.address),
            "services": {
                f"{name}:{port}": "{}:{}".format(*proxy.address)
                for (name, port), proxy in self.proxies.items()
            },
            "started": time.time(),
        }
        _write_json(self.root / "cluster.json", info)

    # ------------------------------------------------------------ loop

    def _loop(self) -> None:
        """The controllers, the scheduler and the endpoints, every tick.

        KEDA runs in a thread of its own, as it runs in its own pod: a Redis
        that does not answer slows its polls, never the kubelet's work.
        """
        keda = threading.Thread(target=self._keda_loop, name="keda", daemon=True)
        keda.start()
        while not self.stop.is_set():
            for w in self.workloads:
                w.reconcile(self._make_pod, self.log)
            self._schedule()
            self._update_endpoints()
            self._handle_requests()
            self._record(self.outstanding)
            self._announce()
            self.stop.wait(TICK_S)
        keda.join(timeout=10)

    def _keda_loop(self) -> None:
        while not self.stop.is_set():
            self._autoscale()
            self.outstanding = self._outstanding()
            self.stop.wait(TICK_S)

    def _update_endpoints(self) -> None:
        for svc in self.m.services:
            name = svc["metadata"]["name"]
            selector: Mapping[str, str] = svc["spec"].get("selector") or {}
            pods = [
                p
                for w in self.workloads
                for p in w.pods
                if selector and all(p.labels.get(k) == v for k, v in selector.items())
            ]
            for port in svc["spec"].get("ports") or []:
                target = port.get("targetPort", port["port"])
                endpoints = []
                for p in pods:
                    if p.is_ready():  # terminating pods leave at once
                        with contextlib.suppress(KeyError):
                            endpoints.append((p.ip, p.local_port(target)))
                self.proxies[(name, str(port["port"]))].set_endpoints(endpoints)
            if svc["spec"].get("clusterIP") == "None":
                fqdn = service_names(name, self.m.namespace)[0]
                self.dns.set_service(fqdn, [p.ip for p in pods if p.is_ready()])

    def _redis_client(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.redis_url(), socket_timeout=1, socket_connect_timeout=1
            )
        return self._redis

    def _outstanding(self) -> int | None:
        try:
            return int(self._redis_client().zcard(OUTSTANDING_KEY))
        except (redis.RedisError, OSError):
            return None

    def _autoscale(self) -> None:
        """KEDA's poll and its HPA's sync for each ScaledObject that is due (autoscale.py)."""
        now = time.monotonic()
        for spec, scaler in self.scalers:
            if now < scaler.next_due():
                continue
            target = next(w for w in self.workloads if w.name == spec.target)
            try:
                metrics = [self._trigger_metric(t) for t in spec.triggers]
            except (redis.RedisError, OSError) as exc:
                # scale_handler.go: a trigger error with no fallback leaves the count alone.
                self.scaler_status[spec.name] = {"error": str(exc), "target": spec.target}
                continue
            decision = scaler.step(now, metrics, target.replicas, len(target.active()))
            if decision.replicas != target.replicas:
                self.log(
                    f"keda: {spec.target} {target.replicas} -> {decision.replicas} "
                    f"(metric {decision.metric}; {decision.reason})"
                )
                target.replicas = decision.replicas
            self.scaler_status[spec.name] = {
                "target": spec.target,
                "metric": decision.metric,
                "active": decision.active,
                "desired": decision.replicas,
                "hpa_desired": decision.hpa_desired,
                "reason": decision.reason,
            }

    def _trigger_metric(self, trigger: RedisTrigger) -> int:
        """What KEDA's redis scaler reads, through the trigger's own address and auth."""
        host, _, port = Rewriter().services(self.service_refs)(trigger.address).rpartition(":")
        password = None
        auth = self.m.trigger_auths.get(trigger.auth_ref or "")
        for ref in (auth or {}).get("spec", {}).get("secretTargetRef") or []:
            if ref.get("parameter") == "password":
                password = self.m.secrets.get(ref["name"], {}).get(ref["key"])
        client = redis.Redis(
            host=host, port=int(port), db=trigger.database_index, password=password,
            socket_timeout=2, socket_connect_timeout=2,
        )  # fmt: skip
        try:
            return redis_list_length(client, trigger.list_name)
        finally:
            client.close()

    def _record(self, outstanding: int | None) -> None:
        """One line per workload at start and whenever its replicas, ready or pending change.

        A change of the outstanding count alone is written at most once a second.
        """
        now = round(time.monotonic() - self.t0, 3)
        lines = []
        for w in self.workloads:
            state = (w.replicas, w.ready_count(), w.pending_count())
            last = self._last_events.get(w.name)
            if (
                last is None
                or last[1] != state
                or (last[2] != outstanding and now - last[0] >= 1.0)
            ):
                self._last_events[w.name] = (now, state, outstanding)
                lines.append(
                    {"t": now, "deployment": w.name, "replicas": state[0], "ready": state[1],
                     "pending": state[2], "outstanding": outstanding}
                )  # fmt: skip
        if lines:
            with open(self.root / "events.jsonl", "a") as f:
                f.write("".join(json.dumps(e) + "\n" for e in lines))
        _write_json(self.root / "status.json", self.status(outstanding))

    def status(self, outstanding: int | None = None) -> dict[str, Any]:
        return {
            "t": round(time.monotonic() - self.t0, 3),
            "outstanding": outstanding,
            "node": {
                "name": self.node.name,
                "allocatable": {
                    "cpu_m": self.node.allocatable.cpu_m,
                    "memory": self.node.allocatable.memory,
                },
                "requested": self._requested(),
                "memory_cgroup": str(self.cgroups.root) if self.cgroups else None,
                "memory_peak": self.cgroups.peak() if self.cgroups else None,
            },
            "deployments": {
                w.name: {
                    "kind": w.kind,
                    "replicas": w.replicas,
                    "ready": w.ready_count(),
                    "pending": w.pending_count(),
                    "replica_sets": w.rollout() if w.kind == "Deployment" else [],
                    "pods": [p.describe() for p in w.pods],
                }
                for w in self.workloads
            },
            "scaledobjects": self.scaler_status,
        }

    def _requested(self) -> dict[str, int]:
        total = Resources()
        for w in self.workloads:
            for p in w.pods:
                if p.bound and not p.terminated.is_set():
                    total = total + p.requests
        return {"cpu_m": total.cpu_m, "memory": total.memory}

    def _announce(self) -> None:
        if self._announced:
            return
        scaled = {spec.target for spec, _ in self.scalers}
        if all(w.ready_count() >= w.replicas for w in self.workloads if w.name not in scaled):
            self._announced = True
            lines = [f"labelmill local cluster ready in {self.root}:"]
            lines += [
                f"  {name}:{port:<6} {addr}"
                for (name, port), addr in (
                    (k, "{}:{}".format(*p.address)) for k, p in self.proxies.items()
                )
            ]
            lines.append(f"  s3           {self.s3_endpoint}")
            lines.append(f"  use it: source {self.root / 'env'}")
            print("\n".join(lines), flush=True)
            (self.root / "ready").write_text(str(os.getpid()))

    # ------------------------------------------------------------ control

    def _handle_requests(self) -> None:
        for req in sorted((self.root / "control").glob("req-*.json")):
            try:
                body = json.loads(req.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            req.unlink(missing_ok=True)
            try:
                answer = self._answer(body)
            except KeyError as exc:
                answer = {"ok": False, "error": str(exc.args[0]) if exc.args else str(exc)}
            _write_json(req.with_name(req.name.replace("req-", "resp-")), answer)

    def _find_pod(self, name: str) -> Pod:
        for w in self.workloads:
            for p in w.pods:
                if p.name == name and not p.terminated.is_set():
                    return p
        raise KeyError(f"pod {name} not found")

    def _answer(self, body: Mapping[str, Any]) -> dict[str, Any]:
        op = body.get("op")
        if op == "status":
            return {"ok": True, "status": self.status(self._outstanding())}
        if op == "patch":
            return self._patch(str(body.get("deployment")), body.get("patch"))
        if op == "undo":
            w = next((w for w in self.workloads if w.kind == "Deployment"
                      and w.name == body.get("deployment")), None)  # fmt: skip
            if w is None:
                return {
                    "ok": False,
                    "error": f'deployments.apps "{body.get("deployment")}" not found',
                }
            if not w.undo():
                return {"ok": False, "error": "no rollout history found"}
            self.log(f"deployment/{w.name}: rolled back to the previous revision")
            return {"ok": True, "deployment": w.name, "rollout": True}
        pod = self._find_pod(str(body.get("pod")))
        if op == "kill":
            container = pod.kill(body.get("container"))
            self.log(f"pod {pod.name}: container {container} killed (SIGKILL) on request")
            return {"ok": True, "pod": pod.name, "container": container}
        if op == "delete":
            self.log(f"pod {pod.name}: deleted on request")
            pod.delete()
            return {"ok": True, "pod": pod.name}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def _patch(self, name: str, patch: Any) -> dict[str, Any]:
        """``kubectl patch deployment/NAME`` (a strategic merge patch) on the running cluster."""
        w = next((w for w in self.workloads if w.kind == "Deployment" and w.name == name), None)
        if w is None:
            return {"ok": False, "error": f'deployments.apps "{name}" not found'}
        if not isinstance(patch, dict):
            return {"ok": False, "error": "the patch must be a JSON object"}
        doc = strategic_merge(w.doc, patch)
        replicas = (doc.get("spec") or {}).get("replicas")
        if replicas is not None and replicas != (w.doc["spec"].get("replicas")):
            w.replicas = int(replicas)
        w.doc["spec"] = {k: v for k, v in doc["spec"].items() if k != "template"}
        rolled = w.set_template(doc["spec"]["template"])
        self.log(f"deployment/{name}: patched" + (" (rollout started)" if rolled else ""))
        return {"ok": True, "deployment": name, "rollout": rolled}

    # ------------------------------------------------------------ stop

    def shutdown(self) -> None:
        """Delete the Deployments' pods, then the StatefulSets', then stop S3."""
        self.stop.set()
        for kinds in (("Deployment",), ("StatefulSet",)):
            pods = [p for w in self.workloads if w.kind in kinds for p in w.pods]
            for w in self.workloads:
                if w.kind in kinds:
                    w.replicas = 0
            for p in pods:
                p.delete()
            for p in pods:
                while not p.terminated.wait(0.5):
                    self._update_endpoints()
            if pods:
                self.log(f"stopped {len(pods)} {kinds[0]} pod(s)")
        # In parallel: each close may wait a few seconds for its accept thread.
        closers = [threading.Thread(target=p.close, daemon=True) for p in self.proxies.values()]
        for t in closers:
            t.start()
        for t in closers:
            t.join(timeout=10)
        self.dns.close()
        if self._redis is not None:
            self._redis.close()
        if self.s3 is not None and self.s3.poll() is None:
            # weed's graceful stop takes 15 s and holds nothing worth it here.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.s3.pid, 9)
            self.s3.wait(timeout=10)
            self.log("s3 stopped")
        if self.cgroups is not None:
            kill_all(self.cgroups.root)  # nothing of a pod outlives the node
            self.cgroups.remove()
        (self.root / "ready").unlink(missing_ok=True)


def request(root: Path, body: Mapping[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Ask the running ``up`` (a request file under DIR/control/) and wait for its answer."""
    control = root / "control"
    if not control.is_dir():
        raise ClusterError(f"no cluster in {root} (run `up --dir {root}` first)")
    rid = uuid.uuid4().hex
    tmp = control / f".req-{rid}"
    tmp.write_text(json.dumps(body))
    tmp.rename(control / f"req-{rid}.json")
    answer = control / f"resp-{rid}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answer.exists():
            data: dict[str, Any] = json.loads(answer.read_text())
            answer.unlink(missing_ok=True)
            return data
        time.sleep(0.05)
    (control / f"req-{rid}.json").unlink(missing_ok=True)
    raise ClusterError(
        f"the cluster in {root} did not answer within {timeout:g}s (is `up` running?)"
    )
