"""The server fixtures themselves: restarts keep (or drop) data as fault tests expect."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from tests.fixtures.servers import RedisServer

pytestmark = pytest.mark.integration


def test_redis_url_is_flushed(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.dbsize() == 0
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    assert client.config_get("appendonly")["appendonly"] == "yes"
    client.set("left-behind", 1)
    client.close()


def test_redis_kill_and_restart(redis_server_factory: Callable[..., RedisServer]) -> None:
    server = redis_server_factory(password="s3cret")
    assert server.url == f"redis://:s3cret@127.0.0.1:{server.port}/0"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=server.port, password="wrong").ping()
    client = server.client()
    client.set("k", "v")
    # appendfsync everysec: the AOF write() happens before the reply, so a kill keeps it.
    client.close()
    port = server.port
    server.restart(keep_data=True)  # kill -9, same port, same dir
    assert server.port == port
    client = server.client()
    assert client.get("k") == b"v"
    client.close()
    server.restart(keep_data=False)
    client = server.client()
    assert client.get("k") is None
    client.close()
