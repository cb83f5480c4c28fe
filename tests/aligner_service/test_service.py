"""The aligner service end to end: real teacher processes, real redis-server, both transports."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from transformers import AutoTokenizer

from fuseserve.aligner.cooccurrence import build_refined_map
from fuseserve.aligner.options import FusionOptions
from fuseserve.aligner.pipeline import TeacherInput, fuse_block
from fuseserve.aligner.tokenview import TokenizerView
from fuseserve.aligner.vocabmap import build_vocab_map
from fuseserve.aligner.vocabmap_store import VocabMapStore
from fuseserve.teacher.client import TeacherClient
from fuseserve.wire.messages import FusedBlock
from fuseserve.wire.v1 import aligner_pb2, aligner_pb2_grpc
from tests.conftest import encode
from tests.service_fixtures import aligner_settings, start_handle

pytestmark = pytest.mark.slow


def stub_for(handle):
    channel = grpc.insecure_channel(handle.grpc_address)
    return aligner_pb2_grpc.AlignerStub(channel), channel


@pytest.fixture(scope="module")
def text(prose):
    return prose[:1200]


def test_fused_equals_the_core_on_the_same_teacher_outputs(
    aligner, teacher_procs, tiny_dirs, mistral_tok, mistral, text
):
    stub, channel = stub_for(aligner)
    with channel:
        reply = stub.Fuse(aligner_pb2.FuseRequest(id="r1", texts=[text], k=8), timeout=120)
    assert [b.id for b in reply.blocks] == ["r1"]
    served = FusedBlock.from_bytes(reply.blocks[0].block)

    async def teacher_outputs():
        out = []
        for name, proc in teacher_procs.items():
            client = TeacherClient(f"127.0.0.1:{proc.port}")
            info = await client.info()
            scores = (await client.score([text], 8, truncate=True))[0]
            await client.close()
            out.append((name, info, scores))
        return out

    inputs = []
    for name, info, scores in asyncio.run(teacher_outputs()):
        view = TokenizerView.from_hf(AutoTokenizer.from_pretrained(tiny_dirs[name]), name)
        assert view.fingerprint == info.tokenizer_fingerprint
        inputs.append(TeacherInput(name, view, build_vocab_map(view, mistral), scores))
    ids, offsets = encode(mistral_tok, text)
    direct = fuse_block(text, mistral, ids, offsets, inputs, FusionOptions())

    np.testing.assert_array_equal(served.target_ids, direct.target_ids)
    np.testing.assert_array_equal(served.ids, direct.ids)
    np.testing.assert_array_equal(served.probs, direct.probs)
    np.testing.assert_array_equal(served.chosen, direct.chosen)
    np.testing.assert_array_equal(served.ce, direct.ce)
    np.testing.assert_array_equal(served.coverage, direct.coverage)
    assert served.teachers == ("spm", "bpe")
    assert list(reply.blocks[0].teachers) == ["spm", "bpe"]
    assert reply.blocks[0].target_fingerprint == mistral.fingerprint


def test_second_identical_request_is_a_byte_identical_cache_hit(aligner, text):
    stub, channel = stub_for(aligner)
    request = aligner_pb2.FuseRequest(texts=[text + " again"], k=8)
    with channel:
        first = stub.Fuse(request, timeout=120).blocks[0]
        second = stub.Fuse(request, timeout=120).blocks[0]
    assert not first.cache_hit and second.cache_hit
    assert first.block == second.block
    # the REST answer for the same query is a hit as well, and equal apart from that flag
    body = {"text": text + " again", "k": 8}
    a, b = aligner.rest.post("/v1/fuse", json=body), aligner.rest.post("/v1/fuse", json=body)
    assert a.status_code == b.status_code == 200
    assert a.json()["blocks"][0]["cache_hit"] and b.json()["blocks"][0]["cache_hit"]
    assert a.json() == b.json()


def test_a_request_may_ask_for_another_preset_and_teacher_subset(
    aligner, teacher_procs, tiny_dirs, mistral_tok, mistral, text
):
    """The service runs `default`; a request for `fusellm` gets that preset's vocabulary map
    (built on first use) and the same answer as the core with the original code's options."""
    stub, channel = stub_for(aligner)
    with channel:
        asked = aligner_pb2.FuseRequest(texts=[text], k=8, preset="fusellm", teachers=["bpe"])
        served = FusedBlock.from_bytes(stub.Fuse(asked, timeout=120).blocks[0].block)
        usual = aligner_pb2.FuseRequest(texts=[text], k=8, teachers=["bpe"])
        default = FusedBlock.from_bytes(stub.Fuse(usual, timeout=120).blocks[0].block)
    assert served.teachers == ("bpe",)

    async def scores():
        client = TeacherClient(f"127.0.0.1:{teacher_procs['bpe'].port}")
        out = (await client.score([text], 8, truncate=True))[0]
        await client.close()
        return out

    view = TokenizerView.from_hf(AutoTokenizer.from_pretrained(tiny_dirs["bpe"]), "bpe")
    options = FusionOptions.preset("fusellm")
    vmap = build_vocab_map(view, mistral, options.strings)
    ids, offsets = encode(mistral_tok, text)
    inputs = [TeacherInput("bpe", view, vmap, asyncio.run(scores()))]
    direct = fuse_block(text, mistral, ids, offsets, inputs, options)
    np.testing.assert_array_equal(served.ids, direct.ids)
    np.testing.assert_array_equal(served.probs, direct.probs)
    assert not np.array_equal(default.ids, served.ids)  # the presets really differ here


