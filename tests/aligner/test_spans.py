"""The `spans` method on real tokenizers: hand-worked rows, identity, coverage on real text.

Target: Mistral v1 (SentencePiece). Teacher: SmolLM2 (byte-level BPE) unless stated. Teacher
scores are written by hand: at chosen teacher positions, named candidates with probabilities; at
the others, the actual next token (gold) with probability 0.5 and filler tokens.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuseserve.aligner.continuation import build_continuation_table, hf_first_tokens
from fuseserve.aligner.options import FusionOptions
from fuseserve.aligner.pipeline import TeacherInput, fuse_block
from fuseserve.aligner.tokenview import context_ends
from fuseserve.aligner.vocabmap import build_vocab_map
from fuseserve.wire.messages import TeacherScores
from tests.conftest import encode

K = 4


@pytest.fixture(scope="module")
def smol_to_mistral(smol, mistral, mistral_tok):
    vmap = build_vocab_map(smol, mistral)
    return vmap, build_continuation_table(smol, mistral, vmap, hf_first_tokens(mistral_tok))


@pytest.fixture(scope="module")
def mistral_to_mistral(mistral, mistral_tok):
    vmap = build_vocab_map(mistral, mistral)
    return vmap, build_continuation_table(mistral, mistral, vmap, hf_first_tokens(mistral_tok))


def hand_scores(tok, view, text, rows=None, gold_p=0.5, bos=False):
    """TeacherScores for ``text``: rows {teacher position: {token string: prob}} (the gold gets
    its probability from there when listed), elsewhere the gold with ``gold_p``; fillers at
    1e-4."""
    ids, offsets = encode(tok, text, bos=bos)
    m = len(ids)
    fillers = [view.id_of[t] for t in ("<unk>", "<s>", "</s>") if t in view.id_of]
    fillers += [i for i in range(1000, 1000 + 3 * K) if i not in ids][: K + 2]
    topk = np.zeros((m, K), dtype=np.int32)
    lp = np.full((m, K), np.log(1e-4), dtype=np.float32)
    gold = np.full(m, np.nan, dtype=np.float32)
    for j in range(m):
        listed = {view.id_of[t]: p for t, p in (rows or {}).get(j, {}).items()}
        if j + 1 < m:
            gold_id = int(ids[j + 1])
            listed.setdefault(gold_id, gold_p)
            gold[j] = np.log(listed[gold_id])
        entries = list(listed.items())[:K]
        used = {i for i, _ in entries}
        entries += [(f, 1e-4) for f in fillers if f not in used][: K - len(entries)]
        topk[j] = [i for i, _ in entries]
        lp[j] = np.log([p for _, p in entries])
    return TeacherScores(
        token_ids=ids.astype(np.int32),
        offsets=offsets.astype(np.int32),
        topk_ids=topk,
        topk_logprobs=lp,
        gold_logprobs=gold,
    )


def fuse_spans(text, target_tok, target, teacher_view, vmap, table, scores, **options):
    ids, offsets = encode(target_tok, text)
    inputs = [TeacherInput("t", teacher_view, vmap, scores, table)]
    block = fuse_block(text, target, ids, offsets, inputs, FusionOptions.preset("spans", **options))
    return ids, block


def row(block, target, i):
    """Position i's row as {target token: probability} (and its tail)."""
    keep = block.ids[i] >= 0
    out = {target.tokens[t]: float(p) for t, p in zip(block.ids[i][keep], block.probs[i][keep])}
    return out, float(block.tail[i])


