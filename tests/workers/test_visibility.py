"""workers/visibility.py against a real Redis: held messages are re-scored, acked ones stay gone."""

from __future__ import annotations

import time

import pytest
import redis

from workers.visibility import UNACKED_INDEX, VisibilityRefresher

pytestmark = pytest.mark.integration


def test_refresh_rescores_held_messages_and_never_brings_back_acked_ones(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushdb()
    long_ago = time.time() - 3600
    # "held" is still unacked; "acked" was acknowledged (removed) meanwhile.
    client.zadd(UNACKED_INDEX, {"held": long_ago, "other": long_ago})
    refresher = VisibilityRefresher(client, every_s=60, held=lambda: ["held", "acked"])
    assert refresher.refresh() == 1
    scores = dict(client.zrange(UNACKED_INDEX, 0, -1, withscores=True))
    assert scores["held"] > time.time() - 60
    assert scores["other"] == long_ago  # another worker's: left for the sweep
    assert "acked" not in scores


def test_nothing_held_is_no_call(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert VisibilityRefresher(client, every_s=60, held=list).refresh() == 0
