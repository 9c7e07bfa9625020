"""The ``redis_url`` fixture runs a real redis-server that other tests can share."""

from __future__ import annotations

import redis


def test_redis_url_is_a_live_server(redis_url: str) -> None:
    assert redis_url.startswith("redis://127.0.0.1:")
    with redis.Redis.from_url(redis_url) as client:
        client.set("tokenrelay-test:fixture", "ok", ex=10)
        assert client.get("tokenrelay-test:fixture") == b"ok"
        # Persistence off: nothing is written to disk by the test server.
        assert client.config_get("save")["save"] == ""
        assert client.config_get("appendonly")["appendonly"] == "no"
