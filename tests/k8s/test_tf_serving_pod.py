"""The tf-serving container of k8s/31-tf-serving.yaml, run as the manifest writes it.

The container's own ``args`` and the files of its ConfigMap go to ``serving
local``, which applies TF Serving's rules to them. Only what a pod gets from
its node is substituted: each volume's mount path becomes a folder of the
test, and the two ports become free ones. The model is exported where the
model config points, as the pod's init container would have copied it.
"""

from __future__ import annotations

import re
import shutil
import sys
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from labelmill.dev.cluster.expansion import expand_command
from labelmill.dev.cluster.manifests import strategic_merge
from labelmill.hardware import bf16_instructions
from labelmill.model_client import ModelClient
from labelmill.settings import Settings
from tests.fixtures.model_server import SERVING, health_status, onednn_convolutions, serving_env
from tests.fixtures.procs import Proc, free_port
from tests.k8s.conftest import PATCHES, find

pytestmark = pytest.mark.integration


def tf_serving_pod(patch: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The tf-serving container and its pod spec (after ``patch``, a strategic merge patch)."""
    deployment = find("Deployment", "tf-serving")
    if patch is not None:
        deployment = strategic_merge(deployment, patch)
    pod = deployment["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "tf-serving"), pod


def container_args(container: dict[str, Any]) -> list[str]:
    """The container's args as the kubelet passes them: ``$(VAR)`` from its own ``env``."""
    env = {v["name"]: str(v.get("value", "")) for v in container.get("env") or []}
    assert all("valueFrom" not in v for v in container.get("env") or [])
    return expand_command(container["args"], env)


def lay_out_pod(
    tmp_path: Path, config_files: dict[str, str], patch: dict[str, Any] | None = None
) -> tuple[list[str], dict[str, Path]]:
    """The container's args with its mounts under ``tmp_path``; config files written.

    ``patch``: a strategic merge patch of the Deployment, applied first.
    """
    container, pod = tf_serving_pod(patch)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in container["volumeMounts"]:
        folder = tmp_path / mount["name"]
        folder.mkdir()
        mounts[mount["mountPath"]] = folder
        source = volumes[mount["name"]]
        if "configMap" in source:
            assert source["configMap"]["name"] == "tf-serving-config"
            for name, text in config_files.items():
                (folder / name).write_text(text)

    # One pass, longest mount path first: a path after `=` or `"` that starts
    # with a mount path (a whole path segment) moves under that mount's folder.
    pattern = re.compile(
        r"(?<=[=\"])("
        + "|".join(re.escape(p) for p in sorted(mounts, key=len, reverse=True))
        + r")(?=/|\"|$)"
    )

    def local(text: str) -> str:
        return pattern.sub(lambda m: str(mounts[m.group(1)]), text)

    # The model config names its base path inside the pod: map it too.
    for folder in mounts.values():
        for file in folder.glob("*.config"):
            file.write_text(local(file.read_text()))
    ports = {"--port": free_port(), "--rest_api_port": free_port()}
    args = []
    for arg in container_args(container):
        flag = arg.split("=", 1)[0]
        args.append(f"{flag}={ports[flag]}" if flag in ports else local(arg))
    return args, mounts


def model_base(args: list[str]) -> Path:
    from serving.tfs import parse_command_line

    (model,) = parse_command_line(args).models
    return Path(model.base_path)


def flag(args: list[str], name: str) -> str:
    return next(a.split("=", 1)[1] for a in args if a.startswith(f"--{name}="))


def configmap_files() -> dict[str, str]:
    return dict(find("ConfigMap", "tf-serving-config")["data"])


def test_the_manifests_tf_serving_command_serves_and_classifies(
    tiny_model_base: Path, tmp_path: Path
) -> None:
    args, _ = lay_out_pod(tmp_path, configmap_files())
    shutil.copytree(tiny_model_base, model_base(args), dirs_exist_ok=True)
    log = tmp_path / "tf-serving.log"
    proc = Proc([sys.executable, "-m", "serving", "local", *args], log=log, env=serving_env())
    target = f"127.0.0.1:{flag(args, 'port')}"
    try:
        proc.wait_ready(
            lambda: health_status(target) == SERVING, timeout=180, what="the pod's model server"
        )
        batch = Settings().batch_size
        pixels = np.random.default_rng(0).integers(0, 256, (batch, 299, 299, 3), dtype=np.uint8)
        with ModelClient(target) as client:
            result = client.predict(pixels)
        assert result.version == 1
        assert len(result.classes) == batch
        # The metrics path the pod's scrape annotation names is served.
        annotations = find("Deployment", "tf-serving")["spec"]["template"]["metadata"][
            "annotations"
        ]
        port, path = annotations["prometheus.io/port"], annotations["prometheus.io/path"]
        assert port == flag(tf_serving_pod()[0]["args"], "rest_api_port")
        url = f"http://127.0.0.1:{flag(args, 'rest_api_port')}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert 'status="OK"} 1' in response.read().decode()
    finally:
        proc.stop()
    text = log.read_text()
    assert "unknown argument" not in text, "the manifest passes a flag TF Serving does not know"
    assert "Traceback" not in text


def test_the_old_batching_config_fails_as_tf_serving_fails(
    tiny_model_base: Path, tmp_path: Path
) -> None:
    files = configmap_files()
    files["batching.config"] = (
        "max_batch_size { value: 256 }\nbatch_timeout_micros { value: 5000 }\n"
        "max_enqueued_batches { value: 16 }\nnum_batch_threads { value: 2 }\n"
        "allowed_batch_sizes: 8\nallowed_batch_sizes: 16\nallowed_batch_sizes: 32\n"
        "allowed_batch_sizes: 64\nenable_large_batch_splitting { value: true }\n"
        "max_execution_batch_size { value: 64 }\n"
    )
    args, _ = lay_out_pod(tmp_path, files)
    shutil.copytree(tiny_model_base, model_base(args), dirs_exist_ok=True)
    # TF Serving retries a failed load (5 times, a minute apart by default);
    # the retry flags are TF Serving's own, so the test shortens them.
    args += ["--max_num_load_retries=1", "--load_retry_interval_micros=100000"]
    log = tmp_path / "tf-serving.log"
    proc = Proc([sys.executable, "-m", "serving", "local", *args], log=log, env=serving_env())
    try:
        code = proc.popen.wait(timeout=180)
    finally:
        proc.stop()
    text = log.read_text()
    assert code != 0
    assert (
        "Last entry in allowed_batch_sizes must match max_batch_size; "
        "last entry was 64; expected 256"
    ) in text
    assert "Failed to start server" in text
    assert "Traceback" not in text


def bf16_patch() -> dict[str, Any]:
    patch: dict[str, Any] = yaml.safe_load((PATCHES / "tf-serving-bf16.yaml").read_text())
    return patch


NFD_BF16_LABELS = {f"feature.node.kubernetes.io/cpu-cpuid.{f}" for f in ("AVX512BF16", "AMXBF16")}
"""Node Feature Discovery's labels for CPUs with bfloat16 instructions."""


def test_the_pods_serve_fp32_unless_the_bf16_patch_is_applied(tmp_path: Path) -> None:
    from serving.tfs import parse_command_line

    (tmp_path / "default").mkdir()
    (tmp_path / "patched").mkdir()
    default, _ = lay_out_pod(tmp_path / "default", configmap_files())
    patched, _ = lay_out_pod(tmp_path / "patched", configmap_files(), bf16_patch())
    assert parse_command_line(default).mixed_precision == ""
    assert parse_command_line(patched).mixed_precision == "bfloat16"

    # The patch changes that flag and nothing else in the command.
    def rest(args: list[str]) -> list[str]:
        return [a.replace(str(tmp_path / "patched"), str(tmp_path / "default"))
                for a in args if "mixed_precision" not in a and "port=" not in a]  # fmt: skip

    assert rest(default) == rest(patched)
    # And it keeps the pods on nodes whose CPUs have bfloat16 instructions.
    _, pod = tf_serving_pod(bf16_patch())
    _, default_pod = tf_serving_pod()
    assert "nodeSelector" not in default_pod
    assert set(pod["nodeSelector"]) <= NFD_BF16_LABELS and pod["nodeSelector"]
    assert set(pod["nodeSelector"].values()) == {"true"}


def test_the_bf16_patched_command_runs_bfloat16_kernels(
    tiny_model_base: Path, tmp_path: Path
) -> None:
    if bf16_instructions() is None:
        pytest.skip("bf16 is not supported here: the CPU has neither AVX512_BF16 nor AMX")
    args, _ = lay_out_pod(tmp_path, configmap_files(), bf16_patch())
    shutil.copytree(tiny_model_base, model_base(args), dirs_exist_ok=True)
    log = tmp_path / "tf-serving.log"
    env = {**serving_env(), "ONEDNN_VERBOSE": "1"}
    proc = Proc([sys.executable, "-m", "serving", "local", *args], log=log, env=env)
    target = f"127.0.0.1:{flag(args, 'port')}"
    try:
        proc.wait_ready(
            lambda: health_status(target) == SERVING, timeout=180, what="the pod's model server"
        )
        pixels = np.random.default_rng(0).integers(0, 256, (4, 299, 299, 3), dtype=np.uint8)
        with ModelClient(target) as client:
            client.predict(pixels)
    finally:
        proc.stop()
    assert "Running inference with bfloat16 auto mixed precision" in log.read_text()
    convolutions = onednn_convolutions(log)
    assert convolutions and {dtype for _, dtype in convolutions} == {"bf16"}, convolutions
