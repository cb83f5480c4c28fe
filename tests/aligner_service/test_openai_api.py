"""The vLLM-compatible teacher endpoint (``/health``, ``/v1/models``, ``/v1/completions``) on the
real aligner (teachers spm + bpe as processes, Redis): vLLM's answer schema, the numbers equal
to the aligner's own ``/v1/fuse`` rows of the same ids, temperature, errors in OpenAI's shape
naming the field, the bearer key, and the request metric."""

from __future__ import annotations

import json
import math

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from fuseserve.aligner.service.openai_api import add_openai_routes, as_openai
from fuseserve.aligner.service.openai_logprobs import prompt_logprobs, tempered
from fuseserve.aligner.service.settings import load_settings
from fuseserve.client import FuseParams, RestClient
from fuseserve.errors import InvalidRequest, Overloaded, Unavailable

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def seqs(mistral_tok, mistral, prose):
    a = [mistral.bos_id, *mistral_tok(prose[100:400], add_special_tokens=False)["input_ids"]]
    b = mistral_tok(prose[2000:2150], add_special_tokens=False)["input_ids"]
    # a sampled-looking continuation: "▁H" + "ello" is not how the tokenizer writes "Hello"
    b = [*b, mistral.id_of["▁H"], mistral.id_of["ello"], mistral.eos_id]
    return [a, b]


@pytest.fixture(scope="module")
def model(aligner):
    return aligner.rest.get("/v1/models").json()["data"][0]["id"]


def complete(aligner, **body):
    return aligner.rest.post("/v1/completions", json=body)


def test_health_and_models(aligner, model):
    health = aligner.rest.get("/health")
    assert health.status_code == 200
    assert model == "fuseserve/shipped:mistral-v1"
    card = aligner.rest.get("/v1/models").json()
    assert card["object"] == "list" and card["data"][0]["object"] == "model"


def test_answer_is_vllms_schema_with_the_fused_rows(aligner, seqs, model, mistral):
    before = aligner.metric(
        "fuseserve_aligner_requests_total", {"transport": "openai", "outcome": "ok"}
    )
    counter = "fuseserve_aligner_openai_positions_total"
    counted = sum(aligner.metric(counter, {"actual": a}) for a in ("listed", "tail", "zero"))
    answer = complete(
        aligner, model=model, prompt=seqs, max_tokens=1, temperature=1.0, prompt_logprobs=3
    )
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["object"] == "text_completion" and doc["model"] == model
    total = sum(len(s) for s in seqs)
    assert doc["usage"] == {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0}
    with RestClient(str(aligner.rest.base_url), timeout_s=120) as rest:
        fused = rest.fuse(token_ids=seqs, params=FuseParams(preset="spans", float_dtype="f32"))
    for i, (choice, seq) in enumerate(zip(doc["choices"], seqs)):
        assert choice["index"] == i and choice["text"] == "" and choice["logprobs"] is None
        positions = choice["prompt_logprobs"]
        assert len(positions) == len(seq) and positions[0] is None
        expected = prompt_logprobs(fused.blocks[i].block, 3, 1.0, mistral)
        for pos in range(1, len(seq)):
            entries = positions[pos]
            actual = entries[str(seq[pos])]  # the actual token is always there
            assert math.isfinite(actual["logprob"])
            assert actual["logprob"] == pytest.approx(expected.actual_logprobs[pos - 1], abs=1e-9)
            ranked = sorted(entries.values(), key=lambda e: e["rank"])
            assert [e["rank"] for e in ranked][: min(3, len(ranked))] == list(
                range(1, min(3, len(ranked)) + 1)
            )
            top = [int(t) for t, e in sorted(entries.items(), key=lambda kv: kv[1]["rank"])][:3]
            listed = expected.top_ids[pos - 1]
            assert top[: (listed >= 0).sum()] == listed[listed >= 0].tolist()
            assert len(entries) <= 4
    after = aligner.metric(
        "fuseserve_aligner_requests_total", {"transport": "openai", "outcome": "ok"}
    )
    assert after == before + 1
    now = sum(aligner.metric(counter, {"actual": a}) for a in ("listed", "tail", "zero"))
    assert now - counted == sum(len(s) - 1 for s in seqs)


def test_temperature_is_applied_to_the_fused_rows(aligner, seqs, mistral):
    hot = complete(aligner, prompt=seqs[1], prompt_logprobs=1, temperature=2.0).json()
    cold = complete(aligner, prompt=seqs[1], prompt_logprobs=1).json()
    with RestClient(str(aligner.rest.base_url), timeout_s=120) as rest:
        block = (
            rest.fuse(token_ids=[seqs[1]], params=FuseParams(preset="spans", float_dtype="f32"))
            .blocks[0]
            .block
        )
    q, _ = tempered(np.where(block.ids >= 0, block.probs, 0.0), block.tail_mass, 2.0)
    pos = 5
    token = seqs[1][pos]
    p = q[pos - 1][block.ids[pos - 1] == token].sum()
    assert hot["choices"][0]["prompt_logprobs"][pos][str(token)]["logprob"] == pytest.approx(
        math.log(p), abs=1e-9
    )
    assert cold != hot


