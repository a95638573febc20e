"""``python -m labelmill.dev.cluster``: up, down, status, kill, delete, plot.

Exit codes: 0 ok, 1 the request failed (no such pod), 2 bad usage,
3 the cluster is not running or did not answer.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml  # type: ignore[import-untyped]

from labelmill.dev.cluster.node import (
    QuantityError,
    Resources,
    cpu_millis,
    format_bytes,
    machine_memory_available,
    memory_bytes,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SERVICE = 0, 1, 2, 3
DOWN_TIMEOUT_S = 300.0
# A node's CPU is declared, not reserved: on one machine every pod shares its
# cores, so the default only has to let the manifests' requests fit.
DEFAULT_NODE_CPU = "16"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m labelmill.dev.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    up = sub.add_parser("up", help="run k8s/ and keda/ in the foreground")
    up.add_argument("--dir", type=Path, required=True)
    up.add_argument("--time-scale", type=float, default=1.0, help="KEDA/HPA times divided by N")
    up.add_argument("--model-arch", choices=["tiny", "inception_v3"], default="tiny")
    up.add_argument(
        "--node-cpu", default=DEFAULT_NODE_CPU,
        help=f"the node's allocatable CPU, a Kubernetes quantity (default {DEFAULT_NODE_CPU})",
    )  # fmt: skip
    up.add_argument(
        "--node-memory",
        help="the node's allocatable memory, e.g. 8Gi; at most what this machine has "
        "available (default: half of it)",
    )
    up.add_argument("--k8s", type=Path, default=Path("k8s"))
    up.add_argument("--keda", type=Path, default=Path("keda"))
    for name, text in (("down", "stop a running up"), ("status", "replicas, readiness, scalers")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--dir", type=Path, required=True)
        if name == "status":
            p.add_argument("--json", action="store_true")
    kill = sub.add_parser("kill", help="SIGKILL one container's process group")
    kill.add_argument("--dir", type=Path, required=True)
    kill.add_argument("pod")
    kill.add_argument("--container")
    delete = sub.add_parser("delete", help="delete a pod gracefully")
    delete.add_argument("--dir", type=Path, required=True)
    delete.add_argument("pod")
    patch = sub.add_parser(
        "patch",
        help="kubectl patch deployment/NAME -p JSON | --patch-file FILE (a strategic merge patch)",
    )
    patch.add_argument("--dir", type=Path, required=True)
    patch.add_argument("deployment", help="deployment/NAME")
    given = patch.add_mutually_exclusive_group(required=True)
    given.add_argument("-p", "--patch", help="a JSON object")
    given.add_argument("--patch-file", type=Path, help="a file with the patch, YAML or JSON")
    restart = sub.add_parser(
        "restart", help="kubectl rollout restart deployment/NAME: a new template, rolled out"
    )
    restart.add_argument("--dir", type=Path, required=True)
    restart.add_argument("deployment", help="deployment/NAME")
    undo = sub.add_parser("undo", help="kubectl rollout undo deployment/NAME")
    undo.add_argument("--dir", type=Path, required=True)
    undo.add_argument("deployment", help="deployment/NAME")
    plot = sub.add_parser("plot", help="draw DIR/events.jsonl: each tier's pods, outstanding work")
    plot.add_argument("--dir", type=Path, required=True)
    plot.add_argument("--out", type=Path, required=True)
    return parser


def _alive(pid: int) -> bool:
    """``pid`` runs: it exists and is not a zombie waiting for its parent to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: existence is all we can tell
    return stat.rpartition(")")[2].split()[0] != "Z"


