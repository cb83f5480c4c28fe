"""The pure parts behind the REST binary answer and the client: cutting rows, the reply codec,
content negotiation. No service needed."""

from __future__ import annotations

import numpy as np
import pytest

from fuseserve.wire.codec import CodecError, encode
from fuseserve.wire.fuse_reply import FuseReply, ReplyBlock, decode_reply, encode_reply
from fuseserve.wire.messages import FusedBlock
from fuseserve.wire.rows import compact, row_range, select_rows


def block(n: int = 6, width: int = 4, seed: int = 0) -> FusedBlock:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 1000, (n, width)).astype(np.int32)
    probs = rng.random((n, width)).astype(np.float32)
    ids[-1] = -1  # the last row has no distribution
    probs[-1] = 0
    ids[1, 2:] = -1  # a short row, padding in the middle of the stored order
    probs[1, 2:] = 0
    ids[1, 3], probs[1, 3] = 7, 0.0  # a listed id with probability 0 after the padding
    return FusedBlock(
        target_ids=np.arange(n, dtype=np.int32),
        ids=ids,
        probs=probs,
        chosen=np.arange(n, dtype=np.int16) % 2,
        ce=np.array([1.5, np.nan], dtype=np.float32),
        coverage=np.array([1.0, 0.5], dtype=np.float32),
        teachers=("a", "b"),
        tail=np.full(n, 0.01, dtype=np.float32),
    )


def test_row_range_clamps_like_a_slice():
    assert row_range(10) == (0, 10)
    assert row_range(10, 3, 7) == (3, 7)
    assert row_range(10, 12) == (10, 10)
    assert row_range(10, 4, 100) == (4, 10)


def test_select_rows_keeps_the_best_entries_in_order_and_padding_last():
    b = block()
    cut = select_rows(b, top=2, start=1, end=5)
    assert cut.ids.shape == (4, 2)
    np.testing.assert_array_equal(cut.target_ids, b.target_ids[1:5])
    np.testing.assert_array_equal(cut.chosen, b.chosen[1:5])
    for row in range(4):
        listed = b.ids[1 + row] >= 0
        best = np.sort(b.probs[1 + row][listed])[::-1][:2]
        np.testing.assert_array_equal(cut.probs[row][: len(best)], best)
    everything = select_rows(b)
    # the zero-probability id is listed before the padding, not hidden behind it
    assert everything.ids[1, 2:].tolist() == [7, -1]


def test_compact_drops_columns_of_padding_only():
    b = select_rows(block(width=4), top=None)
    wide = FusedBlock(**{**vars(b), "ids": np.pad(b.ids, ((0, 0), (0, 2)), constant_values=-1),
                         "probs": np.pad(b.probs, ((0, 0), (0, 2)))})  # fmt: skip
    assert compact(wide).ids.shape == b.ids.shape


@pytest.mark.parametrize("dtype", ["f16", "f32"])
def test_reply_round_trips_and_its_size_is_fixed_plus_rows_plus_listed_entries(dtype):
    b = select_rows(block(n=300, width=8), top=5)
    reply = FuseReply(
        (ReplyBlock(0, 3, True, b), ReplyBlock(1, 0, False, b)), "fp", "target", 10, {"x": 1}
    )
    data = encode_reply(reply, dtype)
    back = decode_reply(data)
    assert (back.target_fingerprint, back.target_tokenizer, back.k, back.options) == (
        "fp", "target", 10, {"x": 1},
    )  # fmt: skip
    assert [(x.index, x.start, x.cache_hit) for x in back.blocks] == [(0, 3, True), (1, 0, False)]
    got = back.blocks[0].block
    np.testing.assert_array_equal(got.ids, b.ids)
    np.testing.assert_array_equal(got.probs, b.probs.astype(dtype.replace("f", "float")))
    np.testing.assert_array_equal(got.ce, b.ce)
    # per position: target id 4, row length 1, chosen 2, tail 2 (4); per listed entry: id 4,
    # probability 2 (4); padding (id -1) is not sent
    per_row, per_entry = (9, 6) if dtype == "f16" else (11, 8)
    listed = int((b.ids >= 0).sum())
    assert listed < b.ids.size  # the block has padding, which must cost nothing
    fixed = len(data) - 2 * (300 * per_row + listed * per_entry)
    assert 0 < fixed < 2 * 1024  # two blocks' headers plus the outer one


def test_foreign_bytes_are_a_codec_error():
    with pytest.raises(CodecError, match="not a fuse reply"):
        decode_reply(block().to_bytes())
    with pytest.raises(CodecError):
        decode_reply(encode({}, {"kind": "fuse-reply", "schema": 2, "blocks": [{"index": 0}]}))
