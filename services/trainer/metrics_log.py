"""The step metrics file (jsonl, written by rank 0): one row per step and one per evaluation.

Covers appending a row, and trimming the file when a run resumes: rows after the resume point
were written by the attempt that failed after its last checkpoint and will be written again, so
they go (a resumed run never has a step twice in its file). A run that resumes at step 0 (none
of its steps checkpointed) starts the file again, step-0 evaluation included.

Leaves out: what the rows hold (``recipe``, ``heldout``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def append_row(path: Path | None, row: dict) -> None:
    if path is not None:
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def trim_after(path: Path, step: int) -> int:
    """Keep only the rows of steps <= ``step`` (none when ``step`` is 0); the number dropped.
    The file is replaced atomically; a line that is not a JSON object (a write cut short by the
    failure) is dropped too."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = step > 0 and isinstance(row, dict) and int(row.get("step", 0)) <= step
        except ValueError:
            keep = False
        if keep:
            kept.append(line)
        elif line.strip():
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