def _up_pid(root: Path) -> int | None:
    try:
        pid = int(json.loads((root / "cluster.json").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None
    return pid if _alive(pid) else None


def _node(args: argparse.Namespace) -> Resources | str:
    """The node's allocatable resources, or why the flags cannot be taken."""
    available = machine_memory_available()
    try:
        cpu = cpu_millis(args.node_cpu)
        memory = (
            memory_bytes(args.node_memory)
            if args.node_memory
            else available // 2 // 2**28 * 2**28  # half, in steps of 256Mi
        )
    except QuantityError as exc:
        return f"--node-cpu/--node-memory: {exc}"
    if cpu <= 0 or memory <= 0:
        return "--node-cpu and --node-memory must be > 0"
    if memory > available:
        return (
            f"--node-memory {format_bytes(memory)} is more than this machine has available "
            f"({format_bytes(available)}); a node may not promise memory it cannot give"
        )
    return Resources(cpu, memory)


def _up(args: argparse.Namespace) -> int:
    from labelmill.dev.cluster.runtime import Cluster, ClusterError

    if args.time_scale <= 0:
        print("cluster: error: --time-scale must be > 0", file=sys.stderr)
        return EXIT_USAGE
    node = _node(args)
    if isinstance(node, str):
        print(f"cluster: error: {node}", file=sys.stderr)
        return EXIT_USAGE
    for path in (args.k8s, args.keda):
        if not path.is_dir():
            print(f"cluster: error: {path} is not a folder", file=sys.stderr)
            return EXIT_USAGE
    pid = _up_pid(args.dir)
    if pid is not None and pid != os.getpid():
        print(f"cluster: error: already running in {args.dir} (pid {pid})", file=sys.stderr)
        return EXIT_USAGE
    cluster = Cluster(
        args.dir, k8s=args.k8s, keda=args.keda, time_scale=args.time_scale,
        model_arch=args.model_arch, node=node,
    )  # fmt: skip

    def stop(*_: object) -> None:
        cluster.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return cluster.up()
    except ClusterError as exc:
        print(f"cluster: error: {exc}", file=sys.stderr)
        return EXIT_SERVICE


def _down(root: Path) -> int:
    pid = _up_pid(root)
    if pid is None:
        print(f"no cluster running in {root}")
        return EXIT_OK
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DOWN_TIMEOUT_S
    while _alive(pid):
        if time.monotonic() > deadline:
            print(
                f"cluster: error: pid {pid} still running after {DOWN_TIMEOUT_S:g}s",
                file=sys.stderr,
            )
            return EXIT_SERVICE
        time.sleep(0.2)
    print("cluster stopped")
    return EXIT_OK


def _pod_line(pod: dict[str, Any]) -> str:
    """One row of ``kubectl get pods -o wide``: name, phase, ready, restarts, IP, last exit."""
    containers = [c for c in pod["containers"].values() if not c["init"] or c.get("sidecar")]
    ready = sum(1 for c in containers if c["ready"])
    exits = [
        f"{name} {c['last_reason']} ({c['last_exit']})"
        for name, c in pod["containers"].items()
        if c.get("last_reason") and not (c["init"] and c["last_exit"] == 0)
    ]
    line = (
        f"  {pod['name']:<34} {pod['phase']:<12} {ready}/{len(containers)} ready  "
        f"restarts {pod['restarts']:<3} {pod.get('ip') or '-':<15} "
        f"last exit: {', '.join(exits) or '-'}"
    )
    return f"{line}  ({pod['reason']})" if pod.get("reason") else line


def _status(root: Path, as_json: bool) -> int:
    path = root / "status.json"
    if _up_pid(root) is None or not path.exists():
        print(f"cluster: error: no cluster running in {root}", file=sys.stderr)
        return EXIT_SERVICE
    status: dict[str, Any] = json.loads(path.read_text())
    if as_json:
        print(json.dumps(status, sort_keys=True))
        return EXIT_OK
    node = status["node"]
    have, asked = node["allocatable"], node["requested"]
    print(
        f"node {node['name']}: requested cpu {asked['cpu_m'] / 1000:g} "
        f"of {have['cpu_m'] / 1000:g}, "
        f"memory {format_bytes(asked['memory'])} of {format_bytes(have['memory'])}"
        + (f"; memory cgroup {node['memory_cgroup']}" if node["memory_cgroup"] else "")
    )
    for name, d in status["deployments"].items():
        pending = f", {d['pending']} pending" if d["pending"] else ""
        print(f"{d['kind'].lower()}/{name}: {d['ready']}/{d['replicas']} ready{pending}")
        for pod in d["pods"]:
            print(_pod_line(pod))
    for name, s in status["scaledobjects"].items():
        print(
            f"scaledobject/{name}: metric {s.get('metric')} active {s.get('active')} "
            f"desired {s.get('desired')}"
        )
    print(f"outstanding batches: {status['outstanding']}")
    return EXIT_OK


def _ask(root: Path, body: dict[str, Any]) -> int:
    from labelmill.dev.cluster.runtime import ClusterError, request

    if _up_pid(root) is None:
        print(f"cluster: error: no cluster running in {root}", file=sys.stderr)
        return EXIT_SERVICE
    try:
        answer = request(root, body)
    except ClusterError as exc:
        print(f"cluster: error: {exc}", file=sys.stderr)
        return EXIT_SERVICE
    if not answer.get("ok"):
        print(f"cluster: error: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(answer, sort_keys=True))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "up":
        return _up(args)
    if args.command == "down":
        return _down(args.dir)
    if args.command == "status":
        return _status(args.dir, args.json)
    if args.command == "kill":
        return _ask(args.dir, {"op": "kill", "pod": args.pod, "container": args.container})
    if args.command == "delete":
        return _ask(args.dir, {"op": "delete", "pod": args.pod})
    if args.command in ("patch", "restart", "undo"):
        kind, _, name = args.deployment.partition("/")
        if kind not in ("deployment", "deployments", "deploy") or not name:
            print("cluster: error: name a Deployment as deployment/NAME", file=sys.stderr)
            return EXIT_USAGE
        if args.command == "undo":
            return _ask(args.dir, {"op": "undo", "deployment": name})
        if args.command == "restart":
            # What kubectl rollout restart patches
            # (kubectl/pkg/polymorphichelpers/objectrestarter.go).
            stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            body: Any = {"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": stamp}}}}}  # fmt: skip
        elif args.patch_file is not None:
            try:
                body = yaml.safe_load(args.patch_file.read_text())  # JSON is YAML too
            except (OSError, yaml.YAMLError) as exc:
                print(f"cluster: error: --patch-file: {exc}", file=sys.stderr)
                return EXIT_USAGE
        else:
            try:
                body = json.loads(args.patch)
            except json.JSONDecodeError as exc:
                print(f"cluster: error: -p is not JSON: {exc}", file=sys.stderr)
                return EXIT_USAGE
        return _ask(args.dir, {"op": "patch", "deployment": name, "patch": body})
    from labelmill.dev.cluster.plot import NoEvents, plot

    try:
        plot(args.dir / "events.jsonl", args.out)
    except NoEvents as exc:
        print(f"cluster: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {args.out}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
