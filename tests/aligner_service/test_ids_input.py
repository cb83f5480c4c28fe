"""Pre-tokenized input: target ids instead of texts, over REST (JSON and binary) and gRPC, sync and
async clients, against the real aligner (teachers spm + bpe as processes, Redis cache).

For the tokenizer's own ids of a text the fused block is bit-identical to the text path's (and
shares its cache entry); other ids are kept exactly and cached apart; bad ids are 422 /
INVALID_ARGUMENT naming ``token_ids[i][j]``."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from fuseserve.client import (
    AsyncGrpcClient,
    AsyncRestClient,
    FuseError,
    FuseParams,
    GrpcClient,
    RestClient,
)
from fuseserve.client.grpc_client import rpc_error
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc

pytestmark = pytest.mark.slow

FIELDS = ("target_ids", "ids", "probs", "tail", "chosen", "ce", "coverage")


def assert_same_blocks(a, b) -> None:
    assert len(a.blocks) == len(b.blocks)
    for x, y in zip(a.blocks, b.blocks):
        assert x.block.teachers == y.block.teachers
        for name in FIELDS:
            np.testing.assert_array_equal(
                getattr(x.block, name), getattr(y.block, name), err_msg=name
            )


@pytest.fixture(scope="module")
def rest(aligner):
    with RestClient(str(aligner.rest.base_url), timeout_s=120) as client:
        yield client


def canonical(mistral_tok, text: str) -> list[int]:
    return mistral_tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("preset", ["default", "spans"])
def test_canonical_ids_give_the_text_paths_block(rest, mistral_tok, prose, preset):
    texts = [prose[3000:3900], prose[5000:5600]]
    params = FuseParams(preset=preset, k=8, float_dtype="f32")
    by_ids = rest.fuse(token_ids=[canonical(mistral_tok, t) for t in texts], params=params)
    by_text = rest.fuse(texts, params)
    assert_same_blocks(by_ids, by_text)
    # the same cache entry: whichever came first, the second was a hit
    assert all(b.cache_hit for b in by_text.blocks)


def test_ids_that_are_not_canonical_are_kept_exactly(rest, aligner, mistral_tok, mistral, prose):
    text = prose[7000:7400]
    ids = canonical(mistral_tok, text)
    # split the first word piece "▁Xyz" into "▁X" + "yz" where both exist: not canonical
    at = next(
        i
        for i, t in enumerate(ids)
        if len(mistral.tokens[t]) > 2
        and mistral.tokens[t][:2] in mistral.id_of
        and mistral.tokens[t][2:] in mistral.id_of
    )
    word = mistral.tokens[ids[at]]
    sampled = [*ids[:at], mistral.id_of[word[:2]], mistral.id_of[word[2:]], *ids[at + 1 :]]
    params = FuseParams(k=8, float_dtype="f32", top=None)
    rest.fuse(text, params)  # the text path's block is cached first
    reply = rest.fuse(token_ids=[sampled], params=params)
    block = reply.blocks[0].block
    np.testing.assert_array_equal(block.target_ids, sampled)
    assert not reply.blocks[0].cache_hit  # not the text path's entry: another key
    assert block.ids.shape[0] == len(sampled)
    again = rest.fuse(token_ids=[sampled], params=params)
    assert again.blocks[0].cache_hit
    assert_same_blocks(again, reply)


def test_grpc_and_async_clients_take_ids(aligner, rest, mistral_tok, mistral, prose):
    ids = [mistral.bos_id, *canonical(mistral_tok, prose[9000:9300])]  # BOS reads no text
    params = FuseParams(k=8, float_dtype="f32")
    expected = rest.fuse(token_ids=[ids], params=params)
    assert expected.blocks[0].block.target_ids[0] == mistral.bos_id
    with GrpcClient(aligner.grpc_address, timeout_s=120) as client:
        assert_same_blocks(client.fuse(token_ids=[ids], params=params), expected)

    async def both():
        async with AsyncRestClient(str(aligner.rest.base_url), timeout_s=120) as a:
            one = await a.fuse(token_ids=[ids], params=params)
        async with AsyncGrpcClient(aligner.grpc_address, timeout_s=120) as g:
            two = await g.fuse(token_ids=[ids], params=params)
        return one, two

    for reply in asyncio.run(both()):
        assert_same_blocks(reply, expected)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"token_ids": [[1, 2, 3], [400, 500, 32000]]}, "token_ids[1][2]"),
        ({"token_ids": [[5, -1, 7]]}, "token_ids[0][1]"),
        ({"token_ids": [[5]]}, "token_ids[0]"),
        ({"token_ids": [[]]}, "token_ids[0]"),
        ({"token_ids": []}, "token_ids"),
        ({"token_ids": [[5, True]]}, "token_ids[0][1]"),
        ({"token_ids": [[5, "7"]]}, "token_ids[0][1]"),
        ({"token_ids": [[5, 7.0]]}, "token_ids[0][1]"),
        ({"token_ids": [[1, 2]]}, "token_ids[0]"),  # <s> </s>: no text at all
        ({"token_ids": [list(range(100, 4200))]}, "token_ids[0]"),  # past max_block_tokens
    ],
)
def test_bad_ids_are_422_naming_the_field(aligner, body, field):
    response = aligner.rest.post("/v1/fuse", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_texts_and_ids_together_are_refused(aligner):
    response = aligner.rest.post("/v1/fuse", json={"texts": ["a b"], "token_ids": [[5, 6]]})
    assert response.status_code == 422
    assert "token_ids" in response.json()["error"]["message"]


def test_grpc_bad_ids_are_invalid_argument_naming_the_field(aligner):
    request = aligner_pb2.FuseRequest(token_ids=[aligner_pb2.TokenIds(ids=[900, 901, 99999])])
    with grpc.insecure_channel(aligner.grpc_address) as channel:
        stub = aligner_pb2_grpc.AlignerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Fuse(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith("token_ids[0][2]")
    both = aligner_pb2.FuseRequest(texts=["a b"], token_ids=[aligner_pb2.TokenIds(ids=[5, 6])])
    with GrpcClient(aligner.grpc_address, timeout_s=60) as client:
        with pytest.raises(FuseError) as refused:
            _fuse_raw(client, both)
        assert refused.value.field == "token_ids"
        with pytest.raises(ValueError, match="exactly one"):  # the client checks first
            client.fuse(["text"], token_ids=[[5, 6]])


def _fuse_raw(client, request):
    try:
        return client.stub.Fuse(request, timeout=60, metadata=client.metadata)
    except grpc.RpcError as exc:
        raise rpc_error(exc) from None
