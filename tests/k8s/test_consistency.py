"""The manifests name what the code uses: queue, ledger key, ports, settings."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import redis
import yaml

from labelmill.job import Ledger
from labelmill.queue import QUEUE, make_celery
from labelmill.settings import Settings
from tests.k8s.conftest import ROOT, all_documents, find
from workers.signals import HEARTBEAT_FILE

# Variables that are neither labelmill settings nor the AWS SDK's, and why.
OTHER_ENV = {
    "REDIS_PASSWORD": "interpolated into LABELMILL_REDIS_URL; read by redis-server's args",
    "REDISCLI_AUTH": "redis-cli's password variable (Redis probes)",
    "PROMETHEUS_MULTIPROC_DIR": "prometheus_client's multiprocess folder",
    "REMAP_SIGTERM": "Celery: SIGTERM starts the soft shutdown",
    "FLOWER_BASIC_AUTH": "Flower's --basic-auth option",
    "HOME": "a writable home on a read-only root filesystem",
}
AWS_SDK_ENV = {"AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"}


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def workloads() -> list[tuple[Path, dict[str, Any]]]:
    kinds = {"Deployment", "StatefulSet", "Job"}
    return [(p, d) for p, d in all_documents() if d["kind"] in kinds]


def test_env_vars_are_settings_or_sdk_variables() -> None:
    fields = {f"LABELMILL_{name.upper()}" for name in Settings.model_fields}
    for path, doc in workloads():
        for c in containers(doc):
            command = " ".join([*c.get("command", []), *c.get("args", [])])
            for env in c.get("env", []):
                name = env["name"]
                ok = name in fields or name in AWS_SDK_ENV or name in OTHER_ENV
                ok = ok or f"$({name})" in command  # the kubelet expands it there
                assert ok, f"{path.name}: {c['name']} sets {name}, which nothing reads"


def test_settings_values_in_manifests_parse(monkeypatch: Any) -> None:
    worker = find("Deployment", "workers")["spec"]["template"]["spec"]["containers"][0]
    for env in worker["env"]:
        if env["name"].startswith("LABELMILL_") and "value" in env:
            monkeypatch.setenv(env["name"], env["value"].replace("$(REDIS_PASSWORD)", "pw"))
    s = Settings()
    assert s.allow_local_files is False
    assert s.metrics_port == 9100
    assert s.model_server == "dns:///tf-serving.labelmill.svc.cluster.local:8500"
    assert s.redis_url.startswith("redis://:pw@redis.labelmill.svc.cluster.local:6379/")


def test_worker_consumes_the_queue_the_producer_sends_to() -> None:
    cmd = find("Deployment", "workers")["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:4] == ["celery", "-A", "workers", "worker"]
    assert cmd[cmd.index("-Q") + 1] == QUEUE
    assert "--prefetch-multiplier=1" in cmd


def container(deployment: str, name: str) -> dict[str, Any]:
    """A container of a Deployment's pod, native sidecars (init containers) included."""
    return next(c for c in containers(find("Deployment", deployment)) if c["name"] == name)