def test_cooc_vocab_needs_a_built_map(aligner, vocab_dir, tiny_dirs, mistral, mistral_tok, prose):
    body = {"text": prose[:600], "k": 8, "teachers": ["bpe"], "options": {"vocab": "cooc"}}
    missing = aligner.rest.post("/v1/fuse", json=body)
    assert missing.status_code == 422 and "options.vocab" in missing.text
    assert "--cooc-corpus" in missing.text
    tok = AutoTokenizer.from_pretrained(tiny_dirs["bpe"])
    view = TokenizerView.from_hf(tok, "bpe")
    store = VocabMapStore(vocab_dir)
    vmap = store.get_or_build(view, mistral, show_progress=False)
    store.save(build_refined_map(vmap, [prose], tok, mistral_tok, view, mistral))
    built = aligner.rest.post("/v1/fuse", json=body)
    assert built.status_code == 200, built.text
    assert built.json()["options"]["vocab"] == "cooc"


def test_rest_and_grpc_agree(aligner, text, mistral):
    body = {"texts": [text, "def f(x):\n    return x * 2\n"], "k": 8, "top": 4}
    rest = aligner.rest.post("/v1/fuse", json=body)
    assert rest.status_code == 200, rest.text
    stub, channel = stub_for(aligner)
    with channel:
        reply = stub.Fuse(aligner_pb2.FuseRequest(texts=body["texts"], k=8), timeout=120)
    for rest_block, grpc_block in zip(rest.json()["blocks"], reply.blocks):
        fused = FusedBlock.from_bytes(grpc_block.block)
        assert [t["name"] for t in rest_block["teachers"]] == list(fused.teachers)
        np.testing.assert_allclose([t["ce"] for t in rest_block["teachers"]], fused.ce, rtol=1e-6)
        positions = rest_block["positions"]
        assert [p["id"] for p in positions] == fused.target_ids.tolist()
        for i, p in enumerate(positions):
            assert p["token"] == mistral.tokens[p["id"]]
            keep = fused.ids[i] >= 0
            order = np.argsort(-fused.probs[i][keep], kind="stable")[:4]
            assert [c["id"] for c in p["candidates"]] == fused.ids[i][keep][order].tolist()
            np.testing.assert_allclose(
                [c["prob"] for c in p["candidates"]], fused.probs[i][keep][order], rtol=1e-6
            )
    assert "".join(p["text"] for p in rest.json()["blocks"][0]["positions"]).strip() in text


def test_concurrent_identical_requests_are_computed_once(aligner):
    text = "Concurrent callers asking the very same question share one computation."
    before = {
        name: aligner.metric(
            "fuseserve_aligner_teacher_calls_total", {"teacher": name, "outcome": "ok"}
        )
        for name in ("spm", "bpe")
    }
    with ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda _: aligner.rest.post("/v1/fuse", json={"text": text}), range(8))
        )
    assert all(r.status_code == 200 for r in replies)
    assert len({json.dumps(r.json()["blocks"][0]["positions"]) for r in replies}) == 1
    for name in ("spm", "bpe"):
        after = aligner.metric(
            "fuseserve_aligner_teacher_calls_total", {"teacher": name, "outcome": "ok"}
        )
        assert after - before[name] == 1


