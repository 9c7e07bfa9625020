"""The Redis slot counter's safety net, against a real redis-server: the slots of a process
that died lapse after their lease, while a live process keeps renewing the ones it holds."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
import redis.asyncio

from tokenrelay import ratelimit
from tokenrelay.ratelimit import _RedisSlots


async def _wait_for(condition, timeout: float) -> float:
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def test_a_dead_process_slots_lapse(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "SLOT_LEASE", 0.6)
    who = "lapse-" + secrets.token_hex(4)

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        dead, alive = _RedisSlots(client), _RedisSlots(client)
        assert await dead.acquire(who, 1) is not None
        dead._renewer.cancel()  # the process "dies": no renewal, no release
        assert await alive.acquire(who, 1) is None
        waited = await _wait_for(lambda: alive.acquire(who, 1), timeout=5)
        assert 0.3 < waited < 3
        await alive.aclose()
        await client.aclose()

    asyncio.run(run())


def test_a_live_process_keeps_its_slots(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ratelimit, "SLOT_LEASE", 0.6)
    who = "renew-" + secrets.token_hex(4)

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        holder, other = _RedisSlots(client), _RedisSlots(client)
        slot = await holder.acquire(who, 1)
        assert slot is not None
        deadline = time.monotonic() + 2.0  # more than three leases
        while time.monotonic() < deadline:
            assert await other.acquire(who, 1) is None
            await asyncio.sleep(0.1)
        await holder.release(who, slot)
        assert await other.acquire(who, 1) is not None
        await holder.aclose()
        await other.aclose()
        assert await client.zcard(ratelimit.REDIS_SLOTS_PREFIX + who) == 0
        await client.aclose()

    asyncio.run(run())
