"""RedisCache against a real redis-server: restarts, a hung server, a busy connection pool."""

from __future__ import annotations

import asyncio
import logging
import signal
import time

import pytest

from fuseserve import launch
from fuseserve.aligner.service.cache import RedisCache

pytestmark = pytest.mark.slow


@pytest.fixture
def own_redis(logs):
    proc = launch.start_redis(logs)
    yield proc
    proc.stop()


def make_cache(port: int, errors: list[str], **kw) -> RedisCache:
    kw = {"timeout_s": 0.25, "retry_s": 5.0, **kw}
    return RedisCache(f"redis://127.0.0.1:{port}/0", prefix="t:", on_error=errors.append, **kw)


def test_stale_connections_after_a_restart_are_retried_not_an_outage(own_redis, logs, caplog):
    """Redis restarts under a pool of open connections: each stale one is retried once on a
    fresh connection, so the cache never turns off and the values written after the restart
    are hits at once."""
    errors: list[str] = []

    async def scenario():
        cache = make_cache(own_redis.port, errors)
        # open several pooled connections
        await asyncio.gather(*(cache.set(f"k{i}", b"v%d" % i) for i in range(20)))
        assert await cache.get("k3") == b"v3"
        own_redis.kill()
        restarted = launch.start_redis(logs, port=own_redis.port)
        try:
            got = await asyncio.gather(*(cache.get(f"k{i}") for i in range(20)))
            assert got == [None] * 20  # a fresh server: misses, not errors
            await asyncio.gather(*(cache.set(f"k{i}", b"w%d" % i) for i in range(20)))
            again = await asyncio.gather(*(cache.get(f"k{i}") for i in range(20)))
            assert again == [b"w%d" % i for i in range(20)]
            assert cache.healthy
        finally:
            await cache.close()
            restarted.stop()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert errors == []
    assert "serving uncached" not in caplog.text


def test_a_busy_pool_is_a_miss_and_never_turns_the_cache_off(own_redis, caplog):
    errors: list[str] = []

    async def scenario():
        cache = make_cache(own_redis.port, errors, max_connections=4, pool_timeout_s=0.05)
        await cache.set("key", b"value")
        results = await asyncio.gather(*(cache.get("key") for _ in range(300)))
        assert set(results) <= {b"value", None} and results.count(b"value") > 0
        # hold every connection slot: the next command waits pool_timeout_s and misses
        for _ in range(4):
            await cache._slots.acquire()
        assert await cache.get("key") is None
        for _ in range(4):
            cache._slots.release()
        assert cache.healthy and await cache.get("key") == b"value"
        await cache.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert "get_busy" in errors and "get" not in errors
    assert "serving uncached" not in caplog.text


def test_one_silent_round_is_a_miss_not_an_outage(own_redis, caplog):
    """Many commands timing out together (one round, as when this process's event loop is
    busy) are misses; the cache stays on and answers as soon as Redis does."""
    errors: list[str] = []

    async def scenario():
        cache = make_cache(own_redis.port, errors, timeout_s=0.25)
        await cache.set("key", b"value")
        own_redis.popen.send_signal(signal.SIGSTOP)
        try:
            first = await asyncio.gather(*(cache.get("key") for _ in range(50)))
        finally:
            own_redis.popen.send_signal(signal.SIGCONT)
        assert first == [None] * 50
        assert cache.healthy and cache.status() == "ok"
        assert await cache.get("key") == b"value"
        await cache.close()

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert set(errors) == {"get_timeout"}
    assert "serving uncached" not in caplog.text


def test_a_hung_redis_costs_at_most_two_command_timeouts(own_redis):
    """A second round of silence (a command started a timeout after the first silent one)
    turns Redis off: later commands skip it at once until retry_s has passed."""
    errors: list[str] = []

    async def scenario():
        cache = make_cache(own_redis.port, errors, timeout_s=0.25, retry_s=0.5)
        await cache.set("key", b"value")
        own_redis.popen.send_signal(signal.SIGSTOP)
        try:
            start = time.perf_counter()
            first = await asyncio.gather(*(cache.get("key") for _ in range(50)))
            second = await cache.get("key")
            hung = time.perf_counter() - start
            assert not cache.healthy and cache.status().startswith("unreachable")
            start = time.perf_counter()
            skipped = await cache.get("key")
            skip = time.perf_counter() - start
        finally:
            own_redis.popen.send_signal(signal.SIGCONT)
        assert first == [None] * 50 and second is None and skipped is None
        assert hung < 3.0 and skip < 0.5  # generous bounds: bounded, not hung
        await asyncio.sleep(0.6)  # past retry_s: tried again
        assert await cache.get("key") == b"value"
        await cache.close()

    asyncio.run(scenario())
    assert "get_timeout" in errors and "get" in errors and "get_skipped" in errors


def test_one_request_pays_at_most_one_timeout_to_a_hung_redis(own_redis):
    """Within one request's budget, a hung Redis costs one command timeout in all: after it,
    the request's remaining commands are misses at once (and do not turn the cache off)."""
    errors: list[str] = []

    async def request(cache) -> float:
        start = time.perf_counter()
        with cache.request_budget():
            await asyncio.gather(cache.get("a"), cache.get("b"))  # overlapping: one timeout
            await cache.get("c")
            await cache.set("d", b"value")
        return time.perf_counter() - start

    async def scenario():
        cache = make_cache(own_redis.port, errors, timeout_s=0.5, retry_s=5.0)
        await cache.set("key", b"value")
        own_redis.popen.send_signal(signal.SIGSTOP)
        try:
            first = await request(cache)
            assert cache.healthy  # one silent round: a miss, not an outage
            second = await request(cache)  # a second silent round: Redis is off
            assert not cache.healthy
            third = await request(cache)
        finally:
            own_redis.popen.send_signal(signal.SIGCONT)
        await cache.close()
        return first, second, third

    first, second, third = asyncio.run(scenario())
    assert errors.count("get_timeout") >= 2 and errors.count("get") >= 1
    assert "get_over_budget" in errors and "set_over_budget" in errors
    assert "get_skipped" in errors and "set_skipped" in errors
    # 3 sequential rounds would take 1.5 s each without the budget; generous bounds
    assert first < 1.2 and second < 1.2 and third < 0.3
