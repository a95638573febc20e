"""The worker tier: Celery workers that classify batches of images.

Run with ``celery -A workers worker -Q classify``. Workers speak to the model
server only over gRPC; they never import TensorFlow.
"""

import functools
from typing import Any


@functools.cache
def celery_app() -> Any:
    """The worker tier's app, built once from ``LABELMILL_*`` variables."""
    from labelmill.settings import Settings
    from workers.app import create_app

    return create_app(Settings())


def __getattr__(name: str) -> Any:
    # `celery -A workers` asks for `workers.app`: built on first use, from the
    # environment, so that importing workers.preprocess builds nothing.
    if name == "app":
        return celery_app()
    raise AttributeError(name)
