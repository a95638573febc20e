"""Turn decoded images into labels with one Predict call per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from labelmill.errors import TransientError
from labelmill.job.record import Label, ModelInfo
from labelmill.model_client import ModelClient
from labelmill.retry import Deadline, retry


def classify(
    client: ModelClient,
    pixels: Sequence[np.ndarray],
    *,
    model_name: str,
    version: int | None,
    deadline: Deadline,
    on_retry: Callable[[TransientError], None] | None = None,
) -> tuple[list[list[Label]], ModelInfo]:
    """Labels for each image, and the model (version, weights) that served them.

    Raises ModelUnavailable once the batch's deadline is reached, InferenceError
    at once when the server rejects the batch.
    """
    batch = np.stack(pixels)
    pred = retry(
        lambda: client.predict(batch, version=version),
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
