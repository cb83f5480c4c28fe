"""A local model directory's revision follows its weights, so cached scores are never stale."""

from __future__ import annotations

import os

from fuseserve.teacher.hf_backend import local_revision
from fuseserve.teacher.tiny import save_tiny_llama


def test_revision_changes_when_the_weights_change(tmp_path, mistral_tok):
    folder = save_tiny_llama(mistral_tok, tmp_path / "m", seed=0, hidden=16, layers=1)
    first = local_revision(folder)
    assert first.startswith("local-") and local_revision(folder) == first
    weights = next(folder.glob("*.safetensors"))
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # retrained
    assert local_revision(folder) != first
