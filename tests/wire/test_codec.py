import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fuseserve.wire import codec
from fuseserve.wire.messages import FusedBlock, TeacherScores

DTYPES = [np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64, np.float16, np.float32]


@given(
    arrays=st.lists(
        st.sampled_from(DTYPES).flatmap(
            lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5))
        ),
        max_size=4,
    ),
    meta=st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
)
def test_roundtrip_is_exact(arrays, meta):
    named = {f"a{i}": a for i, a in enumerate(arrays)}
    decoded, decoded_meta = codec.decode(codec.encode(named, meta))
    assert decoded_meta == meta
    assert list(decoded) == list(named)
    for name, array in named.items():
        assert decoded[name].dtype == array.dtype
        assert decoded[name].shape == array.shape
        np.testing.assert_array_equal(decoded[name], array)


def test_big_endian_input_is_stored_little_endian():
    array = np.arange(4, dtype=">i4")
    decoded, _ = codec.decode(codec.encode({"x": array}))
    np.testing.assert_array_equal(decoded["x"], [0, 1, 2, 3])


@pytest.mark.parametrize(
    "value", [np.array(["a"], dtype=object), np.array([1 + 2j]), np.array(["text"])]
)
def test_unencodable_dtypes_are_refused(value):
    with pytest.raises(codec.CodecError, match="not encodable"):
        codec.encode({"x": value})


def test_garbage_and_truncation_are_codec_errors():
    good = codec.encode({"x": np.arange(10, dtype=np.int32)}, {"k": 1})
    for bad in [b"", b"FSW", b"XXXX" + good[4:], good[:-1], good + b"\0", good[:12]]:
        with pytest.raises(codec.CodecError):
            codec.decode(bad)
    wrong_version = good[:3] + bytes([99]) + good[4:]
    with pytest.raises(codec.CodecError, match="version"):
        codec.decode(wrong_version)


def test_pickle_bytes_are_not_accepted():
    import pickle

    with pytest.raises(codec.CodecError):
        codec.decode(pickle.dumps({"x": np.arange(3)}))


def test_teacher_scores_roundtrip_and_shape_checks():
    rng = np.random.default_rng(0)
    m, k = 7, 4
    scores = TeacherScores(
        token_ids=rng.integers(0, 100, m).astype(np.int32),
        offsets=np.stack([np.arange(m), np.arange(m) + 1], 1).astype(np.int32),
        topk_ids=rng.integers(0, 100, (m, k)).astype(np.int32),
        topk_logprobs=-rng.random((m, k)).astype(np.float32),
        gold_logprobs=np.append(-rng.random(m - 1), np.nan).astype(np.float32),
        truncated=True,
    )
    back = TeacherScores.from_bytes(scores.to_bytes())
    assert back.truncated
    np.testing.assert_array_equal(back.topk_ids, scores.topk_ids)
    np.testing.assert_array_equal(back.gold_logprobs, scores.gold_logprobs)
    half = TeacherScores.from_bytes(scores.to_bytes("f16"))
    np.testing.assert_allclose(half.topk_logprobs, scores.topk_logprobs, atol=1e-3)
    with pytest.raises(codec.CodecError, match="gold_logprobs"):
        TeacherScores(
            scores.token_ids,
            scores.offsets,
            scores.topk_ids,
            scores.topk_logprobs,
            scores.gold_logprobs[:-1],
        )
    with pytest.raises(codec.CodecError, match="not a fused"):
        FusedBlock.from_bytes(scores.to_bytes())


def test_fused_block_roundtrip():
    block = FusedBlock(
        target_ids=np.array([5, 6, 7], np.int32),
        ids=np.array([[6, 1], [7, -1], [-1, -1]], np.int32),
        probs=np.array([[0.75, 0.25], [1.0, 0.0], [0.0, 0.0]], np.float32),
        chosen=np.array([0, 0, -1], np.int16),
        ce=np.array([1.5, 2.0], np.float32),
        coverage=np.array([1.0, 0.5], np.float32),
        teachers=("a", "b"),
    )
    back = FusedBlock.from_bytes(block.to_bytes())
    assert back.teachers == ("a", "b")
    np.testing.assert_array_equal(back.ids, block.ids)
    np.testing.assert_array_equal(back.probs, block.probs)
