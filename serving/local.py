"""``serving local``: TF Serving's gRPC API in Python, for machines without TF Serving.

Speaks PredictionService (Predict, GetModelMetadata), ModelService
(GetModelStatus) and grpc.health.v1 the way TF Serving does where a client
can tell: the same status codes, the same ``model_spec`` in responses, the
two newest versions served, and the overall health service ``""`` SERVING
only once a version is AVAILABLE.

Given TF Serving's own command line (``serving.tfs``), it also behaves as
``tensorflow_model_server`` does at start-up: the configured model is loaded
before the gRPC port opens (a load that fails ends the process with TF
Serving's message), the health service exists only with
``--enable_grpc_healthcheck_service``, ``--enable_batching`` applies the
batching queue's limits to each request, and ``--rest_api_port`` serves
model status and, with a monitoring config, Prometheus metrics.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
from serving.tfs import Batching, TfsOptions

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
    poll_s: float | None = 2.0  # None: scan once at start-up
    choose: Callable[[list[int]], list[int]] | None = None  # None: the two newest
    tfs: TfsOptions | None = None  # set when started with TF Serving's command line

    @classmethod
    def from_tfs(cls, tfs: TfsOptions, *, host: str, max_queue: int, bf16: bool) -> LocalConfig:
        (model,) = tfs.models
        return cls(
            model_base_path=model.base_path,
            model_name=model.name,
            host=host,
            port=tfs.port,
            max_queue=max_queue,
            bf16=bf16 or tfs.mixed_precision == "bfloat16",
            poll_s=tfs.poll_s,
            choose=model.choose,
            tfs=tfs,
        )


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

    def __init__(
        self, registry: Registry, max_queue: int, batching: Batching | None = None
    ) -> None:
        self.registry = registry
        self.max_queue = max_queue
        self.batching = batching
        self._in_flight = 0
        self._queued_images = 0
        self._lock = threading.Lock()
        self._batch_threads = threading.BoundedSemaphore(
            batching.num_batch_threads if batching else max(1, max_queue)
        )
        self.requests = {"OK": 0, "ERROR": 0}

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

    def _enqueue(self, size: int) -> None:
        """The batching queue's admission (``--enable_batching``).

        tensorflow/core/kernels/batching_util/shared_batch_scheduler.h
        Queue::ValidateBatchTaskQueueCapacity: a request above max_batch_size
        is INVALID_ARGUMENT; one that does not fit the queue's remaining
        capacity (max_enqueued_batches execution batches) is UNAVAILABLE.
        Requests are not merged here; each runs as its own batch on one of
        num_batch_threads.
        """
        batching = self.batching
        if batching is None:
            return
        if size > batching.max_batch_size:
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Task size {size} is larger than maximum input batch size "
                f"{batching.max_batch_size}",
            )
        with self._lock:
            if self._queued_images + size > batching.capacity:
                raise RpcAbort(
                    grpc.StatusCode.UNAVAILABLE,
                    "The batch scheduling queue to which this task was submitted is full",
                )
            self._queued_images += size

    def _dequeue(self, size: int) -> None:
        if self.batching is not None:
            with self._lock:
                self._queued_images -= size

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            self._admit()
        except RpcAbort as exc:
            self._count("ERROR")
            context.abort(exc.code, exc.message)
        try:
            response = self._predict(request)
        except RpcAbort as exc:
            self._count("ERROR")
            context.abort(exc.code, exc.message)
        except tf.errors.InvalidArgumentError as exc:
            self._count("ERROR")
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message)
        finally:
            self._release()
        self._count("OK")
        return response

    def _count(self, status: str) -> None:
        with self._lock:
            self.requests[status] += 1

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
        size = min((a.shape[0] for a in arrays.values() if a.ndim), default=1)
        self._enqueue(size)
        try:
            with self._batch_threads:
                outputs = loaded.signature(name)(**{k: tf.constant(v) for k, v in arrays.items()})
        finally:
            self._dequeue(size)
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


def build_server(config: LocalConfig, service: Service, health_servicer: Any | None) -> grpc.Server:
    """A gRPC server with our services; large messages allowed, like TF Serving's."""
    tfs = config.tfs
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.so_reuseport", 0),
    ]
    threads = max(8, config.max_queue + 4)
    if tfs is not None:
        # server.cc BuildAndStart: each --grpc_channel_arguments entry is added
        # to the server builder; --grpc_max_threads caps its threads.
        options += tfs.channel_arguments
        threads = tfs.grpc_max_threads
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads), options=options)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(service, server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(service, server)
    if health_servicer is not None:
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{config.host}:{config.port}"
    if server.add_insecure_port(address) == 0:
        raise ServiceError(f"cannot listen on {address} (in use?)")
    return server


class _Rest(BaseHTTPRequestHandler):
    """TF Serving's REST model status (GET /v1/models/NAME) and Prometheus page."""

    service: Service
    prometheus_path: str | None

    def do_GET(self) -> None:
        registry = self.service.registry
        path = self.path.split("?", 1)[0]
        if self.prometheus_path and path == self.prometheus_path:
            lines = ["# TYPE :tensorflow:serving:request_count counter"]
            for status, count in sorted(self.service.requests.items()):
                lines.append(
                    f':tensorflow:serving:request_count{{model_name="{registry.name}",'
                    f'status="{status}"}} {count}'
                )
            self._send(200, "\n".join(lines) + "\n", "text/plain; version=0.0.4")
            return
        if path.rstrip("/") == f"/v1/models/{registry.name}":
            versions = registry.snapshot()
            body = {
                "model_version_status": [
                    {
                        "version": str(v),
                        "state": versions[v].state,
                        "status": {"error_code": "OK", "error_message": versions[v].error},
                    }
                    for v in sorted(versions, reverse=True)
                ]
            }
            self._send(200, json.dumps(body), "application/json")
            return
        self._send(404, json.dumps({"error": f"Malformed request: GET {path}"}), "application/json")

    def _send(self, code: int, body: str, content_type: str) -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        return


def start_rest(config: LocalConfig, service: Service) -> ThreadingHTTPServer | None:
    """server.cc BuildAndStart: the HTTP server starts after the gRPC one, if a port is set."""
    tfs = config.tfs
    if tfs is None or not tfs.rest_api_port:
        return None
    handler = type("Rest", (_Rest,), {"service": service, "prometheus_path": tfs.prometheus_path})
    try:
        httpd = ThreadingHTTPServer((config.host, tfs.rest_api_port), handler)
    except OSError as exc:
        # TF Serving logs "Failed to start HTTP Server" and keeps serving gRPC.
        log.error("Failed to start HTTP Server at %s:%d: %s", config.host, tfs.rest_api_port, exc)
        return None
    threading.Thread(target=httpd.serve_forever, name="rest", daemon=True).start()
    log.info("Exporting HTTP/REST API at:%s:%d ...", config.host, tfs.rest_api_port)
    return httpd


def load_before_listening(registry: Registry, poll_s: float | None, stop: threading.Event) -> None:
    """Wait, as TF Serving's start-up does, until the model's newest version is AVAILABLE.

    server_core.cc ServerCore::WaitUntilModelsAvailable: the server blocks on
    Latest(model) reaching AVAILABLE (or END, a failed load), with no
    timeout; with no version on disk it keeps waiting. Only then does
    Server::BuildAndStart open the gRPC port.
    """
    told = False
    while not stop.is_set():
        registry.sync()
        versions = registry.snapshot()
        if versions:
            newest = versions[max(versions)]
            if newest.state == "AVAILABLE":
                return
            if newest.state == "END":
                raise ServiceError(
                    "Failed to start server. Error: 1 model(s) did not become available: "
                    f"{{{{name: {registry.name} version: {newest.version}}} due to error: "
                    f"{newest.error}}}"
                )
        elif not told:
            log.warning(
                "No versions of servable %s found under base path %s", registry.name, registry.base
            )
            told = True
        stop.wait(poll_s or 1.0)


def serve(config: LocalConfig) -> int:
    """Run until SIGTERM/SIGINT; return the process exit code."""
    tfs = config.tfs
    if tfs is not None and (tfs.intra_op_threads or tfs.inter_op_threads):
        # server.cc BuildAndStart: the session config's intra/inter-op pools.
        tf.config.threading.set_intra_op_parallelism_threads(tfs.intra_op_threads)
        tf.config.threading.set_inter_op_parallelism_threads(tfs.inter_op_threads)
    if tfs is not None and tfs.mixed_precision not in ("", "bfloat16"):
        # saved_model_bundle_factory.cc InternalCreateSavedModelBundle: a warning, no more.
        log.warning(
            "%s auto mixed precision is not supported. Valid option: bfloat16", tfs.mixed_precision
        )
    if config.bf16:
        # TF Serving (saved_model_bundle_factory.cc InternalCreateSavedModelBundle)
        # sets the rewrite with this line and checks no CPU feature: TF runs
        # the rewritten graph on oneDNN wherever AVX-512F is, emulated without
        # AVX512_BF16 (tensorflow/core/util/util.cc
        # IsDataTypeSupportedByOneDNNOnThisCPU), and on Eigen below that. Only
        # labelmill's own --bf16 refuses such CPUs (serving/cli.py).
        log.info("Running inference with bfloat16 auto mixed precision")
        enable_bf16()
    registry = Registry(
        config.model_name,
        config.model_base_path,
        config.choose,
        load_retries=tfs.load_retries if tfs else 0,
        retry_interval_s=tfs.load_retry_interval_s if tfs else 0.0,
        load_error=tfs.load_error if tfs else None,
    )
    service = Service(registry, config.max_queue, tfs.batching if tfs else None)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if tfs is not None:
        return _serve_as_tf_serving(config, registry, service, stop)

    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    server = build_server(config, service, health_servicer)
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
    if not stop.is_set() and config.poll_s is not None:
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
            stop.wait(0.2 if not ready else (config.poll_s or 2.0))

    watcher = threading.Thread(target=watch_health, name="health", daemon=True)
    watcher.start()
    stop.wait()
    log.info("stopping: finishing requests in flight (grace %.0fs)", GRACE_S)
    health_servicer.enter_graceful_shutdown()
    server.stop(GRACE_S).wait()
    registry.stop()
    log.info("stopped")
    return 0


def _serve_as_tf_serving(
    config: LocalConfig, registry: Registry, service: Service, stop: threading.Event
) -> int:
    tfs = config.tfs
    assert tfs is not None
    log.info(
        "loading model %s from %s (version policy: %s) before listening",
        config.model_name,
        config.model_base_path,
        tfs.models[0].policy,
    )
    load_before_listening(registry, config.poll_s, stop)
    if stop.is_set():
        return 0
    health_servicer = None
    if tfs.health_service:
        # server.cc BuildAndStart: grpc's default health service ("" SERVING
        # once the server runs) plus ModelService and PredictionService.
        health_servicer = health.HealthServicer(experimental_non_blocking=True)
        for name in ("", "ModelService", "PredictionService"):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server = build_server(config, service, health_servicer)
    server.start()
    log.info("Running gRPC ModelServer at %s:%d ...", config.host, config.port)
    httpd = start_rest(config, service)
    if config.poll_s is not None:
        registry.start_polling(config.poll_s)
    for arg in tfs.unknown:
        # main.cc: reported, then the server runs anyway.
        log.warning("unknown argument: %s", arg)
    stop.wait()
    log.info("stopping: finishing requests in flight (grace %.0fs)", GRACE_S)
    if health_servicer is not None:
        health_servicer.enter_graceful_shutdown()
    server.stop(GRACE_S).wait()
    if httpd is not None:
        httpd.shutdown()
    registry.stop()
    log.info("stopped")
    return 0
