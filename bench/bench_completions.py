"""Benchmark: the vLLM-compatible ``POST /v1/completions`` (prompt_logprobs) against the aligner's
own ``POST /v1/fuse`` for the same 2048-token sequence, in one run.

Setup: two ``fuseserve teacher`` processes serving tiny Llama models (fixed seed; Mistral v1
SentencePiece and SmolLM2 byte-level BPE) and the aligner as a ``fuseserve aligner`` process
(target Mistral v1, preset spans, in-process LRU cache). Sequences: consecutive 2048-token spans
of the Python docs (pydoc_data), as target ids (BOS first), sent as ids on both endpoints.

Measured per sequence (seconds per answer, decoded by the caller with ``json.loads``):
- cold: nothing cached (teachers compute); ``/v1/fuse`` and ``/v1/completions`` each get their
  own sequences (the same count, alternating), so neither warms the other's cache;
- warm: the fused blocks cached; the same sequences asked again of both endpoints, alternating.
Baseline: ``/v1/fuse`` with ``token_ids``, ``top`` = K, JSON (the same content as the completions
answer), and the binary answer for reference. Ratio = completions / fuse JSON (goal <= 1.2).

Usage: python bench/bench_completions.py [--sequences 6] [--k 5] [--repeats 3]
Exit status 1 when the warm ratio misses the goal.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from bench_aligner import start_tiny_teachers

from fuseserve import launch, shipped
from fuseserve.wire.fuse_reply import MEDIA_TYPE

LENGTH = 2048
GOAL = 1.2


def make_sequences(tokenizer, count: int) -> list[list[int]]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    step = LENGTH - 1
    if len(ids) < count * step:
        raise SystemExit(f"corpus too small for {count} sequences")
    return [[tokenizer.bos_token_id, *ids[i * step : (i + 1) * step]] for i in range(count)]


def timed(client: httpx.Client, path: str, body: dict, binary: bool = False) -> float:
    headers = {"accept": MEDIA_TYPE} if binary else {}
    start = time.perf_counter()
    response = client.post(path, json=body, headers=headers)
    if response.status_code != 200:
        raise SystemExit(f"{path}: {response.status_code} {response.text[:300]}")
    if not binary:
        json.loads(response.content)
    return time.perf_counter() - start


def bodies(seq: list[int], k: int) -> dict[str, dict]:
    return {
        "fuse": {"token_ids": [seq], "top": k, "preset": "spans"},
        "completions": {"prompt": seq, "max_tokens": 1, "prompt_logprobs": k},
    }


def measure(port: int, seqs: list[list[int]], k: int, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"fuse cold": [], "completions cold": [], "fuse": [],
                                     "fuse binary": [], "completions": []}  # fmt: skip
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        for i, seq in enumerate(seqs):  # cold: each endpoint its own sequences
            kind = "fuse" if i % 2 == 0 else "completions"
            path = "/v1/fuse" if kind == "fuse" else "/v1/completions"
            times[f"{kind} cold"].append(timed(client, path, bodies(seq, k)[kind]))
        for _ in range(repeats):  # warm: every sequence is cached now, for both endpoints
            for seq in seqs:
                body = bodies(seq, k)
                times["completions"].append(timed(client, "/v1/completions", body["completions"]))
                times["fuse"].append(timed(client, "/v1/fuse", body["fuse"]))
                times["fuse binary"].append(timed(client, "/v1/fuse", body["fuse"], binary=True))
    return times


def start(work: Path) -> tuple[dict, launch.ServiceProcess]:
    toks = {"spm": shipped.mistral_v1_tokenizer(), "bpe": shipped.smollm2_tokenizer()}
    procs: dict = {}
    start_tiny_teachers(work, toks, procs)
    teachers = {n: [f"127.0.0.1:{p.port}"] for n, p in procs.items()}
    extra = ["--preset", "spans", "--vocab-map-dir", str(work / "maps"), "--info-refresh-s", "0"]
    aligner = launch.start_aligner(teachers, work / "logs", extra=extra)
    url = f"http://127.0.0.1:{aligner.rest_port}/readyz"

    def ready() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    launch.wait_until(ready, 600, "the aligner's readiness", 0.5, alive=aligner.check_alive)
    return procs, aligner


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=6)
    parser.add_argument("--k", type=int, default=5, help="prompt_logprobs / top")
    parser.add_argument("--repeats", type=int, default=3, help="warm rounds")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-completions-"))
    seqs = make_sequences(shipped.mistral_v1_tokenizer(), args.sequences)
    procs, aligner = start(work)
    try:
        times = measure(aligner.rest_port, seqs, args.k, args.repeats)
    finally:
        aligner.stop()
        for proc in procs.values():
            proc.stop()
    when = time.strftime("%Y-%m-%d")
    print(f"{platform.machine()}, {platform.node()}, {when}: {len(seqs)} sequences of {LENGTH} ")
    print(f"Mistral v1 ids, 2 teachers, K = {args.k}")
    med = {name: 1000 * statistics.median(values) for name, values in times.items()}
    print("| | /v1/fuse JSON (top K) | /v1/fuse binary | /v1/completions | ratio |")
    print("|---|---|---|---|---|")
    cold = med["completions cold"] / med["fuse cold"]
    warm = med["completions"] / med["fuse"]
    print(f"| cold ms | {med['fuse cold']:.0f} | | {med['completions cold']:.0f} | {cold:.2f}x |")
    print(
        f"| warm ms | {med['fuse']:.1f} | {med['fuse binary']:.1f} | {med['completions']:.1f} "
        f"| {warm:.2f}x |"
    )
    verdict = "met" if warm <= GOAL else "MISSED"
    print(f"goal: completions / fuse <= {GOAL}x (medians): {verdict}")
    return 0 if warm <= GOAL else 1


if __name__ == "__main__":
    raise SystemExit(main())
