"""Teacher handles on a real aligner (teachers spm + bpe as processes): a request picks each
teacher once and keeps what it picked, readiness has one rule, and the ``teacher_ready`` gauge,
``/readyz`` and the requests follow every change of it."""

from __future__ import annotations

import pytest

from fuseserve.errors import InvalidRequest, Unavailable
from fuseserve.wire.requests import FuseCall
from tests.service_fixtures import aligner_settings, start_handle

pytestmark = pytest.mark.slow

TEXT = "Handles are picked once per request."


@pytest.fixture(scope="module")
def handled(service_loop, teacher_procs, vocab_dir):
    # no health watch: it would bring back a teacher these tests mark down
    settings = aligner_settings(teacher_procs, vocab_dir, health_interval_s=0)
    handle = start_handle(service_loop, settings)
    yield handle
    handle.close()


def test_a_request_picks_each_teacher_once_in_the_order_named(handled):
    pool = handled.service.pool
    picked = pool.pick(["bpe", "spm"])
    assert [h.name for h in picked] == ["bpe", "spm"]
    for handle in picked:
        teacher = pool.teachers[handle.name]
        assert handle.ready and handle.why == ""
        assert handle.fingerprint == teacher.fingerprint and handle.view is teacher.view
        assert handle.vocab_map is teacher.vocab_map and handle.load is teacher.load
        assert handle.max_k == min(teacher.info.max_k, teacher.view.vocab_size)
    query = handled.service.query([TEXT], teachers=["bpe", "spm"])
    assert query.teachers == ("bpe", "spm")


def test_a_picked_handle_keeps_its_fingerprint_while_the_teacher_changes(handled):
    """What a request picked decides its cache keys, even if the teacher changes meanwhile."""
    service = handled.service
    teacher = service.pool.teachers["spm"]
    query = service.query([TEXT], teachers=["spm"])
    key = service._fused_key(query, TEXT)
    fingerprint = teacher.fingerprint
    try:
        teacher.fingerprint = "another-model"
        assert service._fused_key(query, TEXT) == key
        assert service._fused_key(service.query([TEXT], teachers=["spm"]), TEXT) != key
    finally:
        teacher.fingerprint = fingerprint


def test_readiness_has_one_rule_and_everything_follows_it(handled):
    service, teacher = handled.service, handled.service.pool.teachers["bpe"]
    gauge = "fuseserve_aligner_teacher_ready"
    before = service.pool.pick(["bpe"])[0]
    try:
        teacher.mark(down="teacher 'bpe' is not serving (a test)")
        assert handled.metric(gauge, {"teacher": "bpe"}) == 0
        assert not service.ready and before.ready  # a handle is what was picked
        ready = handled.rest.get("/readyz")
        assert ready.status_code == 503 and "a test" in ready.json()["teachers"]["bpe"]
        with pytest.raises(Unavailable, match="a test"):
            service.query([TEXT])
        assert service.query([TEXT], teachers=["spm"]).teachers == ("spm",)
    finally:
        teacher.mark(down="")
    assert handled.metric(gauge, {"teacher": "bpe"}) == 1 and service.ready
    answer = handled.loop.run(service.answer(FuseCall("", (TEXT,)), "rest"))
    assert answer.teachers == ("spm", "bpe") and len(answer.blocks) == 1


def test_an_unknown_teacher_is_the_callers_mistake(handled):
    with pytest.raises(InvalidRequest) as err:
        handled.service.query([TEXT], teachers=["spm", "nobody"])
    assert err.value.field == "teachers" and "nobody" in str(err.value)