def test_string_prompt_single_list_and_one_token(aligner, seqs, mistral_tok):
    text = complete(aligner, prompt="def add(a, b):\n    return a + b", prompt_logprobs=0)
    ids = mistral_tok("def add(a, b):\n    return a + b")["input_ids"]
    positions = text.json()["choices"][0]["prompt_logprobs"]
    assert len(positions) == len(ids)
    assert all(list(p) == [str(t)] for p, t in zip(positions[1:], ids[1:]))  # K = 0: actual only
    one = complete(aligner, prompt=[seqs[0][:5], [seqs[0][0]]], prompt_logprobs=1).json()
    assert one["choices"][1]["prompt_logprobs"] == [None]
    none = complete(aligner, prompt=seqs[0], max_tokens=0, logprobs=2).json()
    assert none["choices"][0]["prompt_logprobs"] is None
    assert none["choices"][0]["logprobs"]["tokens"] == []


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": [[1, 500, 600], [700, 800, 99999]], "prompt_logprobs": 1}, 400, "prompt[1][2]"),
        ({"prompt": [500, -3, 600], "prompt_logprobs": 1}, 400, "prompt[1]"),
        ({"prompt": [[500, 600], []], "prompt_logprobs": 1}, 400, "prompt[1]"),
        ({"prompt": [], "prompt_logprobs": 1}, 400, "prompt"),
        ({"prompt": [[500, "x"]], "prompt_logprobs": 1}, 400, "prompt[0][1]"),
        ({"prompt": [500, 600], "prompt_logprobs": -1}, 400, "prompt_logprobs"),
        ({"prompt": [500, 600], "prompt_logprobs": 999}, 400, "prompt_logprobs"),
        ({"prompt": [500, 600], "prompt_logprobs": "3"}, 400, "prompt_logprobs"),
        ({"prompt": [500, 600], "max_tokens": 16}, 400, "max_tokens"),
        ({"prompt": [500, 600], "n": 2}, 400, "n"),
        ({"prompt": [500, 600], "stream": True}, 400, "stream"),
        ({"prompt": [500, 600], "temperature": 0}, 400, "temperature"),
        ({"prompt": [500, 600], "model": "gpt-4"}, 404, "model"),
        ({"prompt": [list(range(300, 4500))], "prompt_logprobs": 1}, 400, "prompt[0]"),
    ],
)
def test_errors_have_openais_shape_and_name_the_field(aligner, body, status, param):
    answer = complete(aligner, **body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["code"] == status
    assert error["message"] and error["type"]


def test_prompts_per_request_are_the_max_prompts_setting(aligner, monkeypatch):
    answer = complete(aligner, prompt=[[500]] * 4097)
    error = answer.json()["error"]
    assert answer.status_code == 400 and error["param"] == "prompt"
    assert "4097 sequences exceed max_prompts=4096" in error["message"]
    monkeypatch.setenv("FUSESERVE_ALIGNER_MAX_PROMPTS", "2")
    assert load_settings().max_prompts == 2
    with pytest.raises(ValidationError, match="max_prompts"):
        load_settings(max_prompts=0)


def test_a_body_that_is_not_json_is_400(aligner):
    answer = aligner.rest.post("/v1/completions", content=b"{not json")
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "body"


def test_service_errors_map_to_openai_statuses():
    assert as_openai(InvalidRequest("token_ids[0][3]", "bad"), single=True).param == "prompt[3]"
    assert as_openai(InvalidRequest("k", "too big")).param == "prompt_logprobs"
    assert as_openai(Overloaded("busy", 3.0)).status == 429
    assert as_openai(Unavailable("teacher 'spm' is down")).status == 503


def test_bearer_key(aligner, service_loop, seqs):
    """The same routes with a key, on the running service (an in-process ASGI app)."""
    app = FastAPI()
    add_openai_routes(app, aligner.service, aligner.running.metrics, "m", "s3cret")

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            body = {"prompt": seqs[1][:8], "prompt_logprobs": 1}
            return (
                await client.get("/v1/models"),
                await client.post("/v1/completions", json=body),
                await client.post(
                    "/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}
                ),
                await client.get("/health"),
            )

    models, refused, allowed, health = service_loop.run(go())
    assert models.status_code == refused.status_code == 401
    assert refused.json()["error"]["code"] == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert allowed.status_code == 200 and health.status_code == 200
    assert json.loads(allowed.content)["model"] == "m"
