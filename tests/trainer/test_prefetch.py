"""The prefetch stream against a stand-in aligner whose answers the test releases one by one.

The stand-in is a real gRPC server implementing ``FuseStream``; it is a stand-in because these
tests are about the trainer's queue (bounds, order, checks, reconnection), not about fusion.
"""

from __future__ import annotations

import queue
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from fuseserve.launch import wait_until
from fuseserve.trainer.data import Block, pack_blocks
from fuseserve.trainer.prefetch import FED, AlignerFailed, FusedTargetStream, TargetMismatch
from fuseserve.wire.messages import FusedBlock
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc

FP = "target-fingerprint"


class StandIn(aligner_pb2_grpc.AlignerServicer):
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.release = threading.Semaphore(0)
        self.received: list[str] = []
        self.fail_after: int | None = None  # abort the stream (UNAVAILABLE) after this many
        self.corrupt = False
        self.requests: list = []

    def FuseStream(self, request_iterator, context):
        incoming: queue.Queue = queue.Queue()

        def read():  # read ahead, as the real aligner does (up to its in-flight window)
            try:
                for r in request_iterator:
                    self.received.append(r.id)
                    self.requests.append(r)
                    incoming.put(r)
            except grpc.RpcError:
                pass  # the stream was aborted or cancelled
            finally:
                incoming.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            request = incoming.get(timeout=30)
            if request is None:
                return
            if self.fail_after is not None and len(self.received) > self.fail_after:
                self.fail_after = None
                context.abort(grpc.StatusCode.UNAVAILABLE, "stand-in restarting")
            if not self.release.acquire(timeout=30):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "test never released")
            if request.texts:
                ids = np.asarray(
                    self.tokenizer(request.texts[0], add_special_tokens=False)["input_ids"]
                )
            else:  # asked by target ids: answered for exactly those
                ids = np.asarray(request.token_ids[0].ids)
            if self.corrupt:
                ids = ids[::-1].copy()
            n = len(ids)
            block = FusedBlock(
                target_ids=ids.astype(np.int32),
                ids=np.tile(np.arange(2, dtype=np.int32), (n, 1)),
                probs=np.full((n, 2), 0.5, dtype=np.float32),
                chosen=np.zeros(n, dtype=np.int16),
                ce=np.ones(1, dtype=np.float32),
                coverage=np.ones(1, dtype=np.float32),
                teachers=("t",),
            )
            yield aligner_pb2.FusedBlock(
                id=request.id, index=0, block=block.to_bytes(), target_fingerprint=FP
            )


@pytest.fixture
def stand_in(mistral_tok):
    servicer = StandIn(mistral_tok)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    aligner_pb2_grpc.add_AlignerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    for _ in range(64):
        servicer.release.release()
    server.stop(0)


@pytest.fixture(scope="module")
def blocks(mistral_tok, prose):
    return pack_blocks(mistral_tok, [prose[:8000]], block_size=32)


def test_requests_stay_within_depth_and_a_full_queue_hides_a_slow_aligner(stand_in, blocks):
    servicer, address = stand_in
    order = [5, 1, 7, 3, 9, 2, 8, 4]
    stream = FusedTargetStream(address, blocks, iter(order), depth=3, target_fingerprint=FP)
    stream.start()
    try:
        wait_until(lambda: len(servicer.received) == 3, 20, "three requests")
        assert stream.pending() == 3
        # with nothing consumed, no fourth request goes out, however long we look
        for _ in range(3):
            servicer.release.release()
        wait_until(lambda: stream.stats.received == 3, 20, "three answers")
        assert servicer.received == ["5", "1", "7"]
        # the queue is full: the next three gets return at once, in order
        got = [stream.get(blocks[i]) for i in order[:3]]
        assert stream.stats.ready_on_get == [True, True, True] and stream.stats.waits == 0
        assert [g.target_ids[: len(blocks[i].ids)].tolist() for g, i in zip(got, order)] == [
            blocks[i].ids.tolist() for i in order[:3]
        ]
        # consuming freed the slots: the next requests went out
        wait_until(lambda: len(servicer.received) == 6, 20, "three more requests")
        for _ in range(5):
            servicer.release.release()
        rest = [stream.get(blocks[i]) for i in order[3:]]
        assert len(rest) == 5 and servicer.received == [str(i) for i in order]
    finally:
        stream.close()


def test_reconnects_and_asks_again_for_unanswered_blocks(stand_in, blocks):
    servicer, address = stand_in
    servicer.fail_after = 2
    for _ in range(64):
        servicer.release.release()
    order = list(range(6))
    stream = FusedTargetStream(address, blocks, iter(order), depth=4, target_fingerprint=FP)
    stream.start()
    try:
        got = [stream.get(blocks[i]) for i in order]
        assert len(got) == 6 and stream.stats.reconnects == 1
    finally:
        stream.close()


