"""The step metrics file trimmed on resume: by hand-written files."""

from __future__ import annotations

import json

from fuseserve.trainer.metrics_log import append_row, trim_after


def test_rows_after_the_resume_point_and_cut_lines_are_dropped(tmp_path):
    path = tmp_path / "m.jsonl"
    for row in ({"step": 0, "eval_bpb": {}}, {"step": 1}, {"step": 2}, {"step": 2, "eval_bpb": {}}):
        append_row(path, row)
    append_row(path, {"step": 3})
    path.write_text(path.read_text() + '{"step": 4, "lo')  # a write the failure cut short
    assert trim_after(path, 2) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 0, "eval_bpb": {}},
        {"step": 1},
        {"step": 2},
        {"step": 2, "eval_bpb": {}},
    ]
    assert trim_after(path, 2) == 0  # nothing more to drop
    assert trim_after(path, 0) == 4 and path.read_text() == ""  # resumed at 0: start again
    assert trim_after(tmp_path / "absent.jsonl", 3) == 0
