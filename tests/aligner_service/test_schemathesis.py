"""Property-based API checks (schemathesis, bounded) against the running aligner's own OpenAPI
spec: no 5xx, every status, content type and body as documented, schema-invalid input refused.

Driven through hypothesis directly (schemathesis' pytest plugin does not load under pytest 9)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

pytestmark = pytest.mark.slow

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]


def test_the_api_keeps_to_its_spec(aligner):
    schema = schemathesis.openapi.from_url(f"{aligner.rest.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/fuse", "/v1/teachers", "/healthz"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=15,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            case.call_and_validate(checks=CHECKS, timeout=60)

        check()
