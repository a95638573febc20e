"""The real Inception-v3 architecture, exported with random weights and served once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from labelmill.model_client import ModelClient
from tests.fixtures.model_server import ModelServer, export_model, start_model_server

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def inception_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelServer]:
    base = tmp_path_factory.mktemp("inception") / "inception"
    export_model(base, arch="inception_v3", weights="random", seed=1, version=1)
    server = start_model_server(base, base.parent / "serving.log")
    yield server
    server.proc.stop()


def test_inception_v3_served_equals_keras(inception_server: ModelServer) -> None:
    from serving.model import build, preprocess

    images = np.random.default_rng(3).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    with ModelClient(inception_server.target) as client:
        served = client.predict(images)
    probs = build("inception_v3", "random", seed=1).model(preprocess(images), training=False)
    probs = np.asarray(probs)
    expected = np.sort(probs, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(served.scores, expected, atol=1e-5)
    assert served.weights == ["random:seed=1"] * 2
    assert served.version == 1
    assert Path(inception_server.base_path / "1" / "saved_model.pb").is_file()
