"""Write the fused blocks of fixed inputs to a .npz, to check that a refactor of the fusion code
changes nothing: run it on two commits and compare the files array by array.

Inputs: four texts (the Python docs' language reference and a code snippet) on the real Mistral v1
(target) and SmolLM2 tokenizers, synthetic seeded teacher scores (tests/aligner/test_pipeline.py's
``fake_scores``), both string modes, presets default / spans / fusellm, MinCE / AvgCE, sequence /
token level where the preset allows it: 80 blocks.

Usage (the repository root on PYTHONPATH, for the tests' helpers):
    PYTHONPATH=. python scripts/fused_outputs.py OUT.npz
"""

from __future__ import annotations

import itertools
import pydoc_data.topics
import sys

import numpy as np
from pydantic import ValidationError

from fuseserve import shipped
from fuseserve.aligner.continuation import build_continuation_table, hf_first_tokens
from fuseserve.aligner.options import FusionOptions
from fuseserve.aligner.pipeline import TeacherInput, fuse_block
from fuseserve.aligner.tokenview import TokenizerView
from fuseserve.aligner.vocabmap import StringMode, build_vocab_map
from tests.aligner.test_pipeline import fake_scores
from tests.conftest import encode

FIELDS = ("ids", "probs", "tail", "chosen", "ce", "coverage")


def main(path: str) -> None:
    mt, st = shipped.mistral_v1_tokenizer(), shipped.smollm2_tokenizer()
    mistral, smol = TokenizerView.from_hf(mt, "mistral-v1"), TokenizerView.from_hf(st, "smollm2")
    topics = pydoc_data.topics.topics
    code = "def f(x):\n    return x ** 2  # ünïcode ✓\n" * 20
    texts = [topics["assignment"][:3000], topics["for"][:2000], topics["class"][:2500], code]
    first = hf_first_tokens(mt)
    tables = [
        build_continuation_table(t, mistral, build_vocab_map(t, mistral, StringMode.SURFACE), first)
        for t in (smol, mistral)
    ]
    out: dict[str, np.ndarray] = {}
    for mode in ("surface", "fusellm"):
        maps = [build_vocab_map(t, mistral, StringMode(mode)) for t in (smol, mistral)]
        for i, text in enumerate(texts):
            t_ids, t_off = encode(mt, text)
            scores = [
                fake_scores(st, text, smol.vocab_size, 10, seed=i),
                fake_scores(mt, text, mistral.vocab_size, 10, seed=100 + i),
            ]
            inputs = [
                TeacherInput(name, view, vmap, s, table)
                for name, view, vmap, s, table in zip(
                    ("smol", "mistral"), (smol, mistral), maps, scores, tables
                )
            ]
            grid = itertools.product(
                ("default", "spans", "fusellm"), ("min_ce", "avg_ce"), ("sequence", "token")
            )
            for preset, method, level in grid:
                try:
                    options = FusionOptions.preset(preset, method=method, level=level, strings=mode)
                except ValidationError:  # a combination the preset does not allow
                    continue
                block = fuse_block(text, mistral, t_ids, t_off, inputs, options)
                for field in FIELDS:
                    out[f"{mode}-{i}-{preset}-{method}-{level}.{field}"] = np.asarray(
                        getattr(block, field)
                    )
    np.savez(path, **out)
    print(f"{len(out) // len(FIELDS)} blocks -> {path}")


if __name__ == "__main__":
    main(sys.argv[1])
