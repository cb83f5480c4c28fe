"""The aligner's cache: content-addressed keys, an in-process LRU, Redis, and single-flight.

Covers two levels of keys (raw teacher scores, reusable when fusion options change; fused
blocks), both hashes of (schema version, what produced the value, the text bytes). Redis is
optional and never on the critical path: every command has a short timeout, one request's cache
commands together have a budget of one timeout, a stale connection is retried once, and after a
failure Redis is skipped for ``retry_s`` (then tried again), so a dead or slow Redis costs a miss,
not an error. ``SingleFlight`` computes concurrent identical requests once.

Leaves out: what the values mean (callers decode them; a value that fails to decode is a miss).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from typing import Protocol, TypeVar, cast

log = logging.getLogger(__name__)

KEY_SCHEMA = 2  # 2: fused blocks carry tail mass
T = TypeVar("T")


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def scores_key(teacher_fingerprint: str, k: int, float_dtype: str, text: str) -> str:
    """Key of one teacher's raw scores for one text (teacher-level cache)."""
    return "s:" + _digest(str(KEY_SCHEMA), "scores", teacher_fingerprint, str(k), float_dtype, text)


def fused_key(
    target_fingerprint: str,
    teacher_fingerprints: Sequence[str],
    k: int,
    options_key: str,
    text: str,
    ids: bytes | None = None,
) -> str:
    """Key of one fused block: target, teachers in order, k, every fusion option, the text, and
    ``ids`` (the target ids as bytes) when they are not the tokenizer's own for ``text``."""
    parts: list[str | bytes] = [
        str(KEY_SCHEMA),
        "fused",
        target_fingerprint,
        "\x1f".join(teacher_fingerprints),
        str(k),
        options_key,
        text,
    ]
    if ids is not None:
        parts += ["ids", ids]
    return "f:" + _digest(*parts)


class _Budget:
    """Wall time one request has spent waiting on cache commands (overlapping ones once)."""

    def __init__(self, total_s: float) -> None:
        self.total_s = total_s
        self.spent_s = 0.0
        self.active = 0
        self.since = 0.0

    def remaining(self) -> float:
        running = time.monotonic() - self.since if self.active else 0.0
        return self.total_s - self.spent_s - running

    def begin(self) -> None:
        if self.active == 0:
            self.since = time.monotonic()
        self.active += 1

    def end(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.spent_s += time.monotonic() - self.since


_BUDGET: ContextVar[_Budget | None] = ContextVar("fuseserve_cache_budget", default=None)


@contextlib.contextmanager
def _request_budget(total_s: float) -> Iterator[None]:
    token = _BUDGET.set(_Budget(total_s))
    try:
        yield
    finally:
        _BUDGET.reset(token)


class Cache(Protocol):
    """Bytes by key; ``get`` returns None on a miss or when the backing store fails."""

    name: str

    def status(self) -> str:
        """``ok``, or why the store cannot be used now (shown by /readyz and a metric)."""
        ...

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes) -> None: ...

    async def close(self) -> None: ...

    async def ping(self) -> bool:
        """Whether the store answers now (refreshes ``status``; always True in process)."""
        ...

    def request_budget(self) -> contextlib.AbstractContextManager[None]:
        """A context bounding what the cache may cost one request (a no-op where it is free)."""
        ...


