"""Fused targets for a worker's upcoming blocks, streamed from the aligner into a bounded queue.

Covers one background gRPC ``FuseStream`` per worker (through ``fuseserve.client.GrpcClient``):
blocks are requested in the order the worker will train on them, at most ``depth`` ahead of the
consumer (requested but not yet consumed), so a step does not wait when the aligner keeps up and
memory stays bounded when it does not. Each answer is checked: the block id, the target tokenizer
fingerprint, and the target ids against the trainer's own. A stream broken by a retryable failure
(the aligner down or restarting, a teacher down behind it, load shedding) is an outage, not a
failure: it is reopened with backoff (up to 10 s) until ``outage_window_s`` has passed, with a log
line when it starts, every 30 s and when targets flow again, and the unanswered blocks are asked
again; the consumer waits meanwhile (nothing is trained in place of the fused targets). Any other
failure fails at once. Time spent waiting in ``get`` is measured.

The order holds block indices (a training block, asked for by its text) and ``FED`` markers:
the place of a block that exists only once the trainer has made it (an on-policy sample). The
stream asks for nothing past a marker until ``feed`` has handed it a block; a fed block is asked
for by its target ids (``token_ids``), so the aligner scores exactly the sampled tokens.

Leaves out: the loss and the model; the aligner itself.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np

from fuseserve.client import FuseParams, GrpcClient, retryable
from fuseserve.trainer.data import Block
from fuseserve.wire import convert
from fuseserve.wire.messages import FusedBlock
from fuseserve.wire.v1 import aligner_pb2

if TYPE_CHECKING:
    from fuseserve.client.grpc_client import StreamCall

log = logging.getLogger(__name__)


FED = "fed"  # in an order: the next block comes from ``FusedTargetStream.feed``


def request_key(item: int | Block) -> str:
    """The request id of an order item: a block index, or ``fed-N`` for a fed block."""
    return str(item) if isinstance(item, int) else f"fed-{item.index}"


class TargetMismatch(RuntimeError):
    """The aligner answered for other tokens or another target tokenizer."""


class AlignerFailed(RuntimeError):
    """The aligner stream failed for good (after retries) or refused a block."""


@dataclass
class PrefetchStats:
    received: int = 0
    consumed: int = 0
    waits: int = 0  # get() calls that found nothing ready
    wait_s: float = 0.0
    cache_hits: int = 0
    reconnects: int = 0
    outage_s: float = 0.0  # time spent reconnecting after retryable failures (ended outages)
    ready_on_get: list[bool] = field(default_factory=list)


class FusedTargetStream:
    def __init__(
        self,
        address: str,
        blocks: Sequence[Block],
        order: Iterator[int | str],
        depth: int = 8,
        target_fingerprint: str | None = None,
        k: int = 0,
        teachers: Sequence[str] = (),
        preset: str = "",
        options_json: str = "",
        float_dtype: str = "f16",
        timeout_s: float = 300.0,
        outage_window_s: float = 900.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError("prefetch_depth must be >= 1")
        self.address = address
        self.blocks = blocks
        self.order = order
        self.depth = depth
        self.target_fingerprint = target_fingerprint
        self.params = FuseParams(
            k=k, preset=preset, options=options_json, teachers=tuple(teachers),
            float_dtype=float_dtype,
        )  # fmt: skip
        self.timeout_s = timeout_s
        self.outage_window_s = outage_window_s
        self._outage_since: float | None = None  # monotonic time the current outage began
        self._outage_logged = 0.0
        self.stats = PrefetchStats()
        self._slots = threading.Semaphore(depth)
        self._ready: queue.Queue = queue.Queue()
        self._pending: collections.deque[int | Block] = collections.deque()  # sent, unanswered
        self._fed: queue.Queue[Block] = queue.Queue()  # fed blocks not asked for yet
        self._fed_event = threading.Event()
        self._peeked: int | str | None = None  # an order item taken but not asked for yet
        self._lock = threading.Lock()
        self._outstanding = 0
        self._generation = 0  # one per stream opened; see _requests
        self._closed = threading.Event()
        self._call: StreamCall | None = None
        # credentials: TLS (grpc_channel.channel_credentials); api_key: the aligner's bearer key;
        # neither given: both from FUSESERVE_CLIENT_* (how a Ray worker's pod configures them)
        self._client = GrpcClient(
            address, credentials, api_key, timeout_s=timeout_s, max_message_bytes=max_message_bytes
        )
        self._thread = threading.Thread(target=self._run, name="fused-prefetch", daemon=True)

    # ------------------------------------------------------------------ producer side
    def start(self) -> FusedTargetStream:
        self._thread.start()
        return self

    def feed(self, blocks: Sequence[Block]) -> None:
        """Blocks for the next ``FED`` places of the order, in order (asked for by their ids)."""
        for block in blocks:
            self._fed.put(block)
        self._fed_event.set()

    def _requests(self, resend: list[int | Block], generation: int):
        """Requests of one stream: the unanswered ones again, then new ones as slots free up.

        A stream that broke may leave its generator running in gRPC's sending thread; the
        ``generation`` check (under the lock that also snapshots ``resend``) stops it from taking
        an index that the next stream would then never send."""
        for sent in resend:
            yield self._request(sent)
        while not self._closed.is_set() and self._generation == generation:
            if not self._slots.acquire(timeout=0.5):
                continue
            with self._lock:
                if self._generation != generation:
                    self._slots.release()
                    return
                try:
                    item = self._take()
                except StopIteration:
                    return
                if item is not None:
                    self._pending.append(item)
                    self._outstanding += 1
            if item is None:  # the order waits for a fed block
                self._slots.release()
                self._fed_event.wait(0.05)
                self._fed_event.clear()
                continue
            yield self._request(item)

    def _take(self) -> int | Block | None:
        """The next order item to ask for (None: its fed block has not come yet); under the lock."""
        if self._peeked is None:
            self._peeked = next(self.order)
        if self._peeked == FED:
            try:
                item: int | Block = self._fed.get_nowait()
            except queue.Empty:
                return None
        else:
            item = int(self._peeked)
        self._peeked = None
        return item

    def _request(self, item: int | Block) -> aligner_pb2.FuseRequest:
        key = request_key(item)
        if isinstance(item, int):
            return self.params.grpc_request(key, [self.blocks[item].text])
        return self.params.grpc_request(key, [], token_ids=[item.ids.tolist()])

    def _run(self) -> None:
        attempts = 0
        while not self._closed.is_set():
            with self._lock:
                self._generation += 1
                generation = self._generation
                resend = list(self._pending)
            try:
                # no deadline on the whole stream (it lasts the run): get() bounds each wait
                self._call = self._client.stream(self._requests(resend, generation))
                for reply in self._call:
                    attempts = 0
                    self._outage_over()
                    with self._lock:
                        expected = self._pending.popleft() if self._pending else None
                    key = None if expected is None else request_key(expected)
                    if reply.id != key:
                        raise AlignerFailed(f"aligner answered block {reply.id}, expected {key}")
                    self.stats.received += 1
                    self.stats.cache_hits += int(reply.cache_hit)
                    self._ready.put((expected, reply))
                return  # the order ran out and every answer arrived
            except grpc.RpcError as exc:
                if self._closed.is_set():
                    return
                code = exc.code() if hasattr(exc, "code") else None
                problem = f"{code.name if code else 'UNKNOWN'} {exc.details()}"
                if retryable(exc) and self._outage_goes_on(problem):
                    attempts += 1
                    self.stats.reconnects += 1
                    self._closed.wait(min(0.5 * 2 ** (attempts - 1), 10.0))
                    continue
                self._ready.put(AlignerFailed(f"aligner at {self.address}: {problem}"))
                return
            except Exception as exc:  # deliver any failure to the consumer instead of hanging
                self._ready.put(exc)
                return

    def _outage_goes_on(self, problem: str) -> bool:
        """A retryable failure: start or continue the outage; False once it has lasted
        ``outage_window_s`` (the run then fails with the last problem)."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = self._outage_logged = now
            log.warning(
                "waiting for fused targets: aligner at %s: %s (waiting up to %.0fs)",
                self.address, problem, self.outage_window_s,
            )  # fmt: skip
        elif now - self._outage_logged >= 30.0:
            self._outage_logged = now
            log.warning(
                "still waiting for fused targets after %.0fs: %s", now - self._outage_since, problem
            )
        if now - self._outage_since < self.outage_window_s:
            return True
        log.error("no fused targets for %.0fs (outage_window_s): giving up", self.outage_window_s)
        return False

    def _outage_over(self) -> None:
        if self._outage_since is not None:
            lasted = time.monotonic() - self._outage_since
            self.stats.outage_s += lasted
            self._outage_since = None
            log.warning("fused targets flow again after %.1fs", lasted)

    @property
    def waiting_out_outage(self) -> bool:
        """Whether the stream is reconnecting after a retryable failure right now."""
        return self._outage_since is not None

    # ------------------------------------------------------------------ consumer side
    def get(self, expected: Block, fed: bool = False) -> FusedBlock:
        """The fused block for ``expected`` (the next block in order: a training block, or with
        ``fed`` the block handed to ``feed``), waiting if needed."""
        start = time.perf_counter()
        ready = not self._ready.empty()
        item = self._next_item(expected)
        waited = time.perf_counter() - start
        self.stats.ready_on_get.append(ready)
        if not ready:
            self.stats.waits += 1
            self.stats.wait_s += waited
        if isinstance(item, Exception):
            raise item
        self._slots.release()
        with self._lock:
            self._outstanding -= 1
        sent, reply = item
        self.stats.consumed += 1
        index = request_key(expected if fed else expected.index)
        if request_key(sent) != index:
            raise AlignerFailed(
                f"prefetch order broken: got block {request_key(sent)}, expected {index}"
            )
        if self.target_fingerprint and reply.target_fingerprint != self.target_fingerprint:
            raise TargetMismatch(
                f"aligner target tokenizer {reply.target_fingerprint} != trainer's "
                f"{self.target_fingerprint}: point both at the same target tokenizer"
            )
        fused = convert.fused_block_from_pb(reply)
        n = len(expected.ids)
        if len(fused.target_ids) < n or not np.array_equal(fused.target_ids[:n], expected.ids):
            raise TargetMismatch(
                f"block {index}: the aligner's target ids differ from the trainer's"
            )
        return fused

    def _next_item(self, expected: Block):
        """The next answer (or failure) of the producer: within ``timeout_s``, a bound that
        restarts while the producer waits out an outage (it gives up on its own)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return self._ready.get(timeout=min(1.0, self.timeout_s))
            except queue.Empty:
                now = time.monotonic()
                if self.waiting_out_outage:
                    deadline = now + self.timeout_s
                elif now >= deadline:
                    raise AlignerFailed(
                        f"no fused target for block {expected.index} from {self.address} "
                        f"within {self.timeout_s:.0f}s"
                    ) from None

    def pending(self) -> int:
        """Blocks requested or ready but not consumed yet (never more than ``depth``)."""
        with self._lock:
            return self._outstanding

    def close(self) -> None:
        self._closed.set()
        if self._call is not None:
            self._call.cancel()
        self._client.close()
        self._thread.join(5)
