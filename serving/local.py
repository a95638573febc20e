"""``serving local``: TF Serving's gRPC API in Python, for machines without TF Serving.

Speaks PredictionService (Predict, GetModelMetadata), ModelService
(GetModelStatus) and grpc.health.v1 the way TF Serving does where a client
can tell: the same status codes, the same ``model_spec`` in responses, the
two newest versions served, and the overall health service ``""`` SERVING
only once a version is AVAILABLE.
"""

from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import numpy as np
import tensorflow as tf
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tensorflow.core.framework import tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from labelmill.errors import ServiceError
from serving.registry import LoadedVersion, Registry

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 256 * 2**20
GRACE_S = 10.0


@dataclass(frozen=True)
class LocalConfig:
    """Everything ``serving local`` needs, built once by the CLI."""

    model_base_path: Path
    model_name: str = "inception"
    host: str = "127.0.0.1"
    port: int = 8500
    max_queue: int = 64
    bf16: bool = False
    poll_s: float = 2.0


class RpcAbort(Exception):
    """An error answered to the client with a gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _check_shape(name: str, got: tuple[int, ...], want: tensor_shape_pb2.TensorShapeProto) -> None:
    if want.unknown_rank:
        return
    dims = [d.size for d in want.dim]
    if len(got) != len(dims) or any(w >= 0 and w != g for w, g in zip(dims, got, strict=True)):
        shown = [d if d >= 0 else -1 for d in dims]
        raise RpcAbort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input '{name}' has shape {list(got)}, the signature expects {shown} (-1: any)",
        )


def validate_inputs(
    signature: Any, inputs: dict[str, Any], signature_name: str
) -> dict[str, np.ndarray]:
    """Check names, dtypes and shapes against a SignatureDef; return numpy inputs."""
    expected = dict(signature.inputs)
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise RpcAbort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"signature '{signature_name}' takes inputs {sorted(expected)}; "
            f"missing {missing}, unexpected {extra}",
        )
    arrays: dict[str, np.ndarray] = {}
    for name, info in expected.items():
        proto = inputs[name]
        if proto.dtype != info.dtype:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input '{name}' has dtype {types_pb2.DataType.Name(proto.dtype)}, "
                f"signature '{signature_name}' expects {types_pb2.DataType.Name(info.dtype)}",
            )
        try:
            array = tf.make_ndarray(proto)
        except Exception as exc:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}' is not a valid tensor: {exc}"
            ) from None
        _check_shape(name, tuple(array.shape), info.tensor_shape)
        arrays[name] = array
    return arrays


class Service(
    prediction_service_pb2_grpc.PredictionServiceServicer,  # type: ignore[misc]
    model_service_pb2_grpc.ModelServiceServicer,  # type: ignore[misc]
):
    """PredictionService and ModelService over a :class:`Registry`."""

    def __init__(self, registry: Registry, max_queue: int) -> None:
        self.registry = registry
        self.max_queue = max_queue
        self._in_flight = 0
        self._lock = threading.Lock()

    # -- helpers ----------------------------------------------------------

    def _resolve(self, spec: Any) -> LoadedVersion:
        if spec.name != self.registry.name:
            raise RpcAbort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Latest({spec.name}) (serving only "
                f"'{self.registry.name}')",
            )
        version = spec.version.value if spec.HasField("version") else None
        if spec.version_label:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT, "version labels are not supported; use version"
            )
        loaded = self.registry.available(version)
        if loaded is None:
            wanted = f"Specific({spec.name}, {version})" if version else f"Latest({spec.name})"
            raise RpcAbort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {wanted}")
        return loaded

    def _admit(self) -> None:
        with self._lock:
            if self._in_flight >= self.max_queue:
                raise RpcAbort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the request queue is full ({self.max_queue} requests in flight); retry",
                )
            self._in_flight += 1

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    # -- PredictionService --------------------------------------------------

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self._admit()
        except RpcAbort as exc:
            context.abort(exc.code, exc.message)
        try:
            return self._predict(request)
        except RpcAbort as exc:
            context.abort(exc.code, exc.message)
        except tf.errors.InvalidArgumentError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        finally:
            self._release()

    def _predict(self, request: Any) -> Any:
        loaded = self._resolve(request.model_spec)
        name = request.model_spec.signature_name or "serving_default"
        sigdef = loaded.signature_defs.get(name)
        if sigdef is None:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f'Serving signature name: "{name}" not found in signature def; '
                f"have {sorted(loaded.signature_defs)}",
            )
        arrays = validate_inputs(sigdef, dict(request.inputs), name)
        outputs = loaded.signature(name)(**{k: tf.constant(v) for k, v in arrays.items()})
        wanted = list(request.output_filter) or sorted(outputs)
        unknown = sorted(set(wanted) - set(outputs))
        if unknown:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT, f"output_filter names unknown outputs {unknown}"
            )
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.registry.name
        response.model_spec.version.value = loaded.version
        response.model_spec.signature_name = name
        for key in wanted:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key].numpy()))
        return response

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if list(request.metadata_field) != ["signature_def"]:
                raise RpcAbort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "Metadata field signature_def must be requested (the only one supported)",
                )
            loaded = self._resolve(request.model_spec)
        except RpcAbort as exc:
            context.abort(exc.code, exc.message)
        defs = get_model_metadata_pb2.SignatureDefMap()
        for name, sigdef in loaded.signature_defs.items():
            defs.signature_def[name].CopyFrom(sigdef)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.registry.name
        response.model_spec.version.value = loaded.version
        response.metadata["signature_def"].Pack(defs)
        return response

    # -- ModelService -------------------------------------------------------

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:
        spec = request.model_spec
        versions = self.registry.snapshot()
        if spec.name != self.registry.name:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}"
            )
        if spec.HasField("version"):
            wanted = spec.version.value
            if wanted not in versions:
                context.abort(
                    grpc.StatusCode.NOT_FOUND,
                    f"Could not find version {wanted} of model {spec.name}",
                )
            versions = {wanted: versions[wanted]}
        if not versions:
            context.abort(
                grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}"
            )
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in sorted(versions):
            status = response.model_version_status.add()
            status.version = version
            status.state = get_model_status_pb2.ModelVersionStatus.State.Value(
                versions[version].state
            )
        return response


def enable_bf16() -> None:
    """oneDNN auto mixed precision: bfloat16 matmuls/convolutions on AMX/AVX-512 CPUs."""
    tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})


def build_server(config: LocalConfig, service: Service, health_servicer: Any) -> grpc.Server:
    """A gRPC server with our services; large messages allowed, like TF Serving's."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(8, config.max_queue + 4)),
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(service, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise ServiceError(f"cannot listen on {address} (in use?)")
    return server


def serve(config: LocalConfig) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    if config.bf16:
        enable_bf16()
    registry = Registry(config.model_name, config.model_base_path)
    service = Service(registry, config.max_queue)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = build_server(config, service, health_servicer)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    log.info(
        "listening on %s:%d for model %s from %s (NOT_SERVING until a version loads; "
        "max in flight %d%s)",
        config.host,
        config.port,
        config.model_name,
        config.model_base_path,
        config.max_queue,
        ", bf16" if config.bf16 else "",
    )
    registry.sync()
    if not stop.is_set():
        registry.start_polling(config.poll_s)

    def watch_health() -> None:
        # SERVING while at least one version is AVAILABLE.
        while not stop.is_set():
            ready = registry.available(None) is not None
            health_servicer.set(
                "",
                health_pb2.HealthCheckResponse.SERVING
                if ready
                else health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            stop.wait(0.2 if not ready else config.poll_s)

    watcher = threading.Thread(target=watch_health, name="health", daemon=True)
    watcher.start()
    stop.wait()
    log.info("stopping: finishing requests in flight (grace %.0fs)", GRACE_S)
    health_servicer.enter_graceful_shutdown()
    server.stop(GRACE_S).wait()
    registry.stop()
    log.info("stopped")
    return 0
