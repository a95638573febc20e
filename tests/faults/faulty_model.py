"""A gRPC front for a real model server that answers Predict with a fault while told to.

Runs in the test's process; workers dial it instead of the model server. It
forwards every call's bytes unchanged (no TensorFlow Serving message is
parsed), except that while ``failing`` is set a Predict is answered with
``code`` and never reaches the server, and while ``passing`` is clear a
Predict waits (``held`` counts them) until it is set again.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from labelmill.model_client import PREDICT

_BIG = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


class FaultyModel:
    """Its own generic handler (grpc asks only for a ``service`` method)."""

    def __init__(self, upstream: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        self.code = code
        self.failing = threading.Event()
        self.faults = 0
        self.passing = threading.Event()
        self.passing.set()
        self.held = 0
        self._lock = threading.Lock()
        self._upstream = grpc.insecure_channel(upstream, options=_BIG)
        self._server = grpc.server(ThreadPoolExecutor(16), options=_BIG)
        self._server.add_generic_rpc_handlers([self])
        port = self._server.add_insecure_port("127.0.0.1:0")
        self.target = f"127.0.0.1:{port}"

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(details.method)
        forward = self._upstream.unary_unary(method)

        def handle(request: bytes, context: grpc.ServicerContext) -> Any:
            if method == PREDICT and self.failing.is_set():
                with self._lock:
                    self.faults += 1
                context.abort(self.code, "injected by the test's faulty front")
            if method == PREDICT and not self.passing.is_set():
                with self._lock:
                    self.held += 1
                self.passing.wait(timeout=context.time_remaining())
            try:
                return forward(request, timeout=context.time_remaining())
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())

        return grpc.unary_unary_rpc_method_handler(handle)

    def __enter__(self) -> FaultyModel:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)
        self._upstream.close()
