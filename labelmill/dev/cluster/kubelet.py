"""Pods as local processes: what the kubelet does for one pod.

- Init containers run in order, each to completion; one that fails is
  restarted with back-off and the pod never gets further
  (pkg/kubelet/kuberuntime/kuberuntime_manager.go ``computePodActions``).
- An init container with ``restartPolicy: Always`` is a sidecar
  (pkg/kubelet/kuberuntime/kuberuntime_manager.go
  ``computeInitContainerActions``, ``types.IsRestartableInitContainer``):
  it is started in its turn, the next init container waits only until it
  has *started* (its startup probe passed, or it runs when it has none),
  it is restarted like a main container, its readiness counts towards the
  pod's (pkg/kubelet/status/generate.go ``GeneratePodReadyCondition``), and
  on termination it is stopped after every main container has exited, in
  reverse order (pkg/kubelet/kuberuntime/kuberuntime_termination_order.go).
- Containers restart when they exit (restartPolicy Always) with the
  kubelet's back-off: kuberuntime_manager.go ``doBackOff`` over client-go's
  util/flowcontrol/backoff.go ``Backoff`` with pkg/kubelet/kubelet.go's
  ``backOffPeriod`` 10 s and ``MaxContainerBackOff`` 300 s: the first restart
  is immediate, then 10 s, 20 s, 40 s... after each exit, reset once the
  container has gone 2 x 300 s without one.
- Each container runs in its own process group; when its main process
  exits the rest of the group is killed (a container's PID namespace ends
  with its PID 1).
- Termination: pkg/kubelet/kuberuntime/kuberuntime_container.go
  ``killContainer``: the preStop hook (exec or sleep) runs first and its time
  counts against the grace period; then the stop signal (SIGTERM unless
  ``lifecycle.stopSignal``) goes to the main process, and what is left of the
  grace period (at least ``minimumGracePeriodInSeconds``, 2 s) later the
  whole group gets SIGKILL. Containers of a pod are killed in parallel
  (``killContainersWithSyncResult``). A liveness or startup probe failure
  kills the container the same way, then it restarts. A pod being deleted
  has its liveness and startup probes stopped first (pkg/kubelet/kubelet.go
  ``SyncTerminatingPod``); its readiness probes go on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets as random_secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from labelmill.dev.cluster import expansion
from labelmill.dev.cluster.node import (
    MemoryCgroups,
    Resources,
    container_resources,
    kill_all,
    pod_memory_limit,
    pod_resources,
)
from labelmill.dev.cluster.probes import Checks, ProbeSpec, ProbeWorker
from labelmill.dev.cluster.substitutions import (
    HOST_IP,
    NODE_ENV,
    NODE_NAME,
    VENV_BIN,
    Image,
    Rewriter,
    image_for,
    local_argv,
)

BACKOFF_INITIAL_S = 10.0
BACKOFF_MAX_S = 300.0
MIN_GRACE_S = 2.0
DEFAULT_GRACE_S = 30.0


@dataclass
class PodContext:
    """What the cluster hands every pod."""

    root: Path
    namespace: str
    secrets: Mapping[str, Mapping[str, str]]
    config_maps: Mapping[str, Mapping[str, str]]
    service_refs: Mapping[tuple[str, str, int], tuple[str, int]]
    service_env: Mapping[str, str]
    literals: Mapping[str, str]
    log: Callable[[str], None]
    pod_ip: Callable[[], str]  # the pod network's next address
    # Headless Services: (selector, targetPort) of each port, and the DNS
    # server's "host:port" that answers their names.
    headless: Sequence[tuple[Mapping[str, str], int | str]] = ()
    headless_names: Sequence[tuple[str, str]] = ()
    dns: str = ""
    cgroups: MemoryCgroups | None = None


class Backoff:
    """client-go's flowcontrol.Backoff for one container."""

    def __init__(self, initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_MAX_S) -> None:
        self.initial, self.cap = initial, cap
        self._delay: float | None = None
        self._last_update = 0.0

    def wait_after_exit(self, finished_at: float) -> float:
        """Seconds to wait after an exit at ``finished_at`` before restarting."""
        if self._delay is not None and finished_at - self._last_update > 2 * self.cap:
            self._delay = None  # hasExpired
        wait = 0.0 if self._delay is None else self._delay
        self._delay = self.initial if self._delay is None else min(self._delay * 2, self.cap)
        self._last_update = finished_at + wait
        return wait


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Container:
    spec: Mapping[str, Any]
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: bool = False  # startup probe passed (or none)
    ready: bool = False
    started_at: float = 0.0
    state: str = "waiting"
    last_exit: int | None = None
    last_reason: str = ""
    backoff: Backoff = field(default_factory=Backoff)
    probes: list[ProbeWorker] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def sidecar(self) -> bool:
        """A restartable init container (``restartPolicy: Always``)."""
        return self.init and self.spec.get("restartPolicy") == "Always"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Pod:
    """One pod of a Deployment or StatefulSet."""

    def __init__(
        self,
        name: str,
        owner: str,
        template: Mapping[str, Any],
        ctx: PodContext,
        *,
        claims: Mapping[str, Path] | None = None,
    ) -> None:
        self.name = name
        self.owner = owner
        self.template = template
        self.spec: Mapping[str, Any] = template.get("spec", {})
        self.rs_hash = template_hash(dict(template))  # its ReplicaSet's pod-template-hash
        self.labels: dict[str, str] = dict(template.get("metadata", {}).get("labels", {}))
        self.labels.setdefault("pod-template-hash", self.rs_hash)
        self.annotations: dict[str, str] = dict(template.get("metadata", {}).get("annotations", {}))
        self.ctx = ctx
        self.uid = random_secrets.token_hex(16)
        self.created = time.time()
        self.ready_since: float | None = None
        self.dir = ctx.root / "pods" / name
        self.claims = dict(claims or {})
        self.deleting = threading.Event()
        self.terminated = threading.Event()
        self.init_done = False
        self.init_containers = [
            Container(c, init=True) for c in self.spec.get("initContainers", [])
        ]
        self.containers = [Container(c) for c in self.spec.get("containers", [])]
        self.sidecars = [c for c in self.init_containers if c.sidecar]
        self.requests: Resources = pod_resources(self.spec)
        self.node_selector: dict[str, str] = dict(self.spec.get("nodeSelector") or {})
        self.bound = False  # the scheduler placed it on the node: only then it starts
        self.unschedulable = ""  # why the scheduler could not place it (yet)
        self.cgroup: Path | None = None
        self.grace_s = float(self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
        self.ip = ""  # given when the pod starts, as the CNI plugin gives it
        self.ports: dict[int, int] = {}
        self.port_names: dict[str, int] = {}
        self.volumes: dict[str, Path] = {}
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ status

    @property
    def phase(self) -> str:
        if self.terminated.is_set():
            return "Succeeded"
        if not self.bound:
            return "Pending"
        return (
            "Running" if self.init_done and any(c.running() for c in self.containers) else "Pending"
        )

    def gone(self) -> bool:
        return self.terminated.is_set()

    def being_deleted(self) -> bool:
        return self.deleting.is_set()

    def is_ready(self) -> bool:
        ready = (
            not self.deleting.is_set()
            and self.init_done
            and all(c.running() and c.ready for c in [*self.sidecars, *self.containers])
        )
        if ready and self.ready_since is None:
            self.ready_since = time.time()
        elif not ready:
            self.ready_since = None
        return ready

    @property
    def restarts(self) -> int:
        return max((c.restarts for c in self.containers), default=0)

    @property
    def deletion_cost(self) -> int:
        try:
            return int(self.annotations.get("controller.kubernetes.io/pod-deletion-cost", "0"))
        except ValueError:
            return 0

    def local_port(self, port: int | str) -> int:
        """A probe's or Service's target port (a name or a containerPort) on this machine."""
        number = self.port_names.get(port, 0) if isinstance(port, str) else int(port)
        if isinstance(port, str) and port.isdigit():
            number = int(port)
        if number not in self.ports:
            raise KeyError(f"pod {self.name} declares no port {port!r}")
        return self.ports[number]

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "phase": "Terminating" if self.deleting.is_set() else self.phase,
            "ready": self.is_ready(),
            "node": NODE_NAME if self.bound else None,
            "reason": "" if self.bound else f"Unschedulable: {self.unschedulable}",
            "restarts": self.restarts,
            "ip": self.ip,
            "ports": {str(k): v for k, v in self.ports.items()},
            "containers": {
                c.name: {
                    "pid": c.proc.pid if c.running() and c.proc else None,
                    "state": c.state,
                    "restarts": c.restarts,
                    "started": c.started,
                    "ready": c.ready,
                    "last_exit": c.last_exit,
                    "last_reason": c.last_reason,
                    "init": c.init,
                    "sidecar": c.sidecar,
                }
                for c in [*self.init_containers, *self.containers]
            },
        }

    def pids(self) -> list[int]:
        return [
            c.proc.pid
            for c in [*self.init_containers, *self.containers]
            if c.proc is not None and c.running()
        ]

    # ------------------------------------------------------------ setup

    def _prepare(self) -> None:
        for sub in ("logs", "rootfs/tmp", "volumes"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.ip = self.ctx.pod_ip()
        declared = []
        for c in [*self.init_containers, *self.containers]:
            for p in c.spec.get("ports") or []:
                declared.append(int(p["containerPort"]))
                if p.get("name"):
                    self.port_names[str(p["name"])] = declared[-1]
        kept = self._headless_ports()
        self.ports = {n: n if n in kept else free_port() for n in declared}
        for vol in self.spec.get("volumes") or []:
            path = self.dir / "volumes" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            self.volumes[vol["name"]] = path
        for claim, path in self.claims.items():
            path.mkdir(parents=True, exist_ok=True)
            self.volumes[claim] = path
        rewrite = self._rewriter(self._all_mounts())
        for vol in self.spec.get("volumes") or []:
            source: Mapping[str, str] | None = None
            if "configMap" in vol:
                source = self._object(self.ctx.config_maps, vol["configMap"], "configmap")
                items = vol["configMap"].get("items")
            elif "secret" in vol:
                ref = {"name": vol["secret"].get("secretName"), **vol["secret"]}
                source = self._object(self.ctx.secrets, ref, "secret")
                items = vol["secret"].get("items")
            if source is None:
                continue
            pairs = [(i["key"], i["path"]) for i in items] if items else [(k, k) for k in source]
            for key, rel in pairs:
                target = self.volumes[vol["name"]] / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(rewrite(source[key]))

    def _headless_ports(self) -> set[int]:
        """The containerPorts a headless Service selecting this pod targets."""
        kept = set()
        for selector, target in self.ctx.headless:
            if selector and all(self.labels.get(k) == v for k, v in selector.items()):
                if isinstance(target, str) and not target.isdigit():
                    if target in self.port_names:
                        kept.add(self.port_names[target])
                else:
                    kept.add(int(target))
        return kept

    @staticmethod
    def _object(
        objects: Mapping[str, Mapping[str, str]], ref: Mapping[str, Any], kind: str
    ) -> Mapping[str, str] | None:
        if ref.get("name") in objects:
            return objects[ref["name"]]
        if ref.get("optional"):
            return None
        raise expansion.EnvError(f'{kind} "{ref.get("name")}" not found')

    def _all_mounts(self) -> dict[str, str]:
        mounts: dict[str, str] = {}
        for c in [*self.init_containers, *self.containers]:
            mounts.update(self._mounts(c))
        return mounts

    def _mounts(self, c: Container) -> dict[str, str]:
        out = {}
        for m in c.spec.get("volumeMounts") or []:
            local = self.volumes[m["name"]]
            out[m["mountPath"]] = str(local / m["subPath"]) if m.get("subPath") else str(local)
        return out

    def _rewriter(self, mounts: Mapping[str, str]) -> Rewriter:
        return (
            Rewriter()
            .dns_targets(self.ctx.headless_names, self.ctx.dns)
            .services(self.ctx.service_refs)
            .literals(self.ctx.literals)
            .mounts(mounts)
            .ports(self.ports)
        )

    def _manifest_view(self) -> dict[str, Any]:
        return {
            "metadata": {
                "name": self.name,
                "namespace": self.ctx.namespace,
                "uid": self.uid,
                "labels": self.labels,
                "annotations": self.annotations,
            },
            "spec": {**self.spec, "nodeName": NODE_NAME},
            "status": {"podIP": self.ip, "hostIP": HOST_IP},
        }

    def _launch_spec(self, c: Container) -> tuple[list[str], dict[str, str], str, Rewriter]:
        """argv, env and cwd of a container, or EnvError (CreateContainerConfigError)."""
        image = image_for(str(c.spec.get("image", "")))
        mounts = self._mounts(c)
        rewrite = self._rewriter({**mounts, **image.files})
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOSTNAME": self.name,
            "LANG": "C.UTF-8",
            **image.env,
            **NODE_ENV,
        }
        k8s_env = expansion.make_environment(
            c.spec,
            self._manifest_view(),
            secrets=self.ctx.secrets,
            config_maps=self.ctx.config_maps,
            # kubelet_pods.go getServiceEnvVarMap: with enableServiceLinks
            # false only the API server's own Service (in "default") is
            # linked, which this cluster does not have.
            service_env=self.ctx.service_env if self.spec.get("enableServiceLinks", True) else {},
        )
        argv = expansion.expand_command(
            [*(c.spec.get("command") or []), *(c.spec.get("args") or [])], k8s_env
        )
        env.update({k: rewrite(v) for k, v in k8s_env.items()})
        env.setdefault("HOME", mounts.get("/tmp", str(self.dir / "rootfs")))
        env["TMPDIR"] = mounts.get("/tmp", str(self.dir / "rootfs" / "tmp"))
        workdir = str(c.spec.get("workingDir") or image.workdir)
        cwd = rewrite(workdir) if workdir != "/" else str(self.dir / "rootfs")
        if cwd == workdir:  # an image folder that is no mount: the container's own layer
            cwd = str(self.dir / "rootfs" / workdir.lstrip("/"))
        Path(cwd).mkdir(parents=True, exist_ok=True)
        local = _local_command(image, argv, self.ports, self.ip, rewrite)
        return local, env, cwd, rewrite

    # ------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Placed on the node by the scheduler: the kubelet starts the pod."""
        self.bound, self.unschedulable = True, ""
        if self.ctx.cgroups is not None:
            self.cgroup = self.ctx.cgroups.pod(self.name, pod_memory_limit(self.spec))
        thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _run(self) -> None:
        try:
            self._prepare()
        except Exception as exc:  # a volume that cannot be made: the pod stays Pending
            self.ctx.log(f"pod {self.name}: {exc}")
            self.deleting.wait()
            self.terminated.set()
            return
        for c in self.init_containers:
            if c.sidecar:
                self._start_supervisor(c)
                while not (c.started and c.running()) and not self.deleting.wait(0.1):
                    pass
            while not c.sidecar and not self.deleting.is_set():
                code = self._run_once(c)
                if code == 0:
                    c.state = "terminated"
                    break
                c.restarts += 1
                wait = c.backoff.wait_after_exit(time.monotonic())
                c.state = "backoff"
                self.ctx.log(
                    f"pod {self.name}: init container {c.name} failed ({code}); retry in {wait:g}s"
                )
                self.deleting.wait(wait)
            if self.deleting.is_set():
                return  # _terminate stops what runs (a sidecar) and ends the pod
        self.init_done = True
        for c in self.containers:
            self._start_supervisor(c)

    def _start_supervisor(self, c: Container) -> None:
        thread = threading.Thread(
            target=self._supervise, args=(c,), name=f"pod-{self.name}-{c.name}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _spawn(
        self, c: Container
    ) -> tuple[subprocess.Popen[bytes], dict[str, str], str, Rewriter] | None:
        try:
            argv, env, cwd, rewrite = self._launch_spec(c)
        except Exception as exc:
            c.state = "CreateContainerConfigError"
            self.ctx.log(f"pod {self.name}: container {c.name}: {exc}")
            return None
        argv = self._in_cgroup(c, argv)
        log: IO[bytes] = open(self.dir / "logs" / f"{c.name}.log", "ab")  # noqa: SIM115
        log.write(f"--- start {time.strftime('%H:%M:%S')} {json.dumps(argv)}\n".encode())
        log.flush()
        with c.lock:
            if self.deleting.is_set():
                log.close()
                return None
            proc = subprocess.Popen(
                argv, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            c.proc, c.started_at, c.state = proc, time.monotonic(), "running"
        log.close()
        return proc, env, cwd, rewrite

    def _container_cgroup(self, c: Container) -> Path | None:
        if self.ctx.cgroups is None or self.cgroup is None:
            return None
        limit = container_resources(c.spec, "limits").memory or None
        return self.ctx.cgroups.container(self.cgroup, c.name, limit)

    def _in_cgroup(self, c: Container, argv: list[str]) -> list[str]:
        """``argv`` run in the container's memory cgroup, where there is one."""
        path = self._container_cgroup(c)
        return argv if path is None else MemoryCgroups.wrap(path, argv)

    def _run_once(self, c: Container) -> int | None:
        spawned = self._spawn(c)
        if spawned is None:
            return None
        proc = spawned[0]
        code = proc.wait()
        _kill_group(proc.pid)
        return self._exited(c, code)

    def _wait(self, c: Container, proc: subprocess.Popen[bytes]) -> int:
        """Wait for the container's main process; an OOM kill inside it ends it whole.

        The kubelet sets ``memory.oom.group`` on cgroup v2
        (pkg/kubelet/kuberuntime/kuberuntime_container_linux.go, unless
        ``singleProcessOOMKill``), so the kernel kills every process of the
        container when one passes the limit. cgroup v1 has no such switch and
        kills one process (a Celery pool child, say): here the kubelet ends
        the rest as soon as the cgroup records the kill.
        """
        cgroups, path = self.ctx.cgroups, self._container_cgroup(c)
        if cgroups is None or path is None or cgroups.v2:
            return proc.wait()
        seen = cgroups.oom_kills(path)
        while True:
            try:
                return proc.wait(timeout=0.25)
            except subprocess.TimeoutExpired:
                if cgroups.oom_kills(path) > seen:
                    _kill_group(proc.pid)
                    return proc.wait()

    def _exited(self, c: Container, returncode: int) -> int:
        """Record an exit as the container runtime reports it: 128 + N for signal N.

        The reason is the kubelet's (pkg/kubelet/kuberuntime/helpers.go
        ``toKubeContainerState`` / the CRI's ``Reason``): ``Completed`` for 0,
        ``OOMKilled`` when the kernel killed in the container's memory cgroup,
        ``Error`` otherwise.
        """
        code = 128 - returncode if returncode < 0 else returncode
        c.last_exit = code
        c.last_reason = "Completed" if code == 0 else "Error"
        cgroups, path = self.ctx.cgroups, self._container_cgroup(c)
        oom = cgroups is not None and path is not None and cgroups.oom_killed_since_last(path)
        if oom and code:
            c.last_reason = "OOMKilled"
        return code

    def _supervise(self, c: Container) -> None:
        while not self.deleting.is_set():
            spawned = self._spawn(c)
            if spawned is not None:
                proc, env, cwd, rewrite = spawned
                self._start_probes(c, env, cwd, rewrite)
                code = self._wait(c, proc)
                for worker in c.probes:
                    worker.stop()
                _kill_group(proc.pid)  # the PID namespace ends with its PID 1
                code = self._exited(c, code)
                c.state, c.started, c.ready = "terminated", False, False
                if self.deleting.is_set():
                    return
                self.ctx.log(
                    f"pod {self.name}: container {c.name} exited ({code}, {c.last_reason}); "
                    "restarting"
                )
            c.restarts += 1
            wait = c.backoff.wait_after_exit(time.monotonic())
            if wait:
                c.state = "CrashLoopBackOff"
            self.deleting.wait(wait)

    def _start_probes(
        self, c: Container, env: Mapping[str, str], cwd: str, rewrite: Rewriter
    ) -> None:
        image = image_for(str(c.spec.get("image", "")))

        def exec_argv(command: Sequence[str]) -> list[str]:
            static = expansion.expand_command_static(command, c.spec)
            return self._in_cgroup(c, _local_command(image, static, self.ports, self.ip, rewrite))

        checks = Checks(host=self.ip, port=self.local_port, exec_argv=exec_argv, env=env, cwd=cwd)
        specs = [
            ProbeSpec.from_manifest(kind, c.spec[f"{kind}Probe"])
            for kind in ("startup", "readiness", "liveness")
            if c.spec.get(f"{kind}Probe")
        ]
        has_startup = any(s.kind == "startup" for s in specs)
        has_readiness = any(s.kind == "readiness" for s in specs)
        c.started = not has_startup
        c.ready = c.started and not has_readiness

        def on_result(kind: str, ok: bool, detail: str) -> None:
            if kind == "startup" and ok:
                c.started = True
                c.ready = not has_readiness
            elif kind == "readiness":
                if c.ready != ok:
                    self.ctx.log(
                        f"pod {self.name}: {c.name} {'ready' if ok else 'not ready'} {detail}"
                    )
                c.ready = ok
            elif not ok and not self.deleting.is_set():
                # Liveness or startup failure: kill, then the supervisor restarts
                # it. (Deleting: _terminate stopped these probes; one started in
                # that instant must not kill what is shutting down either.)
                self.ctx.log(f"pod {self.name}: {c.name} failed its {kind} probe: {detail}")
                threading.Thread(
                    target=self._kill_container, args=(c, f"{kind} probe failed"), daemon=True
                ).start()

        c.probes = [
            ProbeWorker(
                spec,
                checks,
                started_at=c.started_at,
                startup_done=lambda: c.started,
                on_result=on_result,
                name=f"probe-{self.name}-{c.name}-{spec.kind}",
            )
            for spec in specs
        ]
        for worker in c.probes:
            worker.start()

    # ------------------------------------------------------------ termination

    def _kill_container(self, c: Container, reason: str, grace_s: float | None = None) -> None:
        """killContainer: preStop, stop signal, SIGKILL after the rest of the grace period."""
        proc = c.proc
        if proc is None or proc.poll() is not None:
            return
        grace_s = self.grace_s if grace_s is None else grace_s
        begin = time.monotonic()
        hook = (c.spec.get("lifecycle") or {}).get("preStop")
        if hook and (c.sidecar or not c.init):
            self._run_hook(c, hook, grace_s)
        remaining = max(grace_s - (time.monotonic() - begin), MIN_GRACE_S)
        stop = (c.spec.get("lifecycle") or {}).get("stopSignal", "SIGTERM")
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, getattr(signal, str(stop), signal.SIGTERM))
        try:
            proc.wait(timeout=remaining)
        except subprocess.TimeoutExpired:
            self.ctx.log(
                f"pod {self.name}: {c.name} still running after the grace period ({reason})"
            )
        _kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)

    def _run_hook(self, c: Container, hook: Mapping[str, Any], budget: float) -> None:
        if "sleep" in hook:
            time.sleep(min(float(hook["sleep"]["seconds"]), budget))
        elif "exec" in hook:
            try:
                _argv, env, cwd, rewrite = self._launch_spec(c)
                image = image_for(str(c.spec.get("image", "")))
                command = expansion.expand_command(hook["exec"]["command"], env)
                local = _local_command(image, command, self.ports, self.ip, rewrite)
                subprocess.run(
                    self._in_cgroup(c, local), env=env, cwd=cwd, timeout=budget,
                    capture_output=True,
                )  # fmt: skip
            except Exception as exc:  # a failed hook is logged; the kill goes on
                self.ctx.log(f"pod {self.name}: {c.name} preStop hook: {exc}")

    def delete(self) -> None:
        """Graceful deletion; returns at once, ``terminated`` is set when done."""
        if self.deleting.is_set():
            return
        with contextlib.ExitStack() as stack:
            for c in [*self.init_containers, *self.containers]:
                stack.enter_context(c.lock)
            self.deleting.set()
        threading.Thread(target=self._terminate, name=f"delete-{self.name}", daemon=True).start()

    def _terminate(self) -> None:
        begin = time.monotonic()
        # Liveness and startup probes stop before any container is killed, so
        # a container busy shutting down is not killed for failing them;
        # readiness probes go on (pkg/kubelet/kubelet.go
        # ``Kubelet.SyncTerminatingPod``: ``probeManager.StopLivenessAndStartup``
        # before ``killPod``).
        for c in [*self.init_containers, *self.containers]:
            for worker in c.probes:
                if worker.spec.kind in ("liveness", "startup"):
                    worker.stop()
        for c in self.init_containers:
            if not c.sidecar and c.proc is not None and c.running():
                _kill_group(c.proc.pid)
        killers = [
            threading.Thread(target=self._kill_container, args=(c, "deleted"), daemon=True)
            for c in self.containers
        ]
        for t in killers:
            t.start()
        for t in killers:
            t.join()
        for c in reversed(self.sidecars):  # after the main containers, last started first
            self._kill_container(c, "deleted", self.grace_s - (time.monotonic() - begin))
        for t in self._threads:
            t.join(timeout=15)
        if self.cgroup is not None and self.ctx.cgroups is not None:
            kill_all(self.cgroup)  # what escaped its process group (a daemonized child)
            self.ctx.cgroups.remove(self.cgroup)
        self.terminated.set()

    def kill(self, container: str | None = None) -> str:
        """SIGKILL one container's process group (an OOM kill); returns its name."""
        targets = [c for c in self.containers if container in (None, c.name)]
        if not targets:
            raise KeyError(f"pod {self.name} has no container {container!r}")
        c = targets[0]
        if c.proc is None or not c.running():
            raise KeyError(f"container {c.name} of pod {self.name} is not running")
        _kill_group(c.proc.pid)
        return c.name


def _local_command(
    image: Image, argv: Sequence[str], ports: Mapping[int, int], ip: str, rewrite: Rewriter
) -> list[str]:
    """A container's command line on this machine.

    Only the container's own arguments are rewritten: the local binaries put
    in front of them (a path under /tmp, say, when the checkout lives there)
    are this machine's, not the container's.
    """
    if not argv:
        return local_argv(image, argv, ports, ip)
    return local_argv(image, [argv[0], *(rewrite(a) for a in argv[1:])], ports, ip)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def template_hash(template: Mapping[str, Any]) -> str:
    """A stable pod-template-hash like label (10 characters)."""
    digest = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
    alphabet = "bcdfghjklmnpqrstvwxz2456789"
    n = int(digest, 16)
    out = []
    for _ in range(10):
        n, r = divmod(n, len(alphabet))
        out.append(alphabet[r])
    return "".join(out)
