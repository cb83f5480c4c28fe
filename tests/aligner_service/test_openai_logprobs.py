"""A fused block as vLLM's ``prompt_logprobs`` (``openai_logprobs``): hand-worked rows for the
top-K, the actual token (listed, listed past K, unlisted: its share of the tail), vLLM's ranks
(top-K by position, the actual token by how many are at least as probable), temperature, and the
JSON text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fuseserve.aligner.service.openai_logprobs import prompt_logprobs, render_json, tempered
from fuseserve.wire.messages import FusedBlock

V = 32000  # Mistral v1


def block(target, rows, tails) -> FusedBlock:
    """target: [n] ids; rows: n lists of (id, prob); tails: [n]."""
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), -1, dtype=np.int32)
    probs = np.zeros((len(rows), width), dtype=np.float32)
    for i, row in enumerate(rows):
        for j, (token, p) in enumerate(row):
            ids[i, j], probs[i, j] = token, p
    n = len(target)
    return FusedBlock(
        target_ids=np.asarray(target, dtype=np.int32),
        ids=ids,
        probs=probs,
        chosen=np.full(n, -1, dtype=np.int16),
        ce=np.zeros(1, dtype=np.float32),
        coverage=np.ones(1, dtype=np.float32),
        teachers=("t",),
        tail=np.asarray(tails, dtype=np.float32),
    )


@pytest.fixture(scope="module")
def ids(mistral):
    return {w: mistral.id_of[w] for w in ("▁The", "▁cat", "▁dog", "▁sat", "▁ran", "▁on", "▁a")}


@pytest.fixture(scope="module")
def example(ids):
    # "▁The ▁cat ▁sat": row 0 predicts "▁cat" (listed first), row 1 predicts "▁sat" (unlisted)
    return block(
        [ids["▁The"], ids["▁cat"], ids["▁sat"]],
        [
            [(ids["▁dog"], 0.25), (ids["▁cat"], 0.5)],
            [(ids["▁ran"], 0.4), (ids["▁on"], 0.4), (ids["▁a"], 0.1)],
            [],
        ],
        [0.25, 0.1, 0.0],
    )


def test_top_k_and_the_actual_token(example, ids, mistral):
    answer = prompt_logprobs(example, 2, 1.0, mistral)
    np.testing.assert_array_equal(answer.actual_ids, [ids["▁cat"], ids["▁sat"]])
    # position 1: "▁cat" listed at 0.5, the most probable: rank 1
    assert answer.actual_logprobs[0] == pytest.approx(math.log(0.5))
    assert answer.actual_ranks[0] == 1
    assert answer.top_ids[0].tolist() == [ids["▁cat"], ids["▁dog"]]
    np.testing.assert_allclose(answer.top_logprobs[0], np.log([0.5, 0.25]), rtol=1e-6)
    # position 2: "▁sat" unlisted: the tail 0.1 spread over the 32000 - 3 ids not listed,
    # ranked after the three listed entries
    assert answer.actual_logprobs[1] == pytest.approx(math.log(0.1 / (V - 3)), rel=1e-6)
    assert answer.actual_ranks[1] == 4
    assert answer.sources() == {"listed": 1, "tail": 1, "zero": 0}
    # ties keep their stored order (as a stable sort): "▁ran" then "▁on"
    assert answer.top_ids[1].tolist() == [ids["▁ran"], ids["▁on"]]


def test_actual_token_listed_past_k_and_ties(ids, mistral):
    b = block(
        [ids["▁The"], ids["▁a"], ids["▁on"]],
        [
            [(ids["▁ran"], 0.4), (ids["▁on"], 0.4), (ids["▁a"], 0.1)],
            [(ids["▁ran"], 0.3), (ids["▁on"], 0.3)],
            [],
        ],
        [0.1, 0.4, 0.0],
    )
    answer = prompt_logprobs(b, 1, 1.0, mistral)
    assert answer.actual_ranks.tolist() == [3, 2]  # "▁a": 3 at least as probable; a tie ranks last
    assert answer.actual_logprobs[0] == pytest.approx(math.log(0.1))
    assert answer.top_ids[:, 0].tolist() == [ids["▁ran"], ids["▁ran"]]


def test_unlisted_actual_token_takes_the_entries_that_continue_it(mistral):
    # "▁the" sampled; the row lists "▁there" and "▁them" (which go on with " the"), "▁a", and a
    # tail: the fused probability of going on with " the" is 0.2 + 0.1 + 0.1 / (V - 3)
    v = mistral.id_of
    b = block(
        [v["▁of"], v["▁the"]],
        [[(v["▁there"], 0.2), (v["▁them"], 0.1), (v["▁a"], 0.5)], []],
        [0.2, 0.0],
    )
    answer = prompt_logprobs(b, 1, 1.0, mistral)
    assert answer.actual_logprobs[0] == pytest.approx(math.log(0.3 + 0.2 / (V - 3)), rel=1e-6)
    assert answer.actual_ranks[0] == 2  # only "▁a" is more probable; ranked after it
    # more probable than every listed entry: it is the top-1 entry, rank 1
    ahead = block(
        [v["▁of"], v["▁the"]],
        [[(v["▁there"], 0.3), (v["▁them"], 0.3), (v["▁a"], 0.4)], []],
        [0.0, 0.0],
    )
    first = prompt_logprobs(ahead, 1, 1.0, mistral)
    assert first.top_ids[0].tolist() == [v["▁the"]] and first.actual_ranks[0] == 1
    assert first.top_logprobs[0, 0] == pytest.approx(math.log(0.6))
    # a special token stands for no text: nothing continues it
    eos = block([v["▁of"], mistral.eos_id], [[(v["▁there"], 1.0)], []], [0.0, 0.0])
    assert prompt_logprobs(eos, 1, 1.0, mistral).actual_logprobs[0] == -math.inf


def test_temperature_reshapes_entries_and_tail_as_one_outcome():
    q, t = tempered(np.array([[0.5, 0.25]]), np.array([0.25]), 0.5)
    z = 0.5**2 + 0.25**2 + 0.25**2  # 0.375
    np.testing.assert_allclose(q[0], [0.25 / z, 0.0625 / z])
    assert t[0] == pytest.approx(0.0625 / z)
    same_q, _ = tempered(np.array([[0.5, 0.25]], dtype=np.float32), np.array([0.25]), 1.0)
    np.testing.assert_array_equal(same_q, [[0.5, 0.25]])  # T = 1: no arithmetic at all


def test_no_tail_gives_minus_infinity_written_as_vllm_does(ids, mistral):
    b = block([ids["▁The"], ids["▁sat"]], [[(ids["▁cat"], 1.0)], []], [0.0, 0.0])
    answer = prompt_logprobs(b, 0, 1.0, mistral)
    assert answer.actual_logprobs[0] == -math.inf
    assert answer.sources() == {"listed": 0, "tail": 0, "zero": 1}
    doc = json.loads(render_json(answer, mistral))
    assert doc[1] == {str(ids["▁sat"]): {"logprob": -9999.0, "rank": 2, "decoded_token": " sat"}}


def test_json_is_vllms_prompt_logprobs(example, ids, mistral):
    doc = json.loads(render_json(prompt_logprobs(example, 2, 1.0, mistral), mistral))
    assert doc[0] is None
    assert list(doc[1]) == [str(ids["▁cat"]), str(ids["▁dog"])]  # the actual token is a top-K entry
    assert doc[1][str(ids["▁cat"])] == {
        "logprob": pytest.approx(math.log(0.5)),
        "rank": 1,
        "decoded_token": " cat",
    }
    assert set(doc[2]) == {str(ids["▁sat"]), str(ids["▁ran"]), str(ids["▁on"])}
    assert doc[2][str(ids["▁sat"])]["rank"] == 4
    assert doc[2][str(ids["▁on"])]["rank"] == 2
    assert len(doc) == 3  # n positions: null + n - 1 maps


def test_decoded_tokens_of_specials_and_stray_bytes(mistral):
    b = block([mistral.bos_id, mistral.id_of["<0xE2>"]], [[(mistral.eos_id, 0.5)], []], [0.5, 0.0])
    doc = json.loads(render_json(prompt_logprobs(b, 1, 1.0, mistral), mistral))
    assert doc[1][str(mistral.eos_id)]["decoded_token"] == "</s>"
    assert doc[1][str(mistral.id_of["<0xE2>"])]["decoded_token"] == "\ufffd"
