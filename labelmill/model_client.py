"""A TensorFlow-free client for TF Serving's gRPC API (and ``serving local``).

Workers and the producer import this module; it needs only grpcio, protobuf
and numpy. Messages come from ``labelmill/_proto/tfs.proto``, wire-compatible
with TF Serving's own, and methods are called by TF Serving's paths.

Each call is one attempt, with a deadline (``timeout_s``); its failure is
mapped by gRPC status code, and retrying is the caller's (``labelmill.retry``):

- UNAVAILABLE, DEADLINE_EXCEEDED, and the server's own faults (INTERNAL,
  CANCELLED, RESOURCE_EXHAUSTED when it is out of memory or its queue is
  full): :class:`ModelUnavailable` (transient).
- NOT_FOUND: :class:`ModelNotFound`.
- INVALID_ARGUMENT (a request the server rejects), RESOURCE_EXHAUSTED for a
  message over the size limit (the same request can never pass) and anything
  else: :class:`InferenceError` (permanent).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc
import numpy as np
from google.protobuf.message import Message

from labelmill._proto import tfs_pb2
from labelmill.errors import InferenceError, ModelNotFound, ModelUnavailable

log = logging.getLogger(__name__)

PREDICT = "/tensorflow.serving.PredictionService/Predict"
GET_MODEL_STATUS = "/tensorflow.serving.ModelService/GetModelStatus"

IMAGE_SHAPE = (299, 299, 3)
POLL_INTERVAL_S = 0.5

_TRANSIENT = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
# gRPC's own words for a message over a size limit, on either side
# (grpc/src/core/ext/filters/message_size/message_size_filter.cc): that
# RESOURCE_EXHAUSTED is about the request, so no retry can help it.
_TOO_LARGE = "message larger than max"

_NUMERIC_DTYPES: dict[int, np.dtype[Any]] = {
    tfs_pb2.DT_FLOAT: np.dtype(np.float32),
    tfs_pb2.DT_DOUBLE: np.dtype(np.float64),
    tfs_pb2.DT_INT32: np.dtype(np.int32),
    tfs_pb2.DT_UINT8: np.dtype(np.uint8),
    tfs_pb2.DT_INT16: np.dtype(np.int16),
    tfs_pb2.DT_INT8: np.dtype(np.int8),
    tfs_pb2.DT_INT64: np.dtype(np.int64),
    tfs_pb2.DT_BOOL: np.dtype(np.bool_),
    tfs_pb2.DT_UINT32: np.dtype(np.uint32),
    tfs_pb2.DT_UINT64: np.dtype(np.uint64),
}
# Where a value lives when the server used repeated fields, not tensor_content.
_REPEATED_FIELD = {
    tfs_pb2.DT_FLOAT: "float_val",
    tfs_pb2.DT_DOUBLE: "double_val",
    tfs_pb2.DT_INT32: "int_val",
    tfs_pb2.DT_UINT8: "int_val",
    tfs_pb2.DT_INT16: "int_val",
    tfs_pb2.DT_INT8: "int_val",
    tfs_pb2.DT_INT64: "int64_val",
    tfs_pb2.DT_BOOL: "bool_val",
    tfs_pb2.DT_UINT32: "uint32_val",
    tfs_pb2.DT_UINT64: "uint64_val",
}

R = TypeVar("R", bound=Message)


@dataclass(frozen=True)
class Prediction:
    """Top-K labels for a batch, in request order."""

    class_ids: np.ndarray  # int32 [N,K]
    classes: list[list[str]]  # [N][K]
    scores: np.ndarray  # float32 [N,K], descending
    weights: list[str]  # [N]
    version: int  # the version the server reports in response.model_spec


def _service_config() -> str:
    # Round robin spreads batches over every TF Serving pod behind a headless
    # service; our own retry loop replaces gRPC's transparent retries.
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


def tensor_from_array(array: np.ndarray) -> tfs_pb2.TensorProto:
    """A numeric array as a TensorProto, its bytes in ``tensor_content``."""
    proto = _tensor_header(array.dtype, array.shape)
    proto.tensor_content = np.ascontiguousarray(
        array, dtype=array.dtype.newbyteorder("<")
    ).tobytes()
    return proto


def _tensor_header(dtype: np.dtype[Any], shape: Sequence[int]) -> tfs_pb2.TensorProto:
    """A TensorProto with ``dtype`` and ``shape`` and no values yet."""
    code = next((k for k, v in _NUMERIC_DTYPES.items() if v == dtype), None)
    if code is None:
        raise InferenceError(f"cannot send an array of dtype {dtype}")
    proto = tfs_pb2.TensorProto(dtype=code)  # type: ignore[arg-type]
    proto.tensor_shape.dim.extend(tfs_pb2.TensorShapeProto.Dim(size=s) for s in shape)
    return proto


def encode_predict_request(
    request: tfs_pb2.PredictRequest, input_name: str, images: Sequence[np.ndarray]
) -> bytes:
    """``request`` with ``inputs[input_name]`` = the images stacked, serialized.

    The same bytes as setting the input's ``tensor_content`` and calling
    ``SerializeToString``, with each image's pixels copied once, straight into
    the message. Through protobuf a batch of 32 (8.6 MB) was copied six times
    (stacking, ``tobytes``, into the message, ``CopyFrom``, encoding, into a
    Python object), each into fresh pages: a third of the worker's CPU per
    image beyond the decode itself (bench/plumbing.py, docs/performance.md).

    Protobuf's wire format (protobuf.dev/programming-guides/encoding) makes
    this a matter of three length-delimited wrappers: the TensorProto is its
    header's encoding followed by field 4 (``tensor_content``); a map entry
    is a message with the key in field 1 and the value in field 2; the map
    is field 2 of PredictRequest, and fields may follow each other in any
    order. ``request`` must not set ``inputs`` itself.
    """
    if not images:
        raise InferenceError("a Predict request needs at least one image")
    first = images[0]
    for image in images:
        if image.dtype != first.dtype or image.shape != first.shape:
            raise InferenceError("every image of a batch must have the same dtype and shape")
    pixels = [np.ascontiguousarray(i, dtype=first.dtype.newbyteorder("<")) for i in images]
    size = sum(p.nbytes for p in pixels)
    tensor = _tensor_header(first.dtype, (len(pixels), *first.shape)).SerializeToString()
    tensor += _field(4, size)
    key = input_name.encode()
    entry = _field(1, len(key)) + key + _field(2, len(tensor) + size) + tensor
    head = request.SerializeToString() + _field(2, len(entry) + size) + entry
    return b"".join([head, *(p.data for p in pixels)])


def _field(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tensor_from_bytes(items: list[bytes]) -> tfs_pb2.TensorProto:
    """A 1-D DT_STRING TensorProto."""
    proto = tfs_pb2.TensorProto(dtype=tfs_pb2.DT_STRING)
    proto.tensor_shape.dim.add(size=len(items))
    proto.string_val.extend(items)
    return proto


def array_from_tensor(proto: tfs_pb2.TensorProto) -> np.ndarray:
    """A TensorProto as a numpy array (strings as an object array of bytes)."""
    shape = tuple(d.size for d in proto.tensor_shape.dim)
    if proto.dtype == tfs_pb2.DT_STRING:
        out = np.empty(len(proto.string_val), dtype=object)
        out[:] = list(proto.string_val)
        return out.reshape(shape)
    dtype = _NUMERIC_DTYPES.get(proto.dtype)
    if dtype is None:
        raise InferenceError(f"unsupported tensor dtype {proto.dtype} in the response")
    if proto.tensor_content:
        flat = np.frombuffer(proto.tensor_content, dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        flat = np.asarray(getattr(proto, _REPEATED_FIELD[proto.dtype]), dtype=dtype)
        count = int(np.prod(shape)) if shape else 1
        if flat.size == 1 and count > 1:  # TF's compact form: one value fills the tensor
            flat = np.full(count, flat[0], dtype=dtype)
    return flat.reshape(shape)


class ModelClient:
    """Calls one model on a TF Serving target over one reused gRPC channel."""

    def __init__(
        self,
        target: str,
        model_name: str = "inception",
        *,
        timeout_s: float = 60.0,
        max_message_bytes: int = 256 * 2**20,
    ) -> None:
        self.target = target
        self.model_name = model_name
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.service_config", _service_config()),
                ("grpc.enable_retries", 0),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                # Pings only while calls are in flight, and no more often than
                # TF Serving's default policy tolerates.
                ("grpc.keepalive_time_ms", 60_000),
                ("grpc.keepalive_timeout_ms", 20_000),
                ("grpc.keepalive_permit_without_calls", 0),
            ],
        )
        self._predict = self._channel.unary_unary(
            PREDICT,
            request_serializer=tfs_pb2.PredictRequest.SerializeToString,
            response_deserializer=tfs_pb2.PredictResponse.FromString,
        )
        # Predict with a request already serialized (encode_predict_request).
        self._predict_serialized = self._channel.unary_unary(
            PREDICT, response_deserializer=tfs_pb2.PredictResponse.FromString
        )
        self._status = self._channel.unary_unary(
            GET_MODEL_STATUS,
            request_serializer=tfs_pb2.GetModelStatusRequest.SerializeToString,
            response_deserializer=tfs_pb2.GetModelStatusResponse.FromString,
        )

    # -- public API -------------------------------------------------------

    def predict(
        self, images: np.ndarray | Sequence[np.ndarray], *, version: int | None = None
    ) -> Prediction:
        """Classify uint8 [299,299,3] images with the ``serving_default`` signature.

        ``images`` is a list of them, or one [N,299,299,3] array.
        """
        if len(images) == 0:
            raise InferenceError(f"{self._where(version)}: no images to classify")
        for image in images:  # the rows of an [N,299,299,3] array are views, not copies
            if image.dtype != np.uint8 or image.shape != IMAGE_SHAPE:
                raise InferenceError(
                    f"{self._where(version)}: images must be uint8 [299,299,3] each, "
                    f"got {image.dtype} {list(image.shape)}"
                )
        request = encode_predict_request(
            self._request("serving_default", version), "images", list(images)
        )
        return self._prediction(self._call(self._predict_serialized, request, version), version)

    def predict_encoded(self, images: list[bytes], *, version: int | None = None) -> Prediction:
        """Classify encoded JPEG/PNG images with the ``predict_images`` signature."""
        request = self._request("predict_images", version)
        request.inputs["images"].CopyFrom(tensor_from_bytes(list(images)))
        return self._prediction(self._call(self._predict, request, version), version)

    def model_versions(self) -> dict[int, str]:
        """Every version the server manages for this model, with its state name."""
        response = self._call(self._status, self._status_request(None), None)
        return self._versions(response)

    def newest_available_version(self) -> int:
        """The highest AVAILABLE version; :class:`ModelNotFound` if there is none."""
        available = [v for v, state in self.model_versions().items() if state == "AVAILABLE"]
        if not available:
            raise ModelNotFound(f"{self._where(None)}: no version is AVAILABLE")
        return max(available)

    def wait_until_available(self, version: int | None = None, *, timeout_s: float) -> int:
        """Poll until ``version`` (or any version) is AVAILABLE; return that version.

        Raises :class:`ModelUnavailable` when ``timeout_s`` passes first.
        """
        deadline = time.monotonic() + timeout_s
        last = "no answer yet"
        while True:
            try:
                response = self._call(self._status, self._status_request(version), version)
                versions = self._versions(response)
                available = [v for v, s in versions.items() if s == "AVAILABLE"]
                if version is None and available:
                    return max(available)
                if version is not None and version in available:
                    return version
                last = f"versions {versions}"
            except (ModelUnavailable, ModelNotFound) as exc:
                last = str(exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ModelUnavailable(
                    f"{self._where(version)}: not AVAILABLE after {timeout_s:g}s ({last})"
                )
            time.sleep(min(POLL_INTERVAL_S, remaining))

    def close(self) -> None:
        """Close the channel; the client cannot be used afterwards."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------

    def _where(self, version: int | None) -> str:
        shown = "newest" if version is None else str(version)
        return f"model server {self.target} model {self.model_name!r} version {shown}"

    def _spec(self, spec: tfs_pb2.ModelSpec, version: int | None) -> None:
        spec.name = self.model_name
        if version is not None:
            spec.version.value = version

    def _request(self, signature: str, version: int | None) -> tfs_pb2.PredictRequest:
        request = tfs_pb2.PredictRequest()
        self._spec(request.model_spec, version)
        request.model_spec.signature_name = signature
        return request

    def _status_request(self, version: int | None) -> tfs_pb2.GetModelStatusRequest:
        request = tfs_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, version)
        return request

    @staticmethod
    def _versions(response: tfs_pb2.GetModelStatusResponse) -> dict[int, str]:
        return {
            int(s.version): tfs_pb2.ModelVersionStatus.State.Name(s.state)
            for s in response.model_version_status
        }

    def _prediction(self, response: tfs_pb2.PredictResponse, version: int | None) -> Prediction:
        try:
            outputs = {name: array_from_tensor(t) for name, t in response.outputs.items()}
            classes = outputs["classes"]
            return Prediction(
                class_ids=outputs["class_ids"].astype(np.int32),
                classes=[[c.decode() for c in row] for row in classes],
                scores=outputs["scores"].astype(np.float32),
                weights=[w.decode() for w in outputs["weights"]],
                version=int(response.model_spec.version.value),
            )
        except KeyError as exc:
            raise InferenceError(
                f"{self._where(version)}: response lacks output {exc}; "
                "is this model exported by `serving export`?"
            ) from None

    def _call(self, method: Callable[..., R], request: Message | bytes, version: int | None) -> R:
        """One RPC with a deadline; a failure raised as what its status code means."""
        try:
            return method(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            message = f"{self._where(version)}: {code.name}: {details}"
            if code == grpc.StatusCode.NOT_FOUND:
                raise ModelNotFound(message) from None
            if code in _TRANSIENT and _TOO_LARGE not in (details or ""):
                raise ModelUnavailable(message) from None
            raise InferenceError(message) from None