def test_a_word_split_differently(mistral_tok, mistral, smol, smol_tok, smol_to_mistral):
    # Mistral: ▁It ▁is ▁un bel iev able .     SmolLM2: It Ġis Ġunbelie vable .
    text = "It is unbelievable."
    vmap, table = smol_to_mistral
    scores = hand_scores(
        smol_tok, smol, text, {1: {"Ġunbelie": 0.5, "Ġunder": 0.2, "Ġthe": 0.1}, 2: {"vable": 0.8}}
    )
    ids, block = fuse_spans(text, mistral_tok, mistral, smol, vmap, table, scores)
    assert [mistral.tokens[t] for t in ids] == ["▁It", "▁is", "▁un", "bel", "iev", "able", "."]
    # shared boundary after "It is": first-token projection, probabilities kept, tail the rest
    probs, tail = row(block, mistral, 1)
    assert probs == pytest.approx({"▁un": 0.5, "▁under": 0.2, "▁the": 0.1, **filler(probs)})
    assert tail == pytest.approx(1 - sum(probs.values()), abs=1e-6)
    # " un" already read: " unbelie" and " under" start with it; remainders "belie" and "der",
    # renormalised over the two (the filler tokens do not start with " un")
    probs, tail = row(block, mistral, 2)
    assert probs == pytest.approx({"bel": 0.5 / 0.7, "der": 0.2 / 0.7}) and tail == 0
    # " unbel" read: only " unbelie" is left, with remainder "ie"; the target's next token "iev"
    # runs into SmolLM2's next token, so it gets p(" unbelie" | " unbel") x p(next starts with
    # "v") = 1 x 0.8 (the gold "vable"); the rest stays with the remainder's first token "ie"
    probs, _ = row(block, mistral, 3)
    assert probs == pytest.approx({"iev": 0.8, "ie": 0.2})
    # "iev" read (inside SmolLM2's "vable", after "unbelie"): gold "vable" -> remainder "able",
    # and the target's next token "able" ends where "vable" ends: chain rule, all to "able"
    probs, _ = row(block, mistral, 4)
    assert probs == pytest.approx({"able": 1.0})
    assert block.coverage[0] == 1.0


def filler(probs):
    return {t: p for t, p in probs.items() if p < 1e-3}


def test_chain_rule_when_the_target_token_spans_two_teacher_tokens(
    mistral_tok, mistral, smol, smol_tok, smol_to_mistral
):
    # Mistral reads "Assignment" as one token; SmolLM2 as "Ass" + "ignment"
    text = "x\nAssignment is"
    vmap, table = smol_to_mistral
    s_ids, _ = encode(smol_tok, text)
    s_tokens = [smol.tokens[i] for i in s_ids]
    assert s_tokens[:4] == ["x", "Ċ", "Ass", "ignment"]
    scores = hand_scores(smol_tok, smol, text, {1: {"Ass": 0.5, "The": 0.3}, 2: {"ignment": 0.4}})
    ids, block = fuse_spans(text, mistral_tok, mistral, smol, vmap, table, scores)
    t_tokens = [mistral.tokens[t] for t in ids]
    i = t_tokens.index("Assignment") - 1  # the position that predicts "Assignment"
    probs, tail = row(block, mistral, i)
    # p("Assignment") = p("Ass") * p("ignment" | "Ass") = 0.5 * 0.4, exactly; the rest of "Ass"
    # (0.5 - 0.2) goes to where "Ass" alone starts in the target vocabulary
    first_of_ass = mistral.tokens[table.at_start[smol.id_of["Ass"]]]
    assert probs["Assignment"] == pytest.approx(0.2)
    assert probs[first_of_ass] == pytest.approx(0.3)
    assert probs[mistral.tokens[table.at_start[smol.id_of["The"]]]] == pytest.approx(0.3)
    assert tail == pytest.approx(1 - sum(probs.values()), abs=1e-6)


