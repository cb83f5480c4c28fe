"""Benchmark: served teacher throughput vs in-process forward + top-k on the same batches.

For each model and sequence length: 8 texts of L tokens. Baseline: ``HFBackend.score`` called
directly on batches of those 8 sequences. Served: a real gRPC teacher server (in this process,
its own event loop thread) with 8 concurrent client threads, each sending one text per request;
the dynamic batcher merges them. Both run ``rounds`` times; tokens/s and the ratio are printed,
plus payload bytes per token of a Score reply at k = 10 (f32 and f16).

Usage: python bench/bench_teacher.py [--models tiny,smollm2] [--lengths 512,2048] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from fuseserve.wire.v1 import teacher_pb2, teacher_pb2_grpc


def corpus(n_chars: int) -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    return (text * (n_chars // len(text) + 1))[:n_chars]


def make_texts(backend, length: int, count: int) -> list[str]:
    text = corpus(length * count * 8)
    out, pos = [], 0
    for _ in range(count):
        chunk = text[pos : pos + length * 6]
        item = backend.tokenize(chunk, None, truncate=True)
        end = int(item.offsets[min(length, len(item.ids)) - 1, 1])
        out.append(chunk[:end])
        pos += length * 6
    return out


def model_spec(model: str) -> str:
    """The model spec of a ``--models`` name: ``tiny`` (built here), ``smollm2`` (shipped)."""
    if model == "tiny":
        from fuseserve import shipped
        from fuseserve.teacher.tiny import save_tiny_llama

        folder = save_tiny_llama(shipped.mistral_v1_tokenizer(), tempfile.mkdtemp(), seed=0)
        return str(folder)
    return "shipped:smollm2"


def served(backend, texts: list[str], length: int, rounds: int, k: int, concurrency: int):
    """(seconds for ``rounds`` of ``texts`` through a gRPC teacher serving ``backend`` with
    ``concurrency`` client threads, {f32/f16: Score reply bytes per token at k = 10})."""
    from fuseserve.teacher.server import start_server
    from fuseserve.teacher.settings import TeacherSettings

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    settings = TeacherSettings(
        port=0,
        metrics_port=0,
        batch_token_budget=concurrency * length,
        batch_wait_ms=5,
        max_sequence_length=length,
        max_k=64,
    )

    async def up():
        running = await start_server(settings)
        await running.set_backend(backend)
        return running

    running = asyncio.run_coroutine_threadsafe(up(), loop).result()
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stub = teacher_pb2_grpc.TeacherStub(channel)
    sizes = {}
    for dtype in ("f32", "f16"):
        request = teacher_pb2.ScoreRequest(texts=texts[:1], k=10, float_dtype=dtype)
        reply = next(iter(stub.Score(request, timeout=600)))
        sizes[dtype] = reply.ByteSize() / reply.num_tokens

    def call(text):
        return list(stub.Score(teacher_pb2.ScoreRequest(texts=[text], k=k), timeout=600))

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for _ in range(rounds):
            list(pool.map(call, texts))
    served_s = time.perf_counter() - start
    channel.close()
    asyncio.run_coroutine_threadsafe(running.stop(1.0), loop).result()
    loop.call_soon_threadsafe(loop.stop)
    return served_s, sizes


def run(
    model: str,
    length: int,
    rounds: int,
    k: int,
    concurrency: int,
    spec: str | None = None,
    device: str = "auto",
) -> dict:
    """One model at one length: in-process vs served. ``spec``: the model to load (default:
    ``model_spec(model)``); ``device``: the backend's ("auto": CUDA when there is one, bf16)."""
    from fuseserve.teacher.hf_backend import HFBackend

    spec = spec or model_spec(model)
    backend = HFBackend.load(spec, device=device, max_sequence_length=length, max_k=64)
    texts = make_texts(backend, length, concurrency)
    items = [backend.tokenize(t, None, truncate=True) for t in texts]
    tokens = sum(len(i.ids) for i in items)

    backend.score(items[:1], k)  # warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        backend.score(items, k)
    base_s = time.perf_counter() - start
    served_s, sizes = served(backend, texts, length, rounds, k, concurrency)
    return {
        "model": model,
        "length": length,
        "tokens_per_round": tokens,
        "in_process_tok_s": tokens * rounds / base_s,
        "served_tok_s": tokens * rounds / served_s,
        "ratio": base_s / served_s,
        "bytes_per_token_f32": sizes["f32"],
        "bytes_per_token_f16": sizes["f16"],
        "device": backend.info.device,
        "dtype": backend.info.dtype,
    }


def main(argv=None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--lengths", default="512,2048")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    print(f"# teacher throughput ({platform.machine()}, {os.cpu_count()} cpus, CPU fp32)")
    print(
        "| model | tokens/seq | in-process tok/s | served tok/s | ratio | target | B/token k=10 |"
    )
    print("|---|---|---|---|---|---|---|")
    ok = True
    for model in args.models.split(","):
        for length in (int(x) for x in args.lengths.split(",")):
            r = run(model, length, args.rounds, args.k, args.concurrency)
            ok &= r["ratio"] >= 0.9
            print(
                f"| {model} | {length} | {r['in_process_tok_s']:.0f} | {r['served_tok_s']:.0f} | "
                f"{r['ratio']:.2f} | >= 0.9 | {r['bytes_per_token_f32']:.0f} / "
                f"{r['bytes_per_token_f16']:.0f} |",
                flush=True,
            )
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
