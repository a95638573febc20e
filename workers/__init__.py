"""The worker tier: Celery workers that classify batches of images.

Run with ``celery -A workers worker -Q classify``. Workers speak to the model
server only over gRPC; they never import TensorFlow.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    # Lazy, so that importing workers.preprocess does not build the Celery app.
    if name == "app":
        from workers.app import app

        return app
    raise AttributeError(name)
