"""Route options through a real Envoy: payload format 2.0, invocation types, timeouts, payload limits and
stage variables, set per route with defaults per Upstream."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from harness import RecordingStack as Stack
from harness import http, recording_gateway, wait_until

SECRET = "options-secret-value"

FUNCTIONS = {
    "echo": """
        def handler(event, context):
            return event  # no statusCode: HTTP API answers it as a JSON 200
    """,
    "structured": """
        def handler(event, context):
            return {"statusCode": 201, "headers": {"x-kind": "structured"}, "cookies": ["a=1", "b=2; Path=/"],
                    "body": "made"}
    """,
    "v1echo": """
        import json

        def handler(event, context):
            return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(event)}
    """,
    "record": """
        import json, os

        def handler(event, context):
            with open(os.environ["LG_RECORD"], "a") as f:
                f.write(json.dumps({"path": event.get("path") or event.get("rawPath")}) + "\\n")
            return {"statusCode": 200, "body": "recorded"}
    """,
    "slow": """
        import time

        def handler(event, context):
            time.sleep(2)
            return {"statusCode": 200, "body": "late"}
    """,
}

CONFIG = """
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData: {access_key: AKIDOPTIONS, secret_key: options-secret-value}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: v2}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  options: {payload_format: apigateway-v2}     # the default for routes to this Upstream
  functions:
  - {name: echo, spec: {function_name: echo}}
  - {name: structured, spec: {function_name: structured}}
  - {name: v1echo, spec: {function_name: v1echo}}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: plain}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  functions:
  - {name: record, spec: {function_name: record}}
  - {name: slow, spec: {function_name: slow}}
  - {name: v1echo, spec: {function_name: v1echo}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  stage: beta
  stage_variables: {backend: blue, limit: "10"}
  routes:
  - matcher: {path: "/v2/items/{id}", methods: [GET, POST]}
    destination: {upstream: v2, function: echo}
  - matcher: {path: /v2/structured}
    destination: {upstream: v2, function: structured}
  - matcher: {path: /v2/back-to-v1}
    destination: {upstream: v2, function: v1echo}
    options: {payload_format: apigateway-v1}   # the route's own option wins
  - matcher: {path: /v1}
    destination: {upstream: plain, function: v1echo}
  - matcher: {path: /async}
    destination: {upstream: plain, function: record}
    options: {invocation_type: Event}
  - matcher: {path: /dry}
    destination: {upstream: plain, function: record}
    options: {invocation_type: DryRun}
  - matcher: {path: /slow}
    destination: {upstream: plain, function: slow}
    options: {timeout: 500ms}
  - matcher: {path: /patient}
    destination: {upstream: plain, function: slow}
    options: {timeout: 10s}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("options")
    with recording_gateway(tmp, FUNCTIONS, CONFIG, {"AKIDOPTIONS": SECRET}, "LG_RECORD") as running:
        yield running


def test_payload_format_2_event(stack: Stack) -> None:
    r = http(
        "GET",
        stack.base + "/v2/items/a%20b?tag=x&tag=y&q=1",
        headers={"Cookie": "s=1; t=2", "X-Multi": "one", "User-Agent": "tester/1"},
    )
    assert r.status == 200
    assert r.header("content-type") == "application/json"
    event = r.json()
    assert event["version"] == "2.0"
    assert event["routeKey"] == "GET|POST /v2/items/{id}"
    assert event["rawPath"] == "/v2/items/a%20b"
    assert event["rawQueryString"] == "tag=x&tag=y&q=1"
    assert event["queryStringParameters"] == {"tag": "x,y", "q": "1"}
    assert event["cookies"] == ["s=1", "t=2"]
    assert "cookie" not in event["headers"]
    assert event["headers"]["x-multi"] == "one"
    assert event["pathParameters"] == {"id": "a b"}
    assert event["stageVariables"] == {"backend": "blue", "limit": "10"}
    ctx = event["requestContext"]
    assert ctx["http"]["method"] == "GET" and ctx["http"]["userAgent"] == "tester/1"
    assert ctx["http"]["sourceIp"] == "127.0.0.1"
    assert ctx["stage"] == "beta" and ctx["routeKey"] == event["routeKey"]
    assert "body" not in event and event["isBase64Encoded"] is False

    binary = bytes(range(256))
    r = http("POST", stack.base + "/v2/items/7", binary, {"content-type": "application/octet-stream"})
    assert r.status == 200
    assert r.json()["isBase64Encoded"] is True
    import base64

    assert base64.b64decode(r.json()["body"]) == binary


def test_payload_format_2_structured_response(stack: Stack) -> None:
    r = http("GET", stack.base + "/v2/structured")
    assert r.status == 201 and r.body == b"made"
    assert r.header("x-kind") == "structured"
    assert r.all("set-cookie") == ["a=1", "b=2; Path=/"]


def test_route_option_overrides_the_upstream_default(stack: Stack) -> None:
    event = json.loads(http("GET", stack.base + "/v2/back-to-v1?a=1&a=2").body)
    assert "version" not in event and event["httpMethod"] == "GET"
    assert event["multiValueQueryStringParameters"] == {"a": ["1", "2"]}
    assert event["stageVariables"] == {"backend": "blue", "limit": "10"}
    assert event["requestContext"]["stage"] == "beta"


def test_event_invocation_answers_202_and_runs_later(stack: Stack) -> None:
    before = len(stack.records())
    r = http("POST", stack.base + "/async", b'{"x": 1}', {"content-type": "application/json"})
    assert r.status == 202 and r.body == b""
    wait_until(lambda: len(stack.records()) == before + 1, 10, what="the async invocation to run")
    assert stack.records()[-1] == {"path": "/async"}


def test_dry_run_answers_204_and_runs_nothing(stack: Stack) -> None:
    before = len(stack.records())
    r = http("GET", stack.base + "/dry")
    assert r.status == 204
    time.sleep(0.3)
    assert len(stack.records()) == before


def test_route_timeout_is_a_504_not_a_200(stack: Stack) -> None:
    started = time.monotonic()
    r = http("GET", stack.base + "/slow")
    took = time.monotonic() - started
    assert r.status == 504
    assert r.json()["message"] == "Endpoint request timed out"
    assert took < 1.8  # the route's 500 ms, not the function's 2 s
    r = http("GET", stack.base + "/patient")
    assert r.status == 200 and r.body == b"late"


def test_payloads_over_lambdas_limits_are_413_before_invoking(stack: Stack) -> None:
    before = len(stack.records())
    # 1.1 MB: fine synchronously, over the 1 MB limit of an asynchronous invocation.
    big = b"x" * (1100 * 1024)
    r = http("POST", stack.base + "/async", big, {"content-type": "text/plain"})
    assert r.status == 413 and r.json()["message"] == "Request payload too large"
    assert http("POST", stack.base + "/v1", big, {"content-type": "text/plain"}).status == 200
    # 6.5 MB: over the 6 MB of a synchronous invocation (and under Envoy's 10 MiB buffer).
    r = http("POST", stack.base + "/v1", b"y" * (6500 * 1024), {"content-type": "text/plain"})
    assert r.status == 413
    time.sleep(0.3)
    assert len(stack.records()) == before
