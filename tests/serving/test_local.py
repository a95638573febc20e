"""Integration tests of ``serving local`` through the project's client and TF Serving's stubs."""

from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from labelmill._proto import tfs_pb2
from labelmill.errors import InferenceError, ModelNotFound, ModelUnavailable
from labelmill.model_client import PREDICT, ModelClient, tensor_from_array
from tests.fixtures.model_server import (
    NOT_SERVING,
    SERVING,
    ModelServer,
    health_status,
    serving_env,
    start_model_server,
)
from tests.fixtures.procs import Proc, free_port, wait_until

pytestmark = pytest.mark.integration


def random_pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 299, 299, 3), dtype=np.uint8)


def png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def raw_predict(target: str, request: tfs_pb2.PredictRequest) -> grpc.StatusCode:
    """Send a hand-built request; return the status code it gets."""
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(
            PREDICT,
            request_serializer=tfs_pb2.PredictRequest.SerializeToString,
            response_deserializer=tfs_pb2.PredictResponse.FromString,
        )
        try:
            call(request, timeout=30)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            assert exc.details(), "errors carry a message"
            return exc.code()
    return grpc.StatusCode.OK


def request_with(name: str, tensor: tfs_pb2.TensorProto) -> tfs_pb2.PredictRequest:
    request = tfs_pb2.PredictRequest()
    request.model_spec.name = "inception"
    request.model_spec.signature_name = "serving_default"
    request.inputs[name].CopyFrom(tensor)
    return request


def test_scores_equal_keras_in_process(model_server: ModelServer) -> None:
    from serving.labels import imagenet_class_names
    from serving.model import build, preprocess

    images = random_pixels(4)
    with ModelClient(model_server.target) as client:
        served = client.predict(images)
    probs = build("tiny", "random", seed=1).model(preprocess(images), training=False).numpy()
    expected_ids = np.argsort(-probs, axis=1)[:, :5]
    np.testing.assert_allclose(
        served.scores, np.take_along_axis(probs, expected_ids, axis=1), atol=1e-5
    )
    np.testing.assert_array_equal(served.class_ids, expected_ids)
    names = imagenet_class_names()
    assert served.classes == [[names[i] for i in row] for row in expected_ids]
    assert served.weights == ["random:seed=1"] * 4
    assert served.version == 1
    assert np.all(np.diff(served.scores, axis=1) <= 0)


def test_predict_images_on_png_gives_same_classes(model_server: ModelServer) -> None:
    images = random_pixels(3, seed=1)
    with ModelClient(model_server.target) as client:
        from_pixels = client.predict(images)
        from_png = client.predict_encoded([png(image) for image in images])
    assert from_png.classes == from_pixels.classes
    np.testing.assert_allclose(from_png.scores, from_pixels.scores, atol=1e-5)


def test_status_and_health(model_server: ModelServer) -> None:
    with ModelClient(model_server.target) as client:
        assert client.model_versions() == {1: "AVAILABLE"}
        assert client.newest_available_version() == 1
        assert client.wait_until_available(1, timeout_s=5) == 1
    assert health_status(model_server.target) == SERVING


def test_model_metadata_like_tf_serving(model_server: ModelServer) -> None:
    from tensorflow.core.framework import types_pb2
    from tensorflow_serving.apis import get_model_metadata_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(model_server.target) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = get_model_metadata_pb2.GetModelMetadataRequest()
        request.model_spec.name = "inception"
        request.metadata_field.append("signature_def")
        response = stub.GetModelMetadata(request, timeout=10)
    defs = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(defs)
    assert response.model_spec.version.value == 1
    default = defs.signature_def["serving_default"]
    assert default.inputs["images"].dtype == types_pb2.DT_UINT8
    assert [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1, 299, 299, 3]
    assert {k: v.dtype for k, v in default.outputs.items()} == {
        "classes": types_pb2.DT_STRING,
        "class_ids": types_pb2.DT_INT32,
        "scores": types_pb2.DT_FLOAT,
        "weights": types_pb2.DT_STRING,
    }
    assert defs.signature_def["predict_images"].inputs["images"].dtype == types_pb2.DT_STRING


def test_unknown_model_and_version_are_not_found(model_server: ModelServer) -> None:
    with ModelClient(model_server.target, "nope") as client:
        with pytest.raises(ModelNotFound, match="'nope'"):
            client.predict(random_pixels(1))
        with pytest.raises(ModelNotFound):
            client.model_versions()
    with (
        ModelClient(model_server.target) as client,
        pytest.raises(ModelNotFound, match="version 7"),
    ):
        client.predict(random_pixels(1), version=7)