def test_fuse_stream_answers_in_order(aligner, prose):
    texts = [prose[i * 300 : i * 300 + 280] for i in range(6)]
    stub, channel = stub_for(aligner)
    with channel:
        requests = [aligner_pb2.FuseRequest(id=f"b{i}", texts=[t]) for i, t in enumerate(texts)]
        streamed = list(stub.FuseStream(iter(requests), timeout=180))
        assert [b.id for b in streamed] == [f"b{i}" for i in range(6)]
        for block, t in zip(streamed, texts):
            unary = stub.Fuse(aligner_pb2.FuseRequest(texts=[t]), timeout=120).blocks[0]
            assert unary.cache_hit and unary.block == block.block


BAD_REST = [
    ({"text": ""}, "text"),
    ({"texts": []}, "texts"),
    ({"text": "ok text", "k": 999}, "k"),
    ({"text": "ok text", "k": 0}, "k"),
    ({"text": "ok text", "teachers": ["nope"]}, "teachers"),
    ({"text": "ok text", "options": {"temperature": -1}}, "options.temperature"),
    ({"text": "ok text", "options": {"anchor": "input"}}, "options"),
    ({"text": "ok text", "preset": "other"}, "preset"),
    ({"text": "ok text", "colour": "blue"}, "colour"),
    ({"text": "ok", "texts": ["both"]}, "body"),
]


