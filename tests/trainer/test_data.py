"""Blocks from files: exact text spans, formats, deterministic sharded order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fuseserve.trainer.data import epoch_order, pack_blocks, read_documents, worker_schedule


def test_blocks_are_exact_spans_that_retokenise_to_their_ids(mistral_tok, prose):
    docs = [prose[:3000], "def f(x):\n    return x + 1\n" * 20, prose[3000:6000]]
    blocks = pack_blocks(mistral_tok, docs, block_size=64)
    stream = "\n\n".join(docs) + "\n\n"
    position = 0
    assert len(blocks) > 10
    for i, block in enumerate(blocks):
        assert block.index == i
        found = stream.find(block.text, position)
        assert found >= position  # blocks follow the stream in order, without overlap
        position = found + len(block.text)
        ids = mistral_tok(block.text, add_special_tokens=False)["input_ids"][:64]
        assert block.ids.tolist() == ids and 2 <= len(ids) <= 64


def test_read_documents_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document")
    with (tmp_path / "b.jsonl").open("w") as f:
        f.write(json.dumps({"text": "json one"}) + "\n\n" + json.dumps({"text": "json two"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["parquet row"]}), tmp_path / "c.parquet")
    from datasets import Dataset

    Dataset.from_dict({"text": ["saved one", "saved two"]}).save_to_disk(str(tmp_path / "ds"))
    docs = read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.parquet"])
    assert docs == ["plain text document", "json one", "json two", "parquet row"]
    assert read_documents([tmp_path / "ds"]) == ["saved one", "saved two"]
    with pytest.raises(FileNotFoundError, match="nope"):
        read_documents([tmp_path / "nope.txt"])
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_documents([tmp_path / "bad.jsonl"])


def test_worker_schedule_shards_and_resumes():
    n, batch, world = 23, 2, 3
    steps = [
        [next(s) for _ in range(8)]
        for s in (worker_schedule(n, 7, r, world, batch) for r in range(world))
    ]
    for step in range(8):
        taken = [i for r in range(world) for i in steps[r][step][2]]
        assert len(taken) == len(set(taken)) == batch * world  # disjoint across workers
    # epochs: 23 // 6 = 3 steps each; a new permutation per epoch
    assert [s[1] for s in steps[0][:7]] == [0, 0, 0, 1, 1, 1, 2]
    assert not np.array_equal(epoch_order(n, 7, 0), epoch_order(n, 7, 1))
    # resuming at step 5 gives exactly what an uninterrupted schedule gives from step 5
    resumed = worker_schedule(n, 7, 1, world, batch, start_step=5)
    assert [next(resumed) for _ in range(3)] == steps[1][5:8]
    with pytest.raises(ValueError, match="global batch"):
        next(worker_schedule(3, 0, 0, 2, 2))


def test_named_files_are_read_whatever_their_suffix_and_walks_say_what_they_skip(tmp_path, caplog):
    (tmp_path / "api.h").write_text("int f(void);\n")
    (tmp_path / "notes.txt").write_text("plain notes\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "data.bin").write_bytes(b"\x00\x01")
    # named explicitly: read whatever the suffix
    assert read_documents([tmp_path / "api.h"]) == ["int f(void);\n"]
    assert read_documents([tmp_path / "image.png"]) == ["\ufffdPNG"]
    # a walk reads the C header and the text, skips the rest and says so
    with caplog.at_level("WARNING", logger="fuseserve.trainer.data"):
        assert read_documents([tmp_path]) == ["int f(void);\n", "plain notes\n"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "skipped 2 files" in message and ".png" in message and ".bin" in message


def test_an_empty_data_set_is_an_error(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"no text in .*blank\.txt"):
        read_documents([tmp_path / "blank.txt"])
    with pytest.raises(ValueError, match="no text in"):
        read_documents([tmp_path / "sub"])


def test_eval_cli_refuses_an_empty_domain_in_one_line(tmp_path, capsys):
    from fuseserve.cli import main

    (tmp_path / "empty").mkdir()
    code = main(["eval", "--model", "shipped:smollm2", "--data", f"c={tmp_path / 'empty'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert err.startswith("error: data: domain 'c': no text in")


def test_train_cli_refuses_empty_data_before_ray_starts(tmp_path, capsys):
    from fuseserve.cli import main

    (tmp_path / "empty").mkdir()
    (tmp_path / "a.txt").write_text("some text")
    base = ["train", "--model", "shipped:smollm2", "--lam", "1.0", "--max-steps", "1"]
    assert main([*base, "--data", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: data: no text in")
    eval_data = f"c={tmp_path / 'empty'}"
    assert main([*base, "--data", str(tmp_path / "a.txt"), "--eval-data", eval_data]) == 2
    assert capsys.readouterr().err.startswith("error: eval_data: domain 'c': no text in")


def test_no_bytes_scored_is_nan_not_zero():
    import math

    from fuseserve.trainer.evaluate import BPB, evaluate_domains

    assert math.isnan(BPB(0.0, 0, 0).value)
    with pytest.raises(ValueError, match=r"domains \['c'\]: no text"):
        evaluate_domains("shipped:smollm2", {"c": ["   "], "prose": ["words"]})


def test_read_domains_names_the_spec_or_the_domain(tmp_path):
    from fuseserve.trainer.data import read_domains

    (tmp_path / "a.txt").write_text("one document")
    assert read_domains([f"code={tmp_path / 'a.txt'}"]) == {"code": ["one document"]}
    with pytest.raises(ValueError, match="expected domain=path"):
        read_domains(["no-equals-sign"])
    with pytest.raises(ValueError, match="domain 'prose'"):
        read_domains([f"prose={tmp_path / 'missing.txt'}"])