@pytest.mark.parametrize(
    ("name", "tensor"),
    [
        ("images", tensor_from_array(np.zeros((1, 299, 299, 3), np.float32))),  # dtype
        ("images", tensor_from_array(np.zeros((1, 100, 100, 3), np.uint8))),  # shape
        ("images", tensor_from_array(np.zeros((299, 299, 3), np.uint8))),  # rank
        ("pixels", tensor_from_array(np.zeros((1, 299, 299, 3), np.uint8))),  # missing input
    ],
    ids=["dtype", "shape", "rank", "missing-input"],
)
def test_invalid_requests_are_invalid_argument(
    model_server: ModelServer, name: str, tensor: tfs_pb2.TensorProto
) -> None:
    code = raw_predict(model_server.target, request_with(name, tensor))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_undecodable_image_is_inference_error(model_server: ModelServer) -> None:
    with (
        ModelClient(model_server.target) as client,
        pytest.raises(InferenceError, match="INVALID_ARGUMENT"),
    ):
        client.predict_encoded([b"not an image"])


def test_message_over_64_mib_is_accepted(model_server: ModelServer) -> None:
    images = np.zeros((252, 299, 299, 3), np.uint8)
    assert images.nbytes >= 64 * 2**20
    with ModelClient(model_server.target) as client:
        assert client.predict(images).scores.shape == (252, 5)


def test_message_over_client_limit_is_not_retried(model_server: ModelServer) -> None:
    client = ModelClient(model_server.target, max_message_bytes=2**20)
    started = time.monotonic()
    with client, pytest.raises(InferenceError, match="RESOURCE_EXHAUSTED"):
        client.predict(random_pixels(8))
    assert time.monotonic() - started < 10