def test_scalers_read_the_ledgers_keys() -> None:
    key = Ledger(redis.Redis(), prefix=Settings().key_prefix).outstanding_key  # no I/O
    for name in ("workers", "tf-serving"):
        so = find("ScaledObject", name)
        assert so["spec"]["scaleTargetRef"]["name"] == name
        (trigger,) = so["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == key
        assert trigger["metadata"]["address"] == "redis.labelmill.svc.cluster.local:6379"
        assert trigger["authenticationRef"]["name"] == "labelmill-redis"


def _port(url: str) -> int:
    m = re.search(r":(\d+)(/|$)", url.rsplit("@", 1)[-1])
    assert m, url
    return int(m.group(1))


def test_ports_agree() -> None:
    defaults = Settings()
    redis_port = _port(defaults.redis_url)
    model_port = _port(defaults.model_server)
    redis_svc = find("Service", "redis")["spec"]["ports"][0]
    assert redis_svc["port"] == redis_port
    tfs = find("Service", "tf-serving")
    assert tfs["spec"]["clusterIP"] == "None", "headless, for client-side round robin"
    assert {p["name"]: p["port"] for p in tfs["spec"]["ports"]}["grpc"] == model_port
    args = container("tf-serving", "tf-serving")["args"]
    assert f"--port={model_port}" in args
    worker = find("Deployment", "workers")["spec"]["template"]["spec"]["containers"][0]
    metrics_port = int(
        next(e["value"] for e in worker["env"] if e["name"] == "LABELMILL_METRICS_PORT")
    )
    assert worker["ports"][0]["containerPort"] == metrics_port
    assert worker["ports"][0]["name"] == "metrics"


def test_tf_serving_args_and_probes() -> None:
    pod = find("Deployment", "tf-serving")["spec"]["template"]["spec"]
    args = container("tf-serving", "tf-serving")["args"]
    for flag in (
        "--enable_batching",
        "--enable_grpc_healthcheck_service",
        "--model_config_file=/config/models.config",
        "--batching_parameters_file=/config/batching.config",
        "--monitoring_config_file=/config/monitoring.config",
    ):
        assert flag in args
    assert any(a.startswith("--grpc_channel_arguments=grpc.max_connection_age_ms=") for a in args)
    assert container("tf-serving", "tf-serving")["readinessProbe"]["grpc"]["port"] == 8500
    assert pod["initContainers"][0]["image"] == pod_image("workers")
    sync = container("tf-serving", "model-sync")
    assert sync["image"] == pod_image("workers")
    # A native sidecar: runs beside tf-serving, after the first pull.
    assert sync["restartPolicy"] == "Always"
    assert pod["initContainers"].index(sync) > 0


def pod_image(deployment: str) -> str:
    return str(find("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]["image"])


def test_serving_configmap_is_serving_config_verbatim() -> None:
    data = find("ConfigMap", "tf-serving-config")["data"]
    files = {p.name: p.read_text() for p in (ROOT / "serving" / "config").glob("*.config")}
    assert data == files


def test_tf_serving_accepts_the_manifests_command_line(tmp_path: Path) -> None:
    """The container's args and the ConfigMap's files, checked by TF Serving's rules."""
    from serving.tfs import parse_command_line

    tfs = container("tf-serving", "tf-serving")
    assert tfs["command"] == ["tensorflow_model_server"]
    mount = next(m["mountPath"] for m in tfs["volumeMounts"] if m["name"] == "config")
    for name, text in find("ConfigMap", "tf-serving-config")["data"].items():
        (tmp_path / name).write_text(text)
    args = [a.replace(f"{mount}/", f"{tmp_path}/") for a in tfs["args"]]
    options = parse_command_line(args)
    assert not options.unknown, options.unknown
    assert options.batching is not None
    # Workers' batches must fit in one request TF Serving accepts.
    assert Settings().batch_size <= options.batching.max_batch_size
    assert options.health_service
    assert (
        options.prometheus_path
        == find("Deployment", "tf-serving")["spec"]["template"]["metadata"]["annotations"][
            "prometheus.io/path"
        ]
    )
    assert dict(options.channel_arguments)["grpc.max_connection_age_ms"] > 0


def test_models_config_keeps_two_versions_at_the_mounted_path() -> None:
    text = (ROOT / "serving" / "config" / "models.config").read_text()
    assert 'name: "inception"' in text and 'base_path: "/models/inception"' in text
    assert re.search(r"num_versions:\s*2", text)
    init = find("Deployment", "tf-serving")["spec"]["template"]["spec"]["initContainers"][0]
    assert "/models/inception" in init["command"] and "--keep=2" in init["command"]


def test_probes_use_the_heartbeat_the_signals_write() -> None:
    worker = find("Deployment", "workers")["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        cmd = worker[probe]["exec"]["command"]
        assert cmd[:3] == ["python", "-m", "workers.signals"]
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert str(HEARTBEAT_FILE.parent) in mounts


def test_grace_period_covers_the_soft_shutdown() -> None:
    soft = make_celery(Settings()).conf.worker_soft_shutdown_timeout
    pod = find("Deployment", "workers")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["REMAP_SIGTERM"] == "SIGQUIT", "SIGTERM must start the soft shutdown"
    assert pod["terminationGracePeriodSeconds"] >= soft + 20


def test_pods_are_locked_down() -> None:
    for path, doc in workloads():
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, path
        assert spec["automountServiceAccountToken"] is False, path
        for c in containers(doc):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (path, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (path, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"], (path, c["name"])
            assert {"requests", "limits"} <= set(c["resources"]), (path, c["name"])


def test_redis_config() -> None:
    conf = find("ConfigMap", "redis-config")["data"]["redis.conf"]
    assert re.search(r"^appendonly yes$", conf, re.M)
    assert re.search(r"^appendfsync everysec$", conf, re.M)
    assert re.search(r"^maxmemory-policy noeviction$", conf, re.M)


def test_secret_templates_are_not_applied_by_default() -> None:
    top = [d for p in (ROOT / "k8s").glob("*.yaml") for d in yaml.safe_load_all(p.read_text())]
    assert not [d for d in top if d and d["kind"] in {"Secret", "Job"}]