def test_mismatched_tokens_or_tokenizer_fail_loudly(stand_in, blocks):
    servicer, address = stand_in
    for _ in range(64):
        servicer.release.release()
    stream = FusedTargetStream(address, blocks, iter([0]), depth=1, target_fingerprint="other")
    stream.start()
    try:
        with pytest.raises(TargetMismatch, match="target tokenizer"):
            stream.get(blocks[0])
    finally:
        stream.close()
    servicer.corrupt = True
    stream = FusedTargetStream(address, blocks, iter([1]), depth=1, target_fingerprint=FP)
    stream.start()
    try:
        with pytest.raises(TargetMismatch, match="target ids"):
            stream.get(blocks[1])
    finally:
        stream.close()


def test_dead_aligner_is_a_clear_error(blocks):
    stream = FusedTargetStream(
        "127.0.0.1:9", blocks, iter([0]), depth=1, outage_window_s=1, timeout_s=30
    )
    stream.start()
    try:
        with pytest.raises(AlignerFailed, match=r"127\.0\.0\.1:9"):
            stream.get(blocks[0])
    finally:
        stream.close()


def test_every_request_carries_the_runs_fusion_choices(stand_in, blocks):
    servicer, address = stand_in
    for _ in range(64):
        servicer.release.release()
    stream = FusedTargetStream(
        address, blocks, iter([0, 1]), depth=2, target_fingerprint=FP, k=7,
        teachers=["a", "b"], preset="spans", options_json='{"tail": false}',
    )  # fmt: skip
    stream.start()
    try:
        stream.get(blocks[0])
        stream.get(blocks[1])
    finally:
        stream.close()
    assert len(servicer.requests) == 2
    for r in servicer.requests:
        assert (list(r.teachers), r.preset, r.options_json, r.k) == (
            ["a", "b"], "spans", '{"tail": false}', 7,
        )  # fmt: skip


def test_an_aligner_that_is_down_longer_than_get_waits_is_waited_for(mistral_tok, blocks):
    """Nothing listens for 4 s (longer than ``timeout_s``), then an aligner starts on that port:
    the stream waits the outage out, says so, and delivers; nothing fails."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    stream = FusedTargetStream(
        f"127.0.0.1:{port}", blocks, iter([0, 1]), depth=2, target_fingerprint=FP, timeout_s=2
    )
    servicer = StandIn(mistral_tok)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    aligner_pb2_grpc.add_AlignerServicer_to_server(servicer, server)
    stream.start()
    try:
        wait_until(lambda: stream.waiting_out_outage, 10, "the outage noticed")
        got: dict = {}
        consumer = threading.Thread(target=lambda: got.update(first=stream.get(blocks[0])))
        consumer.start()
        consumer.join(4.0)  # twice timeout_s: get() has not given up
        assert consumer.is_alive() and stream.waiting_out_outage
        assert server.add_insecure_port(f"127.0.0.1:{port}") == port
        server.start()
        for _ in range(2):
            servicer.release.release()
        consumer.join(30)
        assert not consumer.is_alive() and "first" in got
        stream.get(blocks[1])
        assert not stream.waiting_out_outage and stream.stats.outage_s >= 4.0
        assert stream.stats.reconnects >= 1
    finally:
        stream.close()
        for _ in range(64):
            servicer.release.release()
        server.stop(0)


def test_fed_places_wait_for_their_blocks_which_go_as_ids(stand_in, blocks):
    """The order 0, FED, FED, 1: block 1 is not asked for before both samples are fed, and the
    samples are asked for by their ids (no text)."""
    servicer, address = stand_in
    for _ in range(64):
        servicer.release.release()
    stream = FusedTargetStream(address, blocks, iter([0, FED, FED, 1]), depth=4)
    stream.start()
    try:
        stream.get(blocks[0])
        wait_until(lambda: servicer.received == ["0"], 20, "the first request")
        samples = [Block(n, "", np.array([5, 6, 7 + n])) for n in range(2)]
        stream.feed(samples[:1])
        assert stream.get(samples[0], fed=True).target_ids.tolist() == [5, 6, 7]
        assert servicer.received == ["0", "fed-0"]  # block 1 waits behind the second place
        stream.feed(samples[1:])
        assert stream.get(samples[1], fed=True).target_ids.tolist() == [5, 6, 8]
        stream.get(blocks[1])
        assert servicer.received == ["0", "fed-0", "fed-1", "1"]
        fed = [r for r in servicer.requests if r.id.startswith("fed")]
        assert all(not r.texts and len(r.token_ids) == 1 for r in fed)
    finally:
        stream.close()