def test_the_gold_goes_to_the_target_token_that_splits_it(
    mistral_tok, mistral, smol, smol_tok, smol_to_mistral
):
    """Where the target's next token ends inside the gold, the gold's mass goes to that token,
    not to the first token of the gold's bytes read out of context (which the target would
    not produce on this text)."""
    # Mistral: ▁( ack now led g ement )     SmolLM2: ( ack now ledge ment )
    text = "(acknowledgement)"
    vmap, table = smol_to_mistral
    scores = hand_scores(
        smol_tok, smol, text, {2: {"ledge": 0.6, "ledged": 0.2, "led": 0.1, "less": 0.05}}
    )
    ids, block = fuse_spans(text, mistral_tok, mistral, smol, vmap, table, scores)
    assert [mistral.tokens[t] for t in ids] == ["▁(", "ack", "now", "led", "g", "ement", ")"]
    # out of context "ledge" starts with Mistral's "ledge" and "ge" with "ge": tokens the target
    # never emits in "acknowledgement"
    assert mistral.tokens[table.at_start[smol.id_of["ledge"]]] == "ledge"
    # after "(acknow" (a shared boundary): the gold "ledge" (0.6) is read by the target as "led"
    # + ...; "ledged" (0.2) and "led" (0.1) start with "led" too; "less" stays; tail unchanged
    probs, tail = row(block, mistral, 2)
    assert probs == pytest.approx({"led": 0.9, "less": 0.05}) and tail == pytest.approx(0.05)
    # after "(acknowled" (3 bytes into "ledge"): "ledge", "ledged" and "led" agree with the bytes
    # read (0.9 in all); the gold's remainder "ge" is read as "g" + "ement", "ledged"'s remainder
    # "ged" out of context; "led" ends right there, so what follows it is unknown: tail
    probs, tail = row(block, mistral, 3)
    assert probs == pytest.approx({"g": 0.6 / 0.9, "ged": 0.2 / 0.9})
    assert tail == pytest.approx(0.1 / 0.9)


def test_digits_and_whitespace_runs(mistral_tok, mistral, smol, smol_tok, smol_to_mistral):
    # digits: both split one by one; indentation: Mistral "▁▁▁▁▁▁▁▁" + "return", SmolLM2
    # "ĊĠĠĠĠĠĠĠ" + "Ġreturn": the target's boundary after the run is inside "Ġreturn"
    text = "x = 12345\nif x:\n        return y"
    vmap, table = smol_to_mistral
    scores = hand_scores(smol_tok, smol, text)
    ids, block = fuse_spans(text, mistral_tok, mistral, smol, vmap, table, scores)
    tokens = [mistral.tokens[t] for t in ids]
    for i in range(len(ids) - 1):
        probs, tail = row(block, mistral, i)
        assert sum(probs.values()) + tail == pytest.approx(1.0, abs=1e-5)
        assert tokens[i + 1] in probs, (i, tokens[i + 1], probs)  # the actual next token
    i = tokens.index("return") - 1  # context ends after 8 spaces, inside SmolLM2's " return"
    probs, tail = row(block, mistral, i)
    assert probs["return"] == pytest.approx(1.0, abs=1e-3) and tail == 0
    for digit in "2345":
        probs, _ = row(block, mistral, tokens.index(digit) - 1)
        assert probs[digit] == pytest.approx(0.5)  # the gold's probability, unchanged


def test_runs_of_spaces_are_read_with_the_space_that_follows(mistral, smol, smol_to_mistral):
    """SmolLM2's pre-tokenizer ends a run of spaces one space early before a word ("\n    return"
    is "Ċ   " + " return"), so its run tokens are projected as "<run> x": Mistral v1 reads four
    spaces before a word as one token, three as two spaces and " word", two as one token."""
    _, table = smol_to_mistral

    def entries(token):
        c = smol.id_of[token]
        n = len(smol.surface_bytes[c])
        return [mistral.tokens[t] for t in table.lookup(np.full(n, c), np.arange(n))]

    # "ĠĠĠ" = 3 spaces, then " x": 4 spaces; after 1 byte read, 2 + " x" = 3: "▁▁" + "▁x"
    assert entries("ĠĠĠ") == ["▁▁▁▁", "▁▁", "▁▁"]
    assert entries("ĊĠĠĠ") == ["<0x0A>", "▁▁▁▁", "▁▁", "▁▁"]
    assert entries("ĊĠĠĠĠĠĠĠ")[1] == "▁" * 8
    assert entries("ĊĠ") == ["<0x0A>", "▁▁"]  # newline, one space, " x": two spaces
    # a lone space is what SmolLM2 puts before a digit ("x = 1": "x", " =", " ", "1"): as is
    assert entries("Ġ") == ["▁"]


