"""Unit tests of the client's retry policy and tensor codec, against an in-process fake."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest

from labelmill._proto import tfs_pb2
from labelmill.errors import InferenceError, ModelNotFound, ModelUnavailable
from labelmill.model_client import (
    ModelClient,
    array_from_tensor,
    encode_predict_request,
    tensor_from_array,
    tensor_from_bytes,
)
from labelmill.retry import Deadline, retry


def ok_response(n: int) -> tfs_pb2.PredictResponse:
    response = tfs_pb2.PredictResponse()
    response.model_spec.name = "inception"
    response.model_spec.version.value = 3
    response.outputs["class_ids"].CopyFrom(
        tensor_from_array(np.tile(np.arange(5, dtype=np.int32), (n, 1)))
    )
    response.outputs["scores"].CopyFrom(
        tensor_from_array(np.tile(np.linspace(0.5, 0.1, 5, dtype=np.float32), (n, 1)))
    )
    classes = tfs_pb2.TensorProto(dtype=tfs_pb2.DT_STRING)
    classes.tensor_shape.dim.add(size=n)
    classes.tensor_shape.dim.add(size=5)
    classes.string_val.extend([f"c{i}".encode() for i in range(5)] * n)
    response.outputs["classes"].CopyFrom(classes)
    response.outputs["weights"].CopyFrom(tensor_from_bytes([b"random:seed=1"] * n))
    return response


@dataclass
class FakeServer:
    """Answers Predict with the codes in ``script`` (then OK), recording the requests."""

    script: list[grpc.StatusCode] = field(default_factory=list)
    requests: list[tfs_pb2.PredictRequest] = field(default_factory=list)
    target: str = ""

    def predict(
        self, request: tfs_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> tfs_pb2.PredictResponse:
        self.requests.append(request)
        if self.script:
            context.abort(self.script.pop(0), "scripted failure")
        n = request.inputs["images"].tensor_shape.dim[0].size
        return ok_response(n)


@pytest.fixture
def fake() -> Iterator[FakeServer]:
    state = FakeServer()
    handler = grpc.method_handlers_generic_handler(
        "tensorflow.serving.PredictionService",
        {
            "Predict": grpc.unary_unary_rpc_method_handler(
                state.predict,
                request_deserializer=tfs_pb2.PredictRequest.FromString,
                response_serializer=tfs_pb2.PredictResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    state.target = f"127.0.0.1:{port}"
    yield state
    server.stop(None)


def pixels(n: int = 2) -> np.ndarray:
    return np.zeros((n, 299, 299, 3), np.uint8)


def client(fake: FakeServer, **kwargs: float) -> ModelClient:
    return ModelClient(fake.target, timeout_s=5.0, **kwargs)


def test_transient_codes_are_model_unavailable_and_the_retry_layer_retries_them(
    fake: FakeServer,
) -> None:
    fake.script = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    with client(fake) as c:
        with pytest.raises(ModelUnavailable, match="UNAVAILABLE"):
            c.predict(pixels(2))  # one attempt: the client never retries on its own
        assert len(fake.requests) == 1
        prediction = retry(lambda: c.predict(pixels(2)), deadline=Deadline(30), what="predict")
    assert len(fake.requests) == 3
    assert prediction.version == 3
    assert prediction.classes == [[f"c{i}" for i in range(5)]] * 2
    assert prediction.class_ids.dtype == np.int32 and prediction.class_ids.shape == (2, 5)
    assert prediction.scores.dtype == np.float32
    assert prediction.weights == ["random:seed=1", "random:seed=1"]


def test_request_uses_tensor_content_and_signature(fake: FakeServer) -> None:
    with client(fake) as c:
        c.predict(pixels(1), version=7)
        c.predict_encoded([b"png-bytes"])
    first, second = fake.requests
    images = first.inputs["images"]
    assert images.dtype == tfs_pb2.DT_UINT8
    assert len(images.tensor_content) == 299 * 299 * 3 and not images.int_val
    assert [d.size for d in images.tensor_shape.dim] == [1, 299, 299, 3]
    assert first.model_spec.signature_name == "serving_default"
    assert first.model_spec.version.value == 7
    assert second.model_spec.signature_name == "predict_images"
    assert not second.model_spec.HasField("version")
    assert list(second.inputs["images"].string_val) == [b"png-bytes"]


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InferenceError),
        (grpc.StatusCode.NOT_FOUND, ModelNotFound),
        (grpc.StatusCode.UNIMPLEMENTED, InferenceError),
    ],
)
def test_permanent_codes_are_not_retried(
    fake: FakeServer, code: grpc.StatusCode, error: type[Exception]
) -> None:
    fake.script = [code]
    with client(fake) as c, pytest.raises(error) as caught:
        c.predict(pixels(1), version=4)
    assert len(fake.requests) == 1
    message = str(caught.value)
    assert fake.target in message and "'inception'" in message and "version 4" in message


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # the server's queue or memory, not the message
    ],
)
def test_the_server_s_own_faults_are_transient(fake: FakeServer, code: grpc.StatusCode) -> None:
    fake.script = [code]
    with client(fake) as c, pytest.raises(ModelUnavailable, match=code.name):
        c.predict(pixels(1))


def test_a_message_over_the_size_limit_is_permanent(fake: FakeServer) -> None:
    """gRPC says RESOURCE_EXHAUSTED for it too, but the same request can never pass."""
    with (
        ModelClient(fake.target, timeout_s=5.0, max_message_bytes=10_000) as c,
        pytest.raises(InferenceError, match=r"RESOURCE_EXHAUSTED.*larger than max"),
    ):
        c.predict(pixels(1))


def test_a_deadline_reached_raises_model_unavailable(fake: FakeServer) -> None:
    fake.script = [grpc.StatusCode.UNAVAILABLE] * 1000
    started = time.monotonic()
    with client(fake) as c, pytest.raises(ModelUnavailable) as caught:
        retry(lambda: c.predict(pixels(1)), deadline=Deadline(0.5), what="predict")
    assert time.monotonic() - started < 5
    assert len(fake.requests) >= 2
    assert "UNAVAILABLE" in str(caught.value) and fake.target in str(caught.value)


def test_unreachable_server_is_model_unavailable() -> None:
    from tests.fixtures.procs import free_port

    with ModelClient(f"127.0.0.1:{free_port()}", timeout_s=1.0) as c:
        with pytest.raises(ModelUnavailable):
            c.model_versions()
        with pytest.raises(ModelUnavailable):
            c.wait_until_available(timeout_s=0.3)


def test_predict_rejects_wrong_pixels_locally(fake: FakeServer) -> None:
    with client(fake) as c:
        with pytest.raises(InferenceError, match="uint8"):
            c.predict(np.zeros((1, 299, 299, 3), np.float32))
        with pytest.raises(InferenceError, match=r"got uint8 \[299, 3\]"):
            c.predict(np.zeros((299, 299, 3), np.uint8))  # one image, not a batch of one
        with pytest.raises(InferenceError, match="no images"):
            c.predict([])
    assert fake.requests == []


def test_predict_takes_a_list_of_images_as_it_takes_their_stack(fake: FakeServer) -> None:
    rows = [np.full((299, 299, 3), i, np.uint8) for i in range(3)]
    with client(fake) as c:
        c.predict(rows)
        c.predict(np.stack(rows))
    from_list, from_stack = fake.requests
    assert from_list == from_stack
    np.testing.assert_array_equal(array_from_tensor(from_list.inputs["images"]), np.stack(rows))


@pytest.mark.parametrize(
    ("dtype", "shape", "version", "name"),
    [
        (np.uint8, (299, 299, 3), 7, "images"),
        (np.float32, (2, 3), None, "x"),
        (np.int64, (5,), 2**40, "a" * 200),  # lengths and numbers past one varint byte
    ],
)
@pytest.mark.parametrize("count", [1, 3, 40])
def test_encode_predict_request_is_protobuf_s_own_encoding(
    dtype: type[np.generic], shape: tuple[int, ...], version: int | None, name: str, count: int
) -> None:
    rng = np.random.default_rng(count)
    images = [(rng.random(shape) * 200).astype(dtype) for _ in range(count)]
    request = tfs_pb2.PredictRequest()
    request.model_spec.name = "inception"
    request.model_spec.signature_name = "serving_default"
    if version is not None:
        request.model_spec.version.value = version
    expected = tfs_pb2.PredictRequest()
    expected.CopyFrom(request)
    expected.inputs[name].CopyFrom(tensor_from_array(np.stack(images)))

    encoded = encode_predict_request(request, name, images)

    assert encoded == expected.SerializeToString()
    assert tfs_pb2.PredictRequest.FromString(encoded) == expected


def test_encode_predict_request_refuses_mixed_images() -> None:
    with pytest.raises(InferenceError, match="same dtype and shape"):
        encode_predict_request(
            tfs_pb2.PredictRequest(), "images", [np.zeros((2, 2), np.uint8), np.zeros(3, np.uint8)]
        )


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.float32, np.float64])
def test_tensor_round_trip(dtype: Callable[..., np.generic]) -> None:
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    back = array_from_tensor(tensor_from_array(array))
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_tensor_from_repeated_fields() -> None:
    proto = tfs_pb2.TensorProto(dtype=tfs_pb2.DT_INT32)
    proto.tensor_shape.dim.add(size=2)
    proto.tensor_shape.dim.add(size=2)
    proto.int_val.extend([1, 2, 3, 4])
    np.testing.assert_array_equal(array_from_tensor(proto), [[1, 2], [3, 4]])
    proto.ClearField("int_val")
    proto.int_val.append(9)  # TF's compact form: one value for the whole tensor
    np.testing.assert_array_equal(array_from_tensor(proto), [[9, 9], [9, 9]])


def test_imports_without_tensorflow() -> None:
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "tensorflow_serving", "keras"):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        import labelmill.model_client
        assert not any(m.startswith(("tensorflow", "keras")) for m in sys.modules)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
