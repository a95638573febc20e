"""Fixtures of the fault suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.faults.faulty_model import FaultyModel
from tests.fixtures.stack import Pipeline

Fronted = tuple[FaultyModel, Pipeline]


@pytest.fixture
def fronted(
    pipeline_factory: Callable[..., Pipeline],
    redis_url: str,
    s3_server: Any,
    s3_bucket: str,
    model_server: Any,
) -> Iterator[Fronted]:
    """A pipeline whose workers dial a FaultyModel in front of the session's model server."""
    with FaultyModel(model_server.target) as front:
        p = pipeline_factory(
            redis_url=redis_url, s3=s3_server, bucket=s3_bucket, model_target=front.target
        )
        try:
            yield front, p
        finally:
            p.stop_workers()  # before the front goes away
