"""Benchmark: how much of a teacher's knowledge survives alignment onto the target's vocabulary.

For each shipped teacher (SmolLM2-135M; Gemma 3 270M when its optional package is installed) and
each preset (``fusellm``, ``default``, ``spans``), on held-out text from outside the experiment
corpus (``fuseserve.experiment.corpus.OOD_DOMAINS``: Debian's licence texts, pip's sources, NumPy's
C headers), cut into blocks of Mistral v1 (target) tokens:

- the teacher scores each block (in this process, ``HFBackend``, top-k = 10, as the experiments);
- the aligner core turns its scores into one row per target position (``fuse_block``, one
  teacher), exactly what the trainer is taught;
- **fused-row BPB**: bits of the actual next target token under its row (its listed probability,
  or the row's tail spread evenly over the target ids the row does not list), over the bytes;
- **teacher BPB**: the teacher's own bits (its gold log-probs) on exactly the same bytes (both
  counted from the first byte offset, past each side's first token, where both tokenizers start a
  token), the baseline measured in the same run.

The gap fused − teacher is what alignment loses (> 0) or invents (< 0: e.g. a one-hot fallback on
the actual next token is a free answer). A row that gives the actual token no mass at all (top-k
renormalised, no tail) is counted at ``FLOOR`` and reported as a count.

Also the whitespace-run statistic (issue #25, item 5): the mass rows put on a run of spaces that
the target tokenizer would not produce at that position before the word that follows there
(three spaces before ``return``, which Mistral v1 reads as two spaces and `` return``), per
position whose actual next target token is a run of spaces.

Usage: python bench/bench_fidelity.py [--chars 12000] [--block 256] [--teachers smollm2,gemma3-270m]
       [--presets fusellm,default,spans] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FLOOR = 2.0**-30  # probability counted for an actual token a row gives no mass at all
K = 10
TEACHERS = {"smollm2": "shipped:smollm2", "gemma3-270m": "shipped:gemma3-270m"}


@dataclass
class Tally:
    """Sums over blocks for one (teacher, preset, domain)."""

    fused_bits: float = 0.0
    teacher_bits: float = 0.0
    nbytes: int = 0
    zero: int = 0  # positions where the row gave the actual token no mass
    positions: int = 0
    ws_mass: float = 0.0  # mass on runs of spaces the target would not produce there
    ws_positions: int = 0  # positions whose actual next token is a run of spaces
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        fused, teacher = self.fused_bits / self.nbytes, self.teacher_bits / self.nbytes
        return {
            "fused_bpb": fused,
            "teacher_bpb": teacher,
            "gap": fused - teacher,
            "bytes": self.nbytes,
            "zero_mass_positions": self.zero,
            "positions": self.positions,
            "unproducible_space_mass": self.ws_mass,
            "unproducible_space_mass_per_run_position": self.ws_mass / max(self.ws_positions, 1),
            "ws_positions": self.ws_positions,
        }


def heldout_blocks(target_tok, chars: int, block: int) -> dict[str, list]:
    """domain -> blocks (``fuseserve.trainer.data.Block``) of the out-of-distribution text."""
    from fuseserve.experiment.config import CorpusConfig
    from fuseserve.experiment.corpus import deal_ood
    from fuseserve.trainer.data import pack_blocks

    texts = deal_ood(CorpusConfig(ood=("prose", "code", "c"), ood_chars=chars))
    return {d.removeprefix("ood-"): pack_blocks(target_tok, t, block) for d, t in texts.items()}


def common_start(target_ends: np.ndarray, teacher_ends: np.ndarray, first_text: int) -> int:
    """The first byte offset past both sides' first token at which both end a token."""
    lowest = max(int(target_ends[0]), int(teacher_ends[first_text]))
    shared = np.intersect1d(target_ends[target_ends >= lowest], teacher_ends)
    return int(shared[0]) if len(shared) else -1