class LRUCache:
    """A bounded in-process LRU by total value bytes (0 = caching off)."""

    name = "lru"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._data: OrderedDict[str, bytes] = OrderedDict()
        self.bytes = 0

    async def get(self, key: str) -> bytes | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > self.max_bytes:
            return
        old = self._data.pop(key, None)
        if old is not None:
            self.bytes -= len(old)
        self._data[key] = value
        self.bytes += len(value)
        while self.bytes > self.max_bytes:
            _, evicted = self._data.popitem(last=False)
            self.bytes -= len(evicted)

    def __len__(self) -> int:
        return len(self._data)

    def status(self) -> str:
        return "ok" if self.max_bytes > 0 else "off"

    async def ping(self) -> bool:
        return True

    def request_budget(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    async def close(self) -> None:
        self._data.clear()
        self.bytes = 0


class RedisCache:
    """Redis with fail-fast semantics; errors are counted through ``on_error``.

    At most ``max_connections`` commands run at once; a command that waits longer than
    ``pool_timeout_s`` for one of them is a miss (``<op>_busy``) and never turns the cache off.
    A connection that fails (a pooled one that went stale when Redis restarted) is retried once
    on a fresh connection; only a failure after that turns Redis off for ``retry_s``. A timeout
    alone may be this process's busy event loop, so it turns Redis off only when a command that
    started at least ``timeout_s`` after an earlier timed-out one also times out with no success
    in between (a hung Redis: two rounds of silence, however many commands each round held).
    Every command is bounded by ``timeout_s`` (connect, write and read), so a hung Redis costs a
    request at most two timeouts."""

    name = "redis"

    def __init__(
        self,
        url: str,
        prefix: str = "fuseserve:",
        timeout_s: float = 0.25,
        retry_s: float = 5.0,
        ttl_s: int = 0,
        on_error: Callable[[str], None] = lambda op: None,
        max_connections: int = 256,
        pool_timeout_s: float = 0.25,
    ) -> None:
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        self.client = redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            # a stale pooled connection: reconnect and try once more; never retry a timeout
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            retry_on_timeout=False,
            max_connections=max_connections,
        )
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.ttl_s = ttl_s
        self.on_error = on_error
        self.pool_timeout_s = pool_timeout_s
        self._slots = asyncio.Semaphore(max_connections)
        self._timeout_errors = (TimeoutError, RedisTimeoutError)
        self._down_until = 0.0
        self._silent_since: float | None = None  # start of the first timed-out command since
        # the last success
        self.last_error: str | None = None  # the latest command's failure; None once one succeeds

    @property
    def healthy(self) -> bool:
        return time.monotonic() >= self._down_until

    def status(self) -> str:
        return "ok" if self.last_error is None else f"unreachable: {self.last_error}"

    def request_budget(self) -> contextlib.AbstractContextManager[None]:
        """Within this context (one request, and the tasks it starts), the cache may cost at
        most ``timeout_s`` of wall time in all; past that its commands are misses at once."""
        return _request_budget(self.timeout_s)

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T | None:
        if not self.healthy:
            self.on_error(f"{op}_skipped")
            return None
        budget = _BUDGET.get()
        limit = self.timeout_s if budget is None else min(self.timeout_s, budget.remaining())
        if limit <= 0:  # this request has spent its cache time: a miss, not an outage
            self.on_error(f"{op}_over_budget")
            return None
        if budget is not None:
            budget.begin()
        try:
            return await self._command(op, fn, limit)
        finally:
            if budget is not None:
                budget.end()

    async def _command(self, op: str, fn: Callable[[], Awaitable[T]], limit: float) -> T | None:
        try:
            await asyncio.wait_for(self._slots.acquire(), min(self.pool_timeout_s, limit))
        except TimeoutError:  # every connection busy: a miss, not an outage
            self.on_error(f"{op}_busy")
            return None
        started = time.monotonic()
        try:
            if not self.healthy:  # went down while this one waited for a connection
                self.on_error(f"{op}_skipped")
                return None
            # socket timeouts bound each read; wait_for bounds the whole command (and a retry)
            result = await asyncio.wait_for(fn(), limit)
            self.last_error = None
            self._silent_since = None
            return result
        except Exception as exc:  # any Redis failure is a miss, never the caller's error
            reason = (str(exc).splitlines() or [""])[0][:200] or type(exc).__name__
            # a command cut short by its request's budget says nothing about Redis
            cut_short = limit < self.timeout_s
            if isinstance(exc, self._timeout_errors) and (cut_short or not self._hung(started)):
                self.on_error(f"{op}_timeout")
                return None
            self.last_error = reason
            if self._down_until <= time.monotonic():
                log.warning(
                    "redis %s failed (%s); serving uncached for %.1fs", op, reason, self.retry_s
                )
            self._down_until = time.monotonic() + self.retry_s
            self.on_error(op)
            return None
        finally:
            self._slots.release()

    def _hung(self, started: float) -> bool:
        """After a timeout of a command begun at ``started``: is this a second round of
        silence (Redis hung) rather than one slow round (a busy event loop)?"""
        if self._silent_since is None:
            self._silent_since = started
            return False
        return started >= self._silent_since + self.timeout_s

    async def get(self, key: str) -> bytes | None:
        # the client is built without decode_responses, so GET answers bytes (or None), never str
        name = self.prefix + key
        return await self._call(
            "get", lambda: cast("Awaitable[bytes | None]", self.client.get(name))
        )

    async def set(self, key: str, value: bytes) -> None:
        ex = self.ttl_s or None
        await self._call("set", lambda: self.client.set(self.prefix + key, value, ex=ex))

    async def ping(self) -> bool:
        return bool(await self._call("ping", self.client.ping))

    async def close(self) -> None:
        with contextlib.suppress(Exception):  # closing a dead connection is not worth an error
            await self.client.aclose()


class SingleFlight:
    """One computation per key at a time; concurrent callers of that key share its result.

    ``claim(key)`` returns (future, owner). The owner computes and calls ``resolve``; everyone
    else awaits the future (shielded, so one impatient caller cannot cancel the others' answer).
    """

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Future] = {}

    def __len__(self) -> int:
        return len(self._running)

    def claim(self, key: str) -> tuple[asyncio.Future, bool]:
        running = self._running.get(key)
        if running is not None:
            return running, False
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._running[key] = future
        return future, True

    def resolve(self, key: str, result: object = None, error: BaseException | None = None) -> None:
        future = self._running.pop(key, None)
        if future is None or future.done():
            return
        if error is None:
            future.set_result(result)
        elif isinstance(error, asyncio.CancelledError):
            future.cancel()
        else:
            future.set_exception(error)
