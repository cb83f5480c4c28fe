"""Hostile or broken input against the running aligner: never a 500, never a stall.

Lone surrogates, huge texts, invalid UTF-8, deeply nested JSON, oversize chunked bodies, loose
types, empty lists, garbage gRPC payloads: each is a 4xx (or INVALID_ARGUMENT) in the error
envelope naming the field, documented in the OpenAPI spec, and the service keeps answering.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import grpc
import httpx
import pytest

from fuseserve.wire.v1 import aligner_pb2
from tests.aligner_service.test_service import stub_for

pytestmark = pytest.mark.slow


def assert_envelope(response, status, field=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] and error["message"]
    if field is not None:
        assert error["field"] == field, error
    return error


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": "ab \ud800 ef"}, "text"),
        ({"texts": ["fine text here", "lone \udfff low"]}, "texts[1]"),
    ],
)
def test_lone_surrogates_are_422_naming_the_text_and_keep_the_connection(aligner, body, field):
    with httpx.Client(base_url=str(aligner.rest.base_url), timeout=60) as client:
        raw = json.dumps(body).encode()  # \ud800 escapes: JSON allows them, UTF-8 cannot
        response = client.post(
            "/v1/fuse", content=raw, headers={"content-type": "application/json"}
        )
        error = assert_envelope(response, 422, field)
        assert "surrogate" in error["message"] and error["message"].startswith(field)
        # the same keep-alive connection still serves
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"text": "ok text", "k": "3"}, "k"),
        ({"text": "ok text", "k": True}, "k"),
        ({"text": "ok text", "k": 3.0}, "k"),
        ({"text": "ok text", "top": "5"}, "top"),
        ({"text": 12345}, "text"),
        ({"texts": []}, "texts"),
        ({"texts": ["fine", ""]}, "texts[1]"),
        ({"text": "ok text", "teachers": "spm"}, "teachers"),
        ({"text": "ok text", "teachers": []}, "teachers"),
        ({"text": "ok text", "options": []}, "options"),
    ],
)
def test_strict_types_and_empty_lists(aligner, body, field):
    assert_envelope(aligner.rest.post("/v1/fuse", json=body), 422, field)


def test_huge_text_is_rejected_before_tokenising_while_health_answers(aligner):
    """A 7.8 MB text (under the 8 MB body limit) is over max_text_chars: 422 naming it, and
    /healthz keeps answering meanwhile (no tokenising on the event loop)."""
    huge = {"text": "word " * (7_800_000 // 5)}
    result = {}

    def post():
        with httpx.Client(base_url=str(aligner.rest.base_url), timeout=120) as client:
            result["response"] = client.post("/v1/fuse", json=huge)

    worker = threading.Thread(target=post)
    worker.start()
    slowest = 0.0
    with httpx.Client(base_url=str(aligner.rest.base_url), timeout=30) as client:
        while worker.is_alive():
            start = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            slowest = max(slowest, time.perf_counter() - start)
            worker.join(0.01)  # the next probe once the post is done or 10 ms have passed
    worker.join()
    error = assert_envelope(result["response"], 422, "texts[0]")
    assert "max_text_chars" in error["message"]
    assert slowest < 5.0  # generous: proves no stall, not a latency figure


def test_text_over_the_byte_limit_is_422(aligner):
    # under max_text_chars (262144) but 4 bytes per character: over max_text_bytes (512 KiB)
    body = {"texts": ["short one", "\U0001f600" * 200_000]}
    error = assert_envelope(aligner.rest.post("/v1/fuse", json=body), 422, "texts[1]")
    assert "max_text_bytes" in error["message"]


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b'{"text": "caf\xe9 au lait"}', "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"text": "unterminated', "JSON"),
        (b"", ""),
    ],
)
def test_unparseable_bodies_are_422_in_the_envelope(aligner, content, expect):
    response = aligner.rest.post(
        "/v1/fuse", content=content, headers={"content-type": "application/json"}
    )
    error = assert_envelope(response, 422)
    assert error["field"] in ("body", "")
    assert expect in error["message"]


def test_oversize_chunked_body_is_413_in_the_envelope(aligner):
    def chunks():
        yield b'{"text": "'
        for _ in range(9):
            yield b"a" * (1024 * 1024)
        yield b'"}'

    response = aligner.rest.post(
        "/v1/fuse", content=chunks(), headers={"content-type": "application/json"}
    )
    error = assert_envelope(response, 413)
    assert error["type"] == "PayloadTooLarge" and "max_body_bytes" in error["message"]
    assert aligner.rest.get("/healthz").status_code == 200


def test_unknown_paths_and_methods_use_the_envelope(aligner):
    assert assert_envelope(aligner.rest.get("/v1/nope"), 404)["type"] == "NotFound"
    assert assert_envelope(aligner.rest.get("/v1/fuse"), 405)["type"] == "MethodNotAllowed"


def test_openapi_documents_every_error_and_the_schema_matches_behaviour(aligner):
    spec = aligner.rest.get("/openapi.json").json()
    fuse = spec["paths"]["/v1/fuse"]["post"]
    for status in ("401", "408", "413", "422", "429", "503"):
        ref = fuse["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorEnvelope"), (status, ref)
    body = spec["components"]["schemas"]["FuseBody"]["properties"]
    texts = next(s for s in body["texts"]["anyOf"] if s.get("type") == "array")
    assert texts["minItems"] == 1 and texts["items"]["minLength"] == 1
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert fuse["security"] == [{"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]


def raw_unary(address, method, payload):
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(method)
        return call(payload, timeout=30)


@pytest.mark.parametrize(
    "payload",
    [
        b"\xff\xff\xff\xff garbage",
        aligner_pb2.FuseRequest(texts=["x"]).SerializeToString().replace(b"x", b"\xff"),
    ],
)
def test_malformed_grpc_payloads_are_invalid_argument(aligner, payload):
    with pytest.raises(grpc.RpcError) as err:
        raw_unary(aligner.grpc_address, "/fuseserve.aligner.v1.Aligner/Fuse", payload)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.details().startswith("request: not a valid message")
    with grpc.insecure_channel(aligner.grpc_address) as channel:
        stream = channel.stream_stream("/fuseserve.aligner.v1.Aligner/FuseStream")
        with pytest.raises(grpc.RpcError) as err:
            list(stream(iter([payload]), timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value


def test_a_20mb_grpc_text_is_rejected_at_once(aligner):
    stub, channel = stub_for(aligner)
    with channel:
        start = time.perf_counter()
        with pytest.raises(grpc.RpcError) as err:
            stub.Fuse(aligner_pb2.FuseRequest(texts=["ok", "y" * 20_000_000]), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("texts[1]: 20000000 characters exceed")
        assert time.perf_counter() - start < 30  # generous: no tokenising of 20 MB


def test_a_body_that_never_arrives_times_out_with_408(guarded_aligner):
    """Content-Length 100, 4 bytes sent: the connection is answered 408 and closed after
    body_timeout_s (1 s here), not held open."""
    host, port = "127.0.0.1", guarded_aligner.running.rest_port
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/fuse HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"te'
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    assert b"body_timeout_s" in data


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_by_its_content_type_is_415(aligner, content_type):
    body = json.dumps({"text": "a valid body, wrongly labelled"}).encode()
    response = aligner.rest.post("/v1/fuse", content=body, headers={"content-type": content_type})
    error = assert_envelope(response, 415, "content-type")
    assert "application/json" in error["message"]
    labelled = {"content-type": "application/json; charset=utf-8"}
    assert aligner.rest.post("/v1/fuse", content=body, headers=labelled).status_code == 200


def test_nul_and_other_control_characters_are_text_like_any_other(aligner):
    """Policy: a NUL (or any other control character) is a character of the text; every
    tokenizer here has a token or a byte for it, so it is fused, on both transports, and a
    cache hit returns the same block."""
    text = "before\x00after\x01\x1f and more text"
    rest = aligner.rest.post("/v1/fuse", json={"text": text, "top": 3})
    assert rest.status_code == 200, rest.text
    positions = rest.json()["blocks"][0]["positions"]
    assert "".join(p["text"] for p in positions) == text  # the NUL is a position's text
    stub, channel = stub_for(aligner)
    with channel:
        reply = stub.Fuse(aligner_pb2.FuseRequest(texts=[text]), timeout=120)
    assert reply.blocks[0].cache_hit  # the same block, keyed by the same characters