def test_the_indentation_before_return(mistral_tok, mistral, smol, smol_tok, smol_to_mistral):
    """The issue's case: four spaces before ``return``. Mistral: "<0x0A>" "▁▁▁▁" "return";
    SmolLM2: "):" then "ĊĠĠĠ" " return". Worked by hand below."""
    text = "def f(x):\n    return x"
    vmap, table = smol_to_mistral
    s_ids, _ = encode(smol_tok, text)
    assert [smol.tokens[i] for i in s_ids][-4:] == ["):", "ĊĠĠĠ", "Ġreturn", "Ġx"]
    j = len(s_ids) - 4  # "):"
    scores = hand_scores(
        smol_tok,
        smol,
        text,
        {j: {"ĊĠĠĠ": 0.6, "ĊĠĠĠĠĠĠĠ": 0.3}, j + 1: {"Ġreturn": 0.3, "Ġif": 0.2}},
    )
    ids, block = fuse_spans(text, mistral_tok, mistral, smol, vmap, table, scores)
    tokens = [mistral.tokens[t] for t in ids]
    assert tokens[-4:] == ["<0x0A>", "▁▁▁▁", "return", "▁x"]
    probs, tail = row(block, mistral, len(ids) - 4)  # after the newline, predicting "▁▁▁▁"
    # the newline is read, inside SmolLM2's next token: its candidates that start with a newline
    # are kept and renormalised: "Ċ   " 0.6 / 0.9 = 2/3, "Ċ       " 1/3. The chain rule gives
    # the target's "▁▁▁▁" (which ends inside " return") 2/3 x p(next starts with " ") = 2/3 x
    # (0.3 + 0.2) = 1/3; the rest of "Ċ   " (1/3) goes to its projection, four spaces too (it
    # went to "▁▁▁", three spaces, before issue #25), and "Ċ       " to eight spaces (not seven)
    assert probs == pytest.approx({"▁▁▁▁": 2 / 3, "▁" * 8: 1 / 3}, abs=1e-6) and tail == 0


def test_a_character_split_into_byte_pieces(mistral_tok, mistral, smol, smol_tok, smol_to_mistral):
    # 龘 is three byte pieces in Mistral (<0xE9><0xBE><0x98>); SmolLM2 has " \xe9", "\xbe", "\x98"
    text = "The dragon 龘 flew"
    vmap, table = smol_to_mistral
    scores = hand_scores(smol_tok, smol, text)
    ids, block = fuse_spans(text, mistral_tok, mistral, smol, vmap, table, scores)
    tokens = [mistral.tokens[t] for t in ids]
    assert tokens[2:7] == ["▁", "<0xE9>", "<0xBE>", "<0x98>", "▁flew"]
    # after "▁" the context ends inside SmolLM2's " \xe9": its remainder is the lone byte 0xE9,
    # which only the byte piece starts; and <0xE9> ends on SmolLM2's boundary (chain rule)
    probs, tail = row(block, mistral, 2)
    assert probs["<0xE9>"] == pytest.approx(1.0, abs=1e-3) and tail == 0  # fillers: 1e-4 each
    for i, piece in ((3, "<0xBE>"), (4, "<0x98>")):
        probs, _ = row(block, mistral, i)
        assert probs[piece] == pytest.approx(0.5)