def test_full_queue_is_unavailable(
    tiny_model_base: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log = tmp_path_factory.mktemp("logs") / "full_queue.log"
    server = start_model_server(tiny_model_base, log, ["--max-queue", "0"])
    try:
        assert raw_predict(
            server.target, request_with("images", tensor_from_array(random_pixels(1)))
        ) == (grpc.StatusCode.UNAVAILABLE)
        with ModelClient(server.target) as client:
            with pytest.raises(ModelUnavailable, match="queue is full"):
                client.predict(random_pixels(1))
            assert client.model_versions() == {1: "AVAILABLE"}  # only Predict is queued
    finally:
        server.proc.stop()


def test_new_versions_load_without_restart_and_sigterm_stops(
    tiny_model_base: Path, tmp_path: Path
) -> None:
    base = tmp_path / "inception"
    base.mkdir()
    server = start_model_server(
        base, tmp_path / "versions.log", ["--poll-s", "0.1"], wait_serving=False
    )

    def publish(version: int) -> None:
        # What `serving export` does: a hidden temporary folder, then a rename.
        staging = base / f".staging-{version}"
        shutil.copytree(tiny_model_base / "1", staging)
        staging.rename(base / str(version))

    try:
        assert health_status(server.target) == NOT_SERVING  # no version yet
        with ModelClient(server.target) as client:
            with pytest.raises(ModelNotFound):
                client.model_versions()
            publish(1)
            assert client.wait_until_available(1, timeout_s=60) == 1
            wait_until(lambda: health_status(server.target) == SERVING, timeout=30, what="SERVING")
            publish(2)
            assert client.wait_until_available(2, timeout_s=60) == 2
            assert client.model_versions() == {1: "AVAILABLE", 2: "AVAILABLE"}
            assert client.predict(random_pixels(1)).version == 2
            assert client.predict(random_pixels(1), version=1).version == 1
            publish(3)
            wait_until(
                lambda: client.model_versions() == {2: "AVAILABLE", 3: "AVAILABLE"},
                timeout=60,
                what="versions 2 and 3 only",
            )
            with pytest.raises(ModelNotFound):
                client.predict(random_pixels(1), version=1)
        started = time.monotonic()
        server.proc.signal(signal.SIGTERM)
        assert server.proc.popen.wait(timeout=20) == 0
        assert time.monotonic() - started < 15
    finally:
        server.proc.stop()
    log = (tmp_path / "versions.log").read_text()
    assert "Traceback" not in log
    assert log.count("AVAILABLE from") == 3  # one line per version load


# -- TF Serving's command line -------------------------------------------------


def tf_serving_configs(tmp_path: Path, base: Path, batching: str) -> list[str]:
    """Config files as k8s/30-tf-serving-config.yaml ships them, on ``base``."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "models.config").write_text(
        f'model_config_list {{ config {{ name: "inception" base_path: "{base}" '
        'model_platform: "tensorflow" model_version_policy { latest { num_versions: 2 } } } }'
    )
    (config / "batching.config").write_text(batching)
    (config / "monitoring.config").write_text(
        'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }'
    )
    return [
        f"--model_config_file={config / 'models.config'}",
        "--enable_batching",
        f"--batching_parameters_file={config / 'batching.config'}",
        f"--monitoring_config_file={config / 'monitoring.config'}",
    ]


def serving_local(args: list[str], log: Path) -> Proc:
    return Proc([sys.executable, "-m", "serving", "local", *args], log=log, env=serving_env())


def health_code(target: str) -> grpc.StatusCode:
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            check(b"", timeout=5)
        except grpc.RpcError as exc:
            assert isinstance(exc, grpc.Call)
            return exc.code()
    return grpc.StatusCode.OK


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def test_tf_serving_flags_load_before_listening_and_apply_batching_limits(
    tiny_model_base: Path, tmp_path: Path
) -> None:
    base = tmp_path / "inception"
    base.mkdir()
    batching = (
        "max_batch_size { value: 4 }\nallowed_batch_sizes: 2\nallowed_batch_sizes: 4\n"
        "num_batch_threads { value: 1 }\nmax_enqueued_batches { value: 2 }\n"
    )
    port, rest = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    log = tmp_path / "tfs.log"
    args = [
        f"--port={port}",
        f"--rest_api_port={rest}",
        *tf_serving_configs(tmp_path, base, batching),
        "--enable_grpc_healthcheck_service",
        "--file_system_poll_wait_seconds=1",
        "--grpc_channel_arguments=grpc.max_connection_age_ms=30000",
    ]
    proc = serving_local(args, log)
    try:
        proc.wait_ready(
            lambda: "No versions of servable inception" in log.read_text(),
            timeout=120,
            what="serving local waiting for a version",
        )
        # Like TF Serving: no port until the model is loaded.
        assert health_code(target) == grpc.StatusCode.UNAVAILABLE
        staging = base / ".staging-1"
        shutil.copytree(tiny_model_base / "1", staging)
        staging.rename(base / "1")
        proc.wait_ready(
            lambda: health_status(target) == SERVING, timeout=120, what="SERVING after the load"
        )
        with ModelClient(target) as client:
            assert client.predict(random_pixels(4)).version == 1
            with pytest.raises(InferenceError, match="Task size 5 is larger than maximum input"):
                client.predict(random_pixels(5))
        status = json.loads(http_get(f"http://127.0.0.1:{rest}/v1/models/inception"))
        assert status["model_version_status"][0]["version"] == "1"
        assert status["model_version_status"][0]["state"] == "AVAILABLE"
        metrics = http_get(f"http://127.0.0.1:{rest}/monitoring/prometheus/metrics")
        assert 'request_count{model_name="inception",status="OK"} 1' in metrics
        assert 'status="ERROR"} 1' in metrics
        proc.signal(signal.SIGTERM)
        assert proc.popen.wait(timeout=30) == 0
    finally:
        proc.stop()
    assert "Traceback" not in log.read_text()


def test_tf_serving_flags_refuse_what_tf_serving_refuses_at_start(tmp_path: Path) -> None:
    # The batch scheduler is made at start-up (SharedBatchScheduler::Create),
    # so this fails before any model is looked at: one line, non-zero exit.
    threads = "max_batch_size { value: 64 }\nnum_batch_threads { value: 0 }\n"
    args = [f"--port={free_port()}", *tf_serving_configs(tmp_path, tmp_path / "m", threads)]
    done = subprocess.run(
        [sys.executable, "-m", "serving", "local", *args],
        capture_output=True,
        text=True,
        env=serving_env(),
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "serving: error: num_batch_threads must be positive; was 0"
    )
    assert "Traceback" not in done.stderr


def test_tf_serving_single_model_flags_serve_one_version_without_health(
    tiny_model_base: Path, tmp_path: Path
) -> None:
    base = tmp_path / "inception"
    shutil.copytree(tiny_model_base, base)
    shutil.copytree(base / "1", base / "2")
    port = free_port()
    target = f"127.0.0.1:{port}"
    args = [f"--port={port}", f"--model_base_path={base}", "--model_name=inception"]
    proc = serving_local(args, tmp_path / "single.log")
    try:
        proc.wait_ready(
            lambda: health_code(target) != grpc.StatusCode.UNAVAILABLE,
            timeout=120,
            what="serving local to listen",
        )
        # No --enable_grpc_healthcheck_service: no health service at all.
        assert health_code(target) == grpc.StatusCode.UNIMPLEMENTED
        with ModelClient(target) as client:
            # BuildSingleModelConfig's default policy serves the latest version only.
            assert client.model_versions() == {2: "AVAILABLE"}
            staging = base / ".staging-3"
            shutil.copytree(base / "1", staging)
            staging.rename(base / "3")
            wait_until(
                lambda: client.model_versions() == {3: "AVAILABLE"},
                timeout=120,
                what="version 3 alone",
            )
    finally:
        proc.stop()
    log = (tmp_path / "single.log").read_text()
    # Availability preserved: version 3 is loaded before version 2 goes.
    assert log.index("version 3 AVAILABLE") < log.index("version 2 unloaded")
