"""Turn decoded images into labels with one Predict call per batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from labelmill.errors import ModelNotFound, TransientError, VersionNotServedYet
from labelmill.job.record import Label, ModelInfo
from labelmill.model_client import ModelClient, Prediction
from labelmill.retry import Deadline, retry


def classify(
    client: ModelClient,
    pixels: Sequence[np.ndarray],
    *,
    model_name: str,
    version: int | None,
    deadline: Deadline,
    version_wait_s: float,
    on_retry: Callable[[TransientError], None] | None = None,
) -> tuple[list[list[Label]], ModelInfo]:
    """Labels for each image, and the model (version, weights) that served them.

    Raises ModelUnavailable once the batch's deadline is reached, InferenceError
    at once when the server rejects the batch.

    A pinned version that the server answering does not serve is waited for,
    up to ``version_wait_s`` from the first NOT_FOUND, before ModelNotFound
    ends the batch. The model tier's pods fetch a new version each on its own
    clock (the model-sync sidecar in k8s/31-tf-serving.yaml), so while one
    rolls out, the pod that pinned it serves it and the next pod does not yet;
    the next try may reach another pod, or find the version loaded.
    """
    missing_since: list[float] = []

    def predict() -> Prediction:
        try:
            return client.predict(pixels, version=version)
        except ModelNotFound as exc:
            now = time.monotonic()
            missing_since[:] = missing_since or [now]
            if version is None or now - missing_since[0] >= version_wait_s:
                raise
            raise VersionNotServedYet(str(exc)) from None

    pred = retry(
        predict,
        deadline=deadline,
        what=f"predict {model_name} v{version}",
        on_retry=on_retry,
    )
    labels = [
        [
            Label(label=name, class_id=int(cid), score=float(score))
            for name, cid, score in zip(
                pred.classes[i], pred.class_ids[i], pred.scores[i], strict=True
            )
        ]
        for i in range(len(pixels))
    ]
    weights = pred.weights[0] if pred.weights else "unknown"
    return labels, ModelInfo(name=model_name, version=pred.version, weights=weights)