def test_bos_on_the_teacher_side_covers_the_first_position(
    mistral_tok, mistral, smol, smol_tok, smol_to_mistral, mistral_to_mistral
):
    # SmolLM2 starts "Changed" with one token longer than Mistral's first one ("Ch"), and has
    # no BOS: the first target position has no teacher context yet
    text = "Changed things"
    vmap, table = smol_to_mistral
    _, block = fuse_spans(
        text, mistral_tok, mistral, smol, vmap, table, hand_scores(smol_tok, smol, text)
    )
    assert block.coverage[0] < 1.0 and row(block, mistral, 0)[1] == 0.0
    # a teacher with BOS (Mistral itself): its BOS position's context is empty, so the first
    # target position is conditioned on the bytes of the first target token
    vmap, table = mistral_to_mistral
    scores = hand_scores(mistral_tok, mistral, text, bos=True)
    ids, block = fuse_spans(text, mistral_tok, mistral, mistral, vmap, table, scores)
    assert block.coverage[0] == 1.0
    probs, _ = row(block, mistral, 0)
    assert probs[mistral.tokens[ids[1]]] == pytest.approx(0.5)


def test_tail_can_be_renormalised_away(mistral_tok, mistral, smol, smol_tok, smol_to_mistral):
    text = "It is unbelievable."
    vmap, table = smol_to_mistral
    scores = hand_scores(smol_tok, smol, text, {1: {"Ġunbelie": 0.5, "Ġthe": 0.1}})
    _, kept = fuse_spans(text, mistral_tok, mistral, smol, vmap, table, scores)
    _, renorm = fuse_spans(text, mistral_tok, mistral, smol, vmap, table, scores, tail=False)
    assert kept.tail[1] > 0.3 and renorm.tail[1] == 0.0
    np.testing.assert_allclose(renorm.probs[1].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(kept.probs[1] / kept.probs[1].sum(), renorm.probs[1], rtol=1e-5)


TEXTS = [
    "def f(x):\n    return x * 2  # twice\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé 日本語 text!",
    "for i in range(10):\n\tprint(i, end='')\n\n\nclass A(B):\n    pass",
    "Assignment statements are used to (re)bind names to values: x = 12345.",
]


@given(
    text=st.sampled_from(TEXTS),
    cut=st.integers(0, 20),
    seed=st.integers(0, 2**31 - 1),
)
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_identity_same_tokenizer_gives_the_teachers_own_rows(
    mistral_tok, mistral, mistral_to_mistral, text, cut, seed
):
    """Teacher tokenizer == target tokenizer: every row is the teacher's own top-k plus gold,
    with the teacher's tail, at every position."""
    text = text[cut:]
    vmap, table = mistral_to_mistral
    rng = np.random.default_rng(seed)
    ids, offsets = encode(mistral_tok, text)
    m = len(ids)
    topk = np.stack([rng.choice(np.arange(3, 32000), K, replace=False) for _ in range(m)])
    probs = rng.dirichlet(np.ones(K + 3), m)[:, : K + 1]  # k listed + the gold, some left over
    gold_in = rng.random(m) < 0.5
    topk[gold_in[:-1].nonzero()[0], 0] = ids[1:][gold_in[:-1]]
    gold = np.where(gold_in, probs[:, 0], probs[:, K])
    gold[-1] = np.nan
    scores = TeacherScores(
        token_ids=ids.astype(np.int32),
        offsets=offsets.astype(np.int32),
        topk_ids=topk.astype(np.int32),
        topk_logprobs=np.log(probs[:, :K]).astype(np.float32),
        gold_logprobs=np.log(gold).astype(np.float32),
    )
    inputs = [TeacherInput("self", mistral, vmap, scores, table)]
    block = fuse_block(text, mistral, ids, offsets, inputs, FusionOptions.preset("spans"))
    for i in range(m - 1):
        expected = dict(zip(topk[i].tolist(), probs[i, :K].tolist()))
        expected.setdefault(int(ids[i + 1]), float(gold[i]))
        keep = block.ids[i] >= 0
        got = dict(zip(block.ids[i][keep].tolist(), block.probs[i][keep].tolist()))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert block.tail[i] == pytest.approx(1 - sum(expected.values()), abs=1e-5)
    assert (block.ids[m - 1] < 0).all()  # the last position predicts nothing


def synthetic_scores(tok, text, vocab, k, seed, bos=False):
    """Plausible teacher scores: the gold in the top-k half of the time, probabilities summing
    below 1."""
    rng = np.random.default_rng(seed)
    ids, offsets = encode(tok, text, bos=bos)
    m = len(ids)
    topk = rng.integers(0, vocab, (m, k))
    probs = rng.dirichlet(np.ones(k + 2), m)
    gold = probs[:, k]
    gold[-1] = np.nan
    return TeacherScores(
        token_ids=ids.astype(np.int32),
        offsets=offsets.astype(np.int32),
        topk_ids=topk.astype(np.int32),
        topk_logprobs=np.log(probs[:, :k]).astype(np.float32),
        gold_logprobs=np.log(gold).astype(np.float32),
    )


@pytest.mark.parametrize("domain", ["code", "prose"])
def test_coverage_on_real_text(domain, mistral_tok, mistral, smol, smol_tok, smol_to_mistral):
    """A teacher distribution at >= 98% of target positions (excluding the first), against
    ~80% with byte-offset alignment alone."""
    import pydoc_data.topics

    if domain == "code":
        import argparse
        import inspect

        text = inspect.getsource(argparse)[:9000]
    else:
        text = "\n\n".join(pydoc_data.topics.topics[t] for t in ("assignment", "for", "class"))
    text = text[:9000]
    vmap, table = smol_to_mistral
    scores = synthetic_scores(smol_tok, text, smol.vocab_size, 10, seed=1)
    ids, offsets = encode(mistral_tok, text)
    inputs = [TeacherInput("smol", smol, vmap, scores, table)]
    spans = fuse_block(text, mistral, ids, offsets, inputs, FusionOptions.preset("spans"))
    default = fuse_block(text, mistral, ids, offsets, inputs, FusionOptions())
    assert spans.coverage[0] >= 0.98
    assert default.coverage[0] < 0.95
    ends = context_ends(ids, offsets, text, mistral)
    assert len(ends) == len(ids)


@pytest.mark.parametrize("preset", ["spans", "default"])
def test_min_ce_builds_only_the_chosen_teachers_rows_with_the_same_result(
    preset, mistral_tok, mistral, smol, smol_tok, smol_to_mistral, mistral_to_mistral
):
    """fuse_block projects only the lowest-CE teacher under MinCE per block: the same block as
    projecting every teacher and fusing them."""
    from fuseserve.aligner.fusion import fuse
    from fuseserve.aligner.pipeline import run_teachers

    text = TEXTS[3] + " " + TEXTS[1]
    (s_map, s_table), (m_map, m_table) = smol_to_mistral, mistral_to_mistral
    inputs = [
        TeacherInput("smol", smol, s_map, synthetic_scores(smol_tok, text, 49152, 6, 3), s_table),
        TeacherInput(
            "self", mistral, m_map, synthetic_scores(mistral_tok, text, 32000, 6, 4), m_table
        ),
    ]
    ids, offsets = encode(mistral_tok, text)
    options = FusionOptions.preset(preset)
    block = fuse_block(text, mistral, ids, offsets, inputs, options)
    every = run_teachers(text, mistral, ids, offsets, inputs, options)
    full = fuse([r.dist for r in every], [r.ce for r in every])
    width = block.ids.shape[1]
    np.testing.assert_array_equal(block.ids, full.ids[:, :width])
    assert (full.ids[:, width:] < 0).all()
    np.testing.assert_array_equal(block.probs, full.probs[:, :width])
    np.testing.assert_array_equal(block.tail, full.tail)
    np.testing.assert_array_equal(block.chosen, full.chosen)
    np.testing.assert_allclose(block.coverage, [r.alignment.coverage for r in every])
