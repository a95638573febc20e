"""Container probes, as the kubelet's prober runs them.

pkg/kubelet/prober/worker.go (``run``, ``doProbe``): one worker per probe
and container; the first probe runs at once, then every ``periodSeconds``;
nothing is probed before ``initialDelaySeconds`` have passed since the
container started; readiness and liveness wait until the startup probe has
succeeded, and the startup probe stops once it has. A result takes effect
after ``successThreshold`` (readiness; 1 for the others) or
``failureThreshold`` equal results in a row. The initial results
(``newWorker``): readiness failure, liveness success, startup unknown. A
liveness or startup failure kills the container (``onHold`` until it
restarts). Defaults (pkg/apis/core/v1/defaults.go ``SetDefaults_Probe``):
period 10 s, timeout 1 s, success 1, failure 3.

The checks themselves: pkg/probe/exec (exit 0 succeeds, the timeout is
enforced), pkg/probe/tcp (a connection opens), pkg/probe/grpc
(``grpc.health.v1.Health/Check`` answers SERVING), pkg/probe/http (a status
from 200 to 399).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ProbeSpec:
    kind: str  # startup, readiness, liveness
    handler: Mapping[str, Any]
    period_s: float
    timeout_s: float
    success_threshold: int
    failure_threshold: int
    initial_delay_s: float

    @classmethod
    def from_manifest(cls, kind: str, doc: Mapping[str, Any]) -> ProbeSpec:
        handler = {k: v for k, v in doc.items() if k in ("exec", "tcpSocket", "grpc", "httpGet")}
        return cls(
            kind=kind,
            handler=handler,
            period_s=float(doc.get("periodSeconds", 10)),
            timeout_s=float(doc.get("timeoutSeconds", 1)),
            success_threshold=int(doc.get("successThreshold", 1)),
            failure_threshold=int(doc.get("failureThreshold", 3)),
            initial_delay_s=float(doc.get("initialDelaySeconds", 0)),
        )


class Checks:
    """The probe handlers, given how to resolve ports and exec commands."""

    def __init__(
        self,
        *,
        host: str,
        port: Callable[[int | str], int],
        exec_argv: Callable[[Sequence[str]], list[str]],
        env: Mapping[str, str],
        cwd: str,
    ) -> None:
        self._host = host
        self._port = port
        self._exec_argv = exec_argv
        self._env = dict(env)
        self._cwd = cwd

    def run(self, handler: Mapping[str, Any], timeout_s: float) -> tuple[bool, str]:
        try:
            if "exec" in handler:
                return self._exec(handler["exec"]["command"], timeout_s)
            if "tcpSocket" in handler:
                port = self._port(handler["tcpSocket"]["port"])
                with socket.create_connection((self._host, port), timeout=timeout_s):
                    return True, ""
            if "grpc" in handler:
                return self._grpc(handler["grpc"], timeout_s)
            if "httpGet" in handler:
                return self._http(handler["httpGet"], timeout_s)
        except OSError as exc:
            return False, str(exc)
        return False, f"unsupported probe {sorted(handler)}"

    def _exec(self, command: Sequence[str], timeout_s: float) -> tuple[bool, str]:
        proc = subprocess.Popen(
            self._exec_argv(command),
            env=self._env,
            cwd=self._cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return False, f"command timed out after {timeout_s:g}s"
        return proc.returncode == 0, out.decode(errors="replace").strip()[-300:]

    def _grpc(self, spec: Mapping[str, Any], timeout_s: float) -> tuple[bool, str]:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        target = f"{self._host}:{self._port(spec['port'])}"
        with grpc.insecure_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(
                    health_pb2.HealthCheckRequest(service=spec.get("service", "")),
                    timeout=timeout_s,
                )
            except grpc.RpcError as exc:
                return False, f"{exc.code().name}: {exc.details()}"
        ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        return ok, "" if ok else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _http(self, spec: Mapping[str, Any], timeout_s: float) -> tuple[bool, str]:
        scheme = str(spec.get("scheme", "HTTP")).lower()
        url = f"{scheme}://{self._host}:{self._port(spec['port'])}{spec.get('path', '/')}"
        request = urllib.request.Request(url)
        for header in spec.get("httpHeaders") or []:
            request.add_header(header["name"], header["value"])
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                code = reply.status
        except urllib.error.HTTPError as exc:
            code = exc.code
        return 200 <= code < 400, f"HTTP {code}"


class ProbeWorker(threading.Thread):
    """One probe of one container run; ``stop()`` when the container ends."""

    def __init__(
        self,
        spec: ProbeSpec,
        checks: Checks,
        *,
        started_at: float,
        startup_done: Callable[[], bool],
        on_result: Callable[[str, bool, str], None],
        name: str,
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.spec = spec
        self._checks = checks
        self._started_at = started_at
        self._startup_done = startup_done
        self._on_result = on_result
        self._stop_event = threading.Event()
        self._last: bool | None = None
        self._run_length = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        while not self._stop_event.is_set():
            if not self._do_probe():
                return
            self._stop_event.wait(self.spec.period_s)

    def _do_probe(self) -> bool:
        """One tick; False ends the worker."""
        spec = self.spec
        if spec.kind == "startup" and self._startup_done():
            return False
        if spec.kind != "startup" and not self._startup_done():
            return True
        if time.monotonic() - self._started_at < spec.initial_delay_s:
            return True
        ok, detail = self._checks.run(spec.handler, spec.timeout_s)
        if self._stop_event.is_set():
            return False
        if ok == self._last:
            self._run_length += 1
        else:
            self._last, self._run_length = ok, 1
        success_threshold = spec.success_threshold if spec.kind == "readiness" else 1
        if (not ok and self._run_length < spec.failure_threshold) or (
            ok and self._run_length < success_threshold
        ):
            return True
        self._on_result(spec.kind, ok, detail)
        # Liveness and startup failures kill the container: hold until it restarts.
        return ok or spec.kind == "readiness"
