"""The local cluster (labelmill.dev.cluster): kubelet and controller rules, and k8s/ + keda/ run."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from labelmill.dev.cluster.controllers import deletion_order
from labelmill.dev.cluster.expansion import (
    EnvError,
    expand,
    expand_command,
    expand_command_static,
    make_environment,
    mapping_for,
    service_env,
)
from labelmill.dev.cluster.kubelet import Backoff
from labelmill.dev.cluster.substitutions import MODELS_BUCKET, Rewriter, image_for, local_argv

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "labelmill.dev.cluster"]

# ------------------------------------------------------------------ $(VAR) expansion


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(A)", "x"),
        ("pre-$(A)-post", "pre-x-post"),
        ("$$(A)", "$(A)"),  # escaped
        ("$$$(A)", "$x"),
        ("$(MISSING)", "$(MISSING)"),  # undefined: verbatim
        ("$(A", "$(A"),  # unclosed: verbatim
        ("$A", "$A"),
        ("a$", "a$"),
        ("$$", "$"),
        ("$()", ""),  # the empty name is looked up like any other: undefined
    ],
)
def test_expand_follows_the_kubelet(text: str, expected: str) -> None:
    mapping = mapping_for({"A": "x", "": ""})
    assert expand(text, mapping) == expected


def test_env_sees_only_earlier_variables_and_command_sees_all() -> None:
    container = {
        "env": [
            {"name": "URL", "value": "redis://:$(PW)@redis:6379/0"},  # PW not defined yet
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
            {"name": "URL2", "value": "redis://:$(PW)@redis:6379/0"},
        ],
    }
    env = make_environment(
        container, {"metadata": {"name": "p"}}, secrets={"s": {"pw": "hex"}},
        config_maps={}, service_env={},
    )  # fmt: skip
    assert env["URL"] == "redis://:$(PW)@redis:6379/0"
    assert env["URL2"] == "redis://:hex@redis:6379/0"
    assert expand_command(["--requirepass", "$(PW)", "$$(PW)"], env) == [
        "--requirepass",
        "hex",
        "$(PW)",
    ]


def test_an_exec_probe_sees_only_the_env_entries_as_written() -> None:
    container = {
        "envFrom": [{"configMapRef": {"name": "c"}}],
        "env": [
            {"name": "A", "value": "x"},
            {"name": "B", "value": "$(A)-y"},  # as written: not expanded
            {"name": "EMPTY", "value": ""},
            {"name": "PW", "valueFrom": {"secretKeyRef": {"name": "s", "key": "pw"}}},
        ],
    }
    argv = ["$(A)", "$(B)", "[$(EMPTY)]", "[$(PW)]", "$(FROM_CM)"]
    assert expand_command_static(argv, container) == ["x", "$(A)-y", "[]", "[]", "$(FROM_CM)"]


def test_env_value_from_sources_and_optional() -> None:
    container = {
        "env": [
            {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {"name": "CM", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}},
            {
                "name": "GONE",
                "valueFrom": {"secretKeyRef": {"name": "nope", "key": "k", "optional": True}},
            },
            {
                "name": "NOKEY",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "other", "optional": True}},
            },
        ],
        "envFrom": [{"configMapRef": {"name": "c"}, "prefix": "C_"}],
    }
    pod = {"metadata": {"name": "w-1", "namespace": "labelmill"}, "status": {"podIP": "127.0.0.1"}}
    env = make_environment(
        container, pod, secrets={"s": {"k": "v"}}, config_maps={"c": {"k": "cm"}},
        service_env={"REDIS_SERVICE_HOST": "127.0.0.1", "NS": "overridden"},
    )  # fmt: skip
    assert env["NAME"] == "w-1" and env["NS"] == "labelmill" and env["IP"] == "127.0.0.1"
    assert env["CM"] == "cm" and env["C_k"] == "cm"
    assert "GONE" not in env and "NOKEY" not in env
    assert env["REDIS_SERVICE_HOST"] == "127.0.0.1"  # Service variables come last


def test_a_missing_required_secret_is_a_config_error() -> None:
    container = {"env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}
    with pytest.raises(EnvError, match='secret "s" not found'):
        make_environment(container, {}, secrets={}, config_maps={}, service_env={})


def test_service_links_match_the_kubelet() -> None:
    env = service_env([("flower", "127.0.0.1", [("http", 5555)])])
    assert env["FLOWER_SERVICE_HOST"] == "127.0.0.1"
    assert env["FLOWER_SERVICE_PORT"] == "5555"
    assert env["FLOWER_SERVICE_PORT_HTTP"] == "5555"
    assert env["FLOWER_PORT"] == "tcp://127.0.0.1:5555"
    assert env["FLOWER_PORT_5555_TCP_ADDR"] == "127.0.0.1"


# ------------------------------------------------------------------ substitution


def _rewriter() -> Rewriter:
    return (
        Rewriter()
        .dns_targets([("tf-serving", "labelmill")], "127.0.0.1:5353")
        .services({("redis", "labelmill", 6379): ("127.0.0.1", 41000),
                   ("tf-serving", "labelmill", 8500): ("127.0.0.1", 42000)})
        .literals({"REPLACE-models-bucket": MODELS_BUCKET})
        .mounts({"/tmp": "/pods/p/volumes/tmp", "/models": "/pods/p/volumes/models",
                 "/data": "/pvc/data-redis-0"})
        .ports({8500: 50001, 9100: 50002, 6379: 50003})
    )  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://:pw@redis.labelmill.svc.cluster.local:6379/0", "redis://:pw@127.0.0.1:41000/0"),
        ("redis:6379", "127.0.0.1:41000"),
        ("redis.labelmill:6379", "127.0.0.1:41000"),
        ("redis.labelmill.svc:6379", "127.0.0.1:41000"),
        # A headless Service's gRPC target asks the cluster's DNS, name and port kept:
        (
            "dns:///tf-serving.labelmill.svc.cluster.local:8500",
            "dns://127.0.0.1:5353/tf-serving.labelmill.svc.cluster.local:8500",
        ),
        (
            "dns:///tf-serving:8500",
            "dns://127.0.0.1:5353/tf-serving.labelmill.svc.cluster.local:8500",
        ),
        # ... any other reference to it goes through its proxy:
        ("tf-serving.labelmill:8500", "127.0.0.1:42000"),
        ("--port=8500", "--port=50001"),
        ("9100", "50002"),
        ("port 6379\ndir /data\n", "port 50003\ndir /pvc/data-redis-0\n"),
        ("/tmp/prometheus", "/pods/p/volumes/tmp/prometheus"),
        ("/tmp", "/pods/p/volumes/tmp"),
        ('base_path: "/models/inception"', 'base_path: "/pods/p/volumes/models/inception"'),
        (
            "s3://REPLACE-models-bucket/models/inception",
            f"s3://{MODELS_BUCKET}/models/inception",
        ),
        # Not ports, not mounts:
        ("grpc.max_connection_age_ms=30000", "grpc.max_connection_age_ms=30000"),
        ("/tmpfoo /var/tmp 1.8500 85000 redis:7.4.2", "/tmpfoo /var/tmp 1.8500 85000 redis:7.4.2"),
        # Not the Service (another host), but the pod's own declared port number:
        ("otherredis:6379", "otherredis:50003"),
    ],
)
def test_rewrite(text: str, expected: str) -> None:
    assert _rewriter()(text) == expected


def test_replaced_text_is_not_rescanned() -> None:
    # The local folder contains a number equal to a declared port.
    rewrite = Rewriter().mounts({"/tmp": "/x/8500"}).ports({8500: 1})
    assert rewrite("/tmp/a --port=8500") == "/x/8500/a --port=1"


def test_images_map_to_local_commands() -> None:
    worker = image_for("registry.example.com/labelmill/worker:0.1.0")
    ip = "127.9.0.3"
    assert local_argv(worker, ["python", "-m", "x"], {}, ip)[0] == sys.executable
    assert local_argv(worker, ["celery", "-A", "workers"], {}, ip)[0].endswith("/celery")
    serving = image_for("tensorflow/serving:2.19.0")
    argv = local_argv(serving, ["tensorflow_model_server", "--port=8500"], {}, ip)
    assert argv[1:] == ["local", f"--host={ip}", "--port=8500"]
    redis_image = image_for("redis:7.4.2-bookworm")
    assert local_argv(redis_image, ["redis-cli", "ping"], {6379: 4242}, ip) == [
        "redis-cli", "-h", ip, "-p", "4242", "ping",
    ]  # fmt: skip
    assert local_argv(redis_image, ["redis-server", "/c"], {}, ip)[-2:] == ["--bind", ip]


# ------------------------------------------------------------------ kubelet and controllers


def test_restart_backoff_is_the_kubelets() -> None:
    b = Backoff()
    t = 0.0
    waits = []
    for _ in range(8):
        w = b.wait_after_exit(t)
        waits.append(w)
        t += w + 1  # crashes one second after each restart
    assert waits == [0, 10, 20, 40, 80, 160, 300, 300]
    assert b.wait_after_exit(t + 601 + 300) == 0  # reset after 2 x the cap without a crash


@dataclass
class FakePod:
    name: str
    phase: str = "Running"
    ready: bool = True
    ready_since: float | None = 0.0
    restarts: int = 0
    created: float = 0.0
    uid: str = ""
    deletion_cost: int = 0

    def is_ready(self) -> bool:
        return self.ready


def test_scale_down_victims_follow_the_replicaset_ranking() -> None:
    now = 10_000.0
    pods = [
        FakePod("old-ready", created=now - 5000, ready_since=now - 4900, uid="a"),
        FakePod("new-ready", created=now - 100, ready_since=now - 50, uid="b"),
        FakePod("unready", ready=False, ready_since=None, created=now - 6000, uid="c"),
        FakePod("pending", phase="Pending", ready=False, ready_since=None, created=now - 7000),
        FakePod("costly", created=now - 10, ready_since=now - 5, deletion_cost=100, uid="d"),
        FakePod("crashy", created=now - 5000, ready_since=now - 4900, restarts=3, uid="e"),
    ]
    order = [p.name for p in deletion_order(pods, now)]  # type: ignore[arg-type]
    assert order[:3] == ["pending", "unready", "new-ready"]
    assert order[-1] == "costly"
    assert order.index("crashy") < order.index("old-ready")


# ------------------------------------------------------------------ CLI usage


def test_bad_usage_is_one_line_and_exit_2() -> None:
    res = subprocess.run([*CLI, "up"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and "--dir" in res.stderr


def test_kill_without_a_cluster_exits_3(tmp_path: Path) -> None:
    res = subprocess.run(
        [*CLI, "kill", "--dir", str(tmp_path), "workers-x"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert res.returncode == 3


def test_only_the_containers_own_arguments_are_rewritten() -> None:
    """A checkout under /tmp keeps its binaries' paths; the container's /tmp moves."""
    from labelmill.dev.cluster.kubelet import _local_command
    from labelmill.dev.cluster.substitutions import Image

    image = Image("worker:*", binaries={"celery": ["/tmp/clone/.venv/bin/celery"]})
    rewrite = Rewriter().mounts({"/tmp": "/pods/p/volumes/tmp"})
    argv = _local_command(image, ["celery", "--logfile=/tmp/w.log"], {}, "127.9.0.3", rewrite)
    assert argv == ["/tmp/clone/.venv/bin/celery", "--logfile=/pods/p/volumes/tmp/w.log"]