@pytest.mark.parametrize(("body", "field"), BAD_REST)
def test_bad_rest_input_is_422_naming_the_field(aligner, body, field):
    response = aligner.rest.post("/v1/fuse", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == field


def test_bad_grpc_input_is_invalid_argument(aligner):
    stub, channel = stub_for(aligner)
    cases = [
        (aligner_pb2.FuseRequest(texts=[]), "texts"),
        (aligner_pb2.FuseRequest(texts=["ok text"], k=999), "k"),
        (aligner_pb2.FuseRequest(texts=["ok text"], options_json="{"), "options_json"),
        (aligner_pb2.FuseRequest(texts=["ok text"], options_json='{"x": 1}'), "options.x"),
        (aligner_pb2.FuseRequest(texts=["ok text"], float_dtype="f64"), "float_dtype"),
        (aligner_pb2.FuseRequest(texts=["x" * 20000]), "texts[0]"),
    ]
    with channel:
        for request, field in cases:
            with pytest.raises(grpc.RpcError) as err:
                stub.Fuse(request, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith(field), err.value.details()
        # and the service keeps serving
        assert stub.Fuse(aligner_pb2.FuseRequest(texts=["still fine here"]), timeout=60).blocks


def test_body_too_large_is_413(aligner):
    response = aligner.rest.post(
        "/v1/fuse", content=b'{"text": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    )
    assert response.status_code == 413
    assert aligner.rest.get("/healthz").status_code == 200


def test_info_teachers_health_metrics(aligner, mistral):
    teachers = aligner.rest.get("/v1/teachers").json()
    assert [t["name"] for t in teachers] == ["spm", "bpe"] and all(t["ready"] for t in teachers)
    assert aligner.rest.get("/readyz").status_code == 200
    assert "/v1/fuse" in aligner.rest.get("/openapi.json").json()["paths"]
    metrics = aligner.rest.get("/metrics").text
    assert "fuseserve_aligner_blocks_total" in metrics
    lag_count = "fuseserve_aligner_event_loop_lag_seconds_count "
    assert float(metrics.split(lag_count)[1].split()[0]) > 0  # sampled since start-up
    stub, channel = stub_for(aligner)
    with channel:
        info = stub.Info(aligner_pb2.InfoRequest(), timeout=10)
    assert info.target_fingerprint == mistral.fingerprint and info.default_k == 10
    assert json.loads(info.default_options_json)["alignment"] == "offsets"


def test_a_spans_service_has_its_tables_at_start_up_and_sends_tails(
    service_loop, teacher_procs, tmp_path, prose
):
    """An aligner whose preset is `spans`: continuation tables are built before it is ready,
    stored next to the vocabulary maps, and every row keeps its tail mass."""
    maps = tmp_path / "maps"
    handle = start_handle(service_loop, aligner_settings(teacher_procs, maps, preset="spans"))
    try:
        assert sorted(p.name.split("-")[0] for p in maps.glob("continuations-*")) == [
            "continuations",
            "continuations",
        ]
        reply = handle.rest.post("/v1/fuse", json={"text": prose[:1500], "k": 8, "top": 50})
        assert reply.status_code == 200, reply.text
        block = reply.json()["blocks"][0]
        assert block["teachers"][1]["coverage"] > 0.97  # bpe: a distribution nearly everywhere
        rows = block["positions"][:-1]
        assert all(
            sum(c["prob"] for c in p["candidates"]) + p["tail"] == pytest.approx(1, abs=1e-3)
            for p in rows
        )
        assert sum(p["tail"] > 0 for p in rows) > len(rows) / 2
    finally:
        handle.close()


def test_overload_and_api_key(service_loop, teacher_procs, vocab_dir):
    """A second aligner (in-process LRU cache): 429 past its in-flight limit; bearer key."""
    settings = aligner_settings(
        teacher_procs, vocab_dir, max_inflight_blocks=1, api_key="s3cret-key"
    )
    handle = start_handle(service_loop, settings)
    try:
        assert handle.service.cache.name == "lru"
        body = {"texts": ["one block here", "and a second"]}
        assert handle.rest.post("/v1/fuse", json=body).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert handle.rest.post("/v1/fuse", json=body, headers=wrong).status_code == 401
        auth = {"Authorization": "Bearer s3cret-key"}
        busy = handle.rest.post("/v1/fuse", json=body, headers=auth)
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        ok = handle.rest.post("/v1/fuse", json={"text": "one block here"}, headers=auth)
        assert ok.status_code == 200
        assert handle.rest.get("/healthz").status_code == 200  # probes need no key
        stub, channel = stub_for(handle)
        with channel, pytest.raises(grpc.RpcError) as err:
            stub.Fuse(
                aligner_pb2.FuseRequest(texts=body["texts"]),
                timeout=60,
                metadata=(("authorization", "Bearer s3cret-key"),),
            )
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        handle.close()


def test_corrupt_or_foreign_cache_values_are_misses(aligner):
    import redis

    from fuseserve.aligner.service.cache import scores_key

    text = "A cached value that someone tampered with."
    service = aligner.service
    query = service.query([text], k=8)
    client = redis.Redis.from_url(aligner.running.settings.redis_url)
    prefix = aligner.running.settings.redis_prefix
    client.set(prefix + service._fused_key(query, text), b"not a codec value")
    spm = service.pool.teachers["spm"]
    foreign = FusedBlock(  # a valid value of the wrong kind under a teacher-scores key
        target_ids=np.arange(3, dtype=np.int32),
        ids=np.zeros((3, 1), dtype=np.int32),
        probs=np.ones((3, 1), dtype=np.float32),
        chosen=np.zeros(3, dtype=np.int16),
        ce=np.zeros(1, dtype=np.float32),
        coverage=np.ones(1, dtype=np.float32),
        teachers=("x",),
    ).to_bytes()
    client.set(prefix + scores_key(spm.fingerprint, 8, "f32", text), foreign)
    before = aligner.metric(
        "fuseserve_aligner_cache_lookups_total", {"level": "fused", "result": "corrupt"}
    )
    answer = aligner.rest.post("/v1/fuse", json={"text": text, "k": 8})
    assert answer.status_code == 200 and not answer.json()["blocks"][0]["cache_hit"]
    after = aligner.metric(
        "fuseserve_aligner_cache_lookups_total", {"level": "fused", "result": "corrupt"}
    )
    assert after == before + 1
    assert (
        aligner.metric(
            "fuseserve_aligner_cache_lookups_total", {"level": "scores", "result": "corrupt"}
        )
        >= 1
    )
    # the recomputed value replaced the bad one: the next request is a hit
    again = aligner.rest.post("/v1/fuse", json={"text": text, "k": 8})
    assert again.json()["blocks"][0]["cache_hit"]