def actual_token_bits(fused, target_ids: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """[n-1] bits of each next target token under the row before it, and [n-1] bool: the row
    gave it no mass (counted at FLOOR)."""
    ids, probs, tail = fused.ids[:-1], fused.probs[:-1].astype(np.float64), fused.tail[:-1]
    nxt = np.asarray(target_ids[1:], dtype=np.int64)
    hit = ids == nxt[:, None]
    listed = (ids >= 0).sum(axis=1)
    p = np.where(hit.any(axis=1), (probs * hit).sum(axis=1), tail / np.maximum(vocab - listed, 1))
    zero = p <= 0
    return -np.log2(np.where(zero, FLOOR, p)), zero


def unproducible_space_mass(text, fused, target_ids, target_ends, target) -> tuple:
    """[n-1] mass each row puts on runs of spaces that the target tokenizer would not produce
    there, and [n-1] bool: the target's actual next token is a run of spaces.

    A run of c spaces is "not produced there" when the target tokenizer, reading c spaces and
    then the text that actually follows the whitespace at that position, does not start with
    that run (Mistral v1 reads three spaces before "return" as two spaces and " return"): the
    row teaches a first token the target never emits before that word. A shorter or longer
    run it would emit (four spaces where the text has eight) is the teacher's own uncertainty
    and is not counted."""
    data = text.encode("utf-8", "surrogatepass")
    runs = target.space_runs
    ids, probs = fused.ids[:-1], fused.probs[:-1].astype(np.float64)
    mass = np.zeros(len(ids))
    for r in range(len(ids)):
        cand = [(c, p) for c, p in zip(ids[r], probs[r]) if c >= 0 and c in runs]
        if not cand:
            continue
        after = data[int(target_ends[r]) :].lstrip(b" \t")[:12].decode("utf-8", "ignore")
        for c, p in cand:
            if c != target_ids[r + 1] and not target.emits_run(int(c), after):
                mass[r] += p
    actual_runs = np.array([int(t) in runs for t in target_ids[1:]], dtype=bool)
    return mass, actual_runs


def score_block(backend, text: str):
    """The teacher's scores of one block (its tokenizer's default BOS, as the aligner asks)."""
    return backend.score([backend.tokenize(text, None, truncate=False)], K)[0]


@dataclass
class Target:
    """The target tokenizer (Mistral v1) and its view."""

    tok: Any
    view: Any

    @property
    def space_runs(self) -> dict[int, int]:
        """Target ids whose surface is a run of spaces -> its length."""
        if not hasattr(self, "_runs"):
            surfaces = self.view.surfaces
            self._runs = {i: len(s) for i, s in enumerate(surfaces) if s and s.strip(" ") == ""}
        return self._runs

    def emits_run(self, run_id: int, after: str) -> bool:
        """Whether the target tokenizer starts "<the run's spaces><after>" (after a newline)
        with that run."""
        key = (run_id, after)
        cache = self.__dict__.setdefault("_emits", {})
        if key not in cache:
            spaces = " " * self.space_runs[run_id]
            ids = self.tok("\n" + spaces + after, add_special_tokens=False)["input_ids"]
            surfaces = [self.view.surfaces[i] for i in ids]
            first = next((i for i, s in zip(ids, surfaces) if s != "\n"), -1)
            cache[key] = first == run_id
        return bool(cache[key])

    def encode(self, text: str):
        """(ids [n], char offsets [n, 2], byte context ends [n])."""
        from fuseserve.aligner.tokenview import context_ends

        enc = self.tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return ids, offsets, context_ends(ids, offsets, text, self.view)


@dataclass
class Teacher:
    """A teacher in this process: its backend, view, vocabulary maps and continuation table."""

    name: str
    backend: Any
    view: Any
    maps: dict
    table: Any

    def input(self, scores, options):
        from fuseserve.aligner.pipeline import TeacherInput

        vmap = self.maps[str(options.strings)]
        return TeacherInput(self.name, self.view, vmap, scores, self.table)


def load_teacher(name: str, spec: str, target: Target, store) -> Teacher:
    from fuseserve.aligner.continuation import hf_first_tokens
    from fuseserve.aligner.tokenview import TokenizerView
    from fuseserve.aligner.vocabmap import StringMode
    from fuseserve.teacher.hf_backend import HFBackend

    backend = HFBackend.load(spec, tokenizer_spec=spec, device="cpu", dtype="float32", max_k=K)
    view = TokenizerView.from_hf(backend.tokenizer, name)
    maps = {str(m): store.get_or_build(view, target.view, m) for m in StringMode}
    table = store.get_or_build_continuations(view, target.view, hf_first_tokens(target.tok))
    return Teacher(name, backend, view, maps, table)


def measure_block(text: str, target: Target, teacher: Teacher, scores, options) -> tuple | None:
    """(fused bits, teacher bits, bytes, zero count, positions, ws mass, ws positions) of one
    block from ``common_start`` on; None when the block has no common start."""
    from fuseserve.aligner.pipeline import fuse_block
    from fuseserve.aligner.tokenview import context_ends

    target_ids, offsets, target_ends = target.encode(text)
    s_ends = context_ends(scores.token_ids, scores.offsets, text, teacher.view)
    start = common_start(target_ends, s_ends, int(np.argmax(s_ends > 0)))
    if start < 0:
        return None
    inputs = [teacher.input(scores, options)]
    fused = fuse_block(text, target.view, target_ids, offsets, inputs, options)
    bits, zero = actual_token_bits(fused, target_ids, target.view.vocab_size)
    counted = target_ends[:-1] >= start  # rows predicting tokens after ``start``
    gold = np.asarray(scores.gold_logprobs, dtype=np.float64)
    t_counted = (s_ends[:-1] >= start) & np.isfinite(gold[:-1])
    ws_mass, ws_next = unproducible_space_mass(text, fused, target_ids, target_ends, target)
    return (
        float(bits[counted].sum()),
        float(-gold[:-1][t_counted].sum() / math.log(2)),
        len(text.encode("utf-8", "surrogatepass")) - start,
        int(zero[counted].sum()),
        int(counted.sum()),
        float(ws_mass[counted].sum()),
        int(ws_next[counted].sum()),
    )


def run(args) -> dict:
    """Every (teacher, preset, domain) tally; teachers are loaded one at a time."""
    from fuseserve import shipped
    from fuseserve.aligner.options import FusionOptions
    from fuseserve.aligner.tokenview import TokenizerView
    from fuseserve.aligner.vocabmap_store import VocabMapStore

    tok = shipped.mistral_v1_tokenizer()
    target = Target(tok, TokenizerView.from_hf(tok, "mistral-v1"))
    blocks = heldout_blocks(tok, args.chars, args.block)
    store = VocabMapStore(shipped.cache_dir() / "vocab-maps")
    results: dict = {}
    for name in args.teachers:
        try:
            shipped.check_installed(TEACHERS[name])
        except shipped.ShippedAssetMissing as exc:
            print(f"skipping {name}: {exc}", flush=True)
            continue
        teacher = load_teacher(name, TEACHERS[name], target, store)
        for domain, domain_blocks in blocks.items():
            started = time.perf_counter()
            scored = [(b.text, score_block(teacher.backend, b.text)) for b in domain_blocks]
            took = time.perf_counter() - started
            print(f"{name} scored {len(scored)} {domain} blocks in {took:.1f} s", flush=True)
            for preset in args.presets:
                options = FusionOptions.preset(preset)
                tally = Tally()
                for text, scores in scored:
                    part = measure_block(text, target, teacher, scores, options)
                    if part is not None:
                        _add(tally, part)
                results.setdefault(name, {}).setdefault(preset, {})[domain] = tally.row()
        del teacher
    return results


def _add(t: Tally, part: tuple) -> None:
    t.fused_bits += part[0]
    t.teacher_bits += part[1]
    t.nbytes += part[2]
    t.zero += part[3]
    t.positions += part[4]
    t.ws_mass += part[5]
    t.ws_positions += part[6]


def print_table(results: dict) -> None:
    print(
        "\n| teacher | preset | domain | teacher BPB | fused-row BPB | fused − teacher | "
        "rows without the actual token | unproducible space-run mass per run position |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, presets in results.items():
        for preset, domains in presets.items():
            for domain, r in domains.items():
                print(
                    f"| {name} | {preset} | {domain} | {r['teacher_bpb']:.4f} | "
                    f"{r['fused_bpb']:.4f} | {r['gap']:+.4f} | "
                    f"{r['zero_mass_positions']} / {r['positions']} | "
                    f"{r['unproducible_space_mass_per_run_position']:.3f} ({r['ws_positions']}) |"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chars", type=int, default=12_000, help="characters per domain")
    parser.add_argument("--block", type=int, default=256, help="target tokens per block")
    parser.add_argument("--teachers", default="smollm2,gemma3-270m")
    parser.add_argument("--presets", default="fusellm,default,spans")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.teachers = [t for t in args.teachers.split(",") if t]
    args.presets = [p for p in args.presets.split(",") if p]
    unknown = [t for t in args.teachers if t not in TEACHERS]
    if unknown:
        sys.exit(f"error: --teachers: unknown {unknown}; known: {list(TEACHERS)}")
    print(f"{platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}")
    results = run(args)
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
