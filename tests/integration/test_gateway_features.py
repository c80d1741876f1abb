"""API Gateway features Envoy answers by itself, through a real Envoy: mock integrations, per-route rate limits
(local token buckets) and CORS. Each is set per route in `options` over the Upstream's `spec.options`; a
function records every invocation to a file, so the tests can tell what never reached it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import RecordingStack as Stack
from harness import http, recording_gateway

SECRET = "gateway-features-secret"
APP = "https://app.example.com"
EVIL = "https://evil.example.com"

FUNCTIONS = {
    "record": """
        import json, os

        def handler(event, context):
            with open(os.environ["LG_GATEWAY_RECORD"], "a") as f:
                f.write(json.dumps({"path": event["path"], "method": event["httpMethod"]}) + "\\n")
            return {"statusCode": 200, "headers": {"x-fn": "yes", "x-hidden": "h"}, "body": "from the function"}
    """,
    "boom": """
        def handler(event, context):
            raise RuntimeError("boom")
    """,
}

CONFIG_TEMPLATE = """
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData: {access_key: AKIDGATEWAY, secret_key: gateway-features-secret}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: fns}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  functions:
  - {name: record, spec: {function_name: record}}
  - {name: boom, spec: {function_name: boom}}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: open}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  options:                       # the default for routes to this Upstream
    cors: {allow_origins: ["*"]}
  functions: [{name: record, spec: {function_name: record}}]
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  routes:
  - matcher: {path: /mock, methods: [GET]}
    mock:
      status: 201
      headers: {x-mock: "yes", cache-control: no-store}
      body: {ok: true, source: mock}
  - matcher: {path: /mock-text}
    mock: {status: 503, body: "down for maintenance"}
  - matcher: {path: /mock-big}
    mock: {status: 200, headers: {x-discount: "100%", x-template: "%REQ(authorization)%"}, body: BIG_BODY}
  - matcher: {path: /mock-limited}
    mock: {status: 200, body: once}
    options:
      rate_limit: {requests: 1, per: 1h}
      cors: {allow_origins: ["https://app.example.com"], expose_headers: [x-mock]}
  - matcher: {path: /mock-any}
    mock: {status: 200, body: anyone}
    options: {cors: {allow_origins: ["*"]}}
  - matcher: {path: /mock-two, methods: [POST]}
    mock: {status: 202, body: two}
    options: {cors: {allow_origins: ["https://app.example.com", "https://admin.example.com"]}}
  - matcher: {path: /limited}
    destination: {upstream: fns, function: record}
    options: {rate_limit: {requests: 3, per: 10s}}
  - matcher: {path: /limited-twin}
    destination: {upstream: fns, function: record}
    options: {rate_limit: {requests: 3, per: 10s}}
  - matcher: {path: /free}
    destination: {upstream: fns, function: record}
  - matcher: {path: /cors-limited}
    destination: {upstream: fns, function: record}
    options:
      rate_limit: {requests: 1, per: 1h, burst: 2}
      cors: {allow_origins: ["https://app.example.com"]}
  - matcher: {path: /cors, methods: [GET]}
    destination: {upstream: fns, function: record}
    options:
      cors:
        allow_origins: ["https://app.example.com"]
        allow_headers: [content-type, x-api-key]
        expose_headers: [x-fn]
        max_age: 10m
        allow_credentials: true
  - matcher: {path: /cors-boom}
    destination: {upstream: fns, function: boom}
    options: {cors: {allow_origins: ["https://app.example.com"]}}
  - matcher: {path: /inherited}
    destination: {upstream: open, function: record}
  - matcher: {path: /overridden}
    destination: {upstream: open, function: record}
    options:
      cors: {allow_origins: ["https://app.example.com"], allow_methods: [PUT]}
"""
CONFIG = CONFIG_TEMPLATE.replace("BIG_BODY", "x" * 20000)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("gateway-features")
    with recording_gateway(tmp, FUNCTIONS, CONFIG, {"AKIDGATEWAY": SECRET}, "LG_GATEWAY_RECORD") as running:
        yield running


def preflight(stack: Stack, path: str, origin: str, method: str = "GET", headers: str = ""):
    h = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        h["Access-Control-Request-Headers"] = headers
    return http("OPTIONS", stack.base + path, headers=h)


# ---------------------------------------------------------------------------------------------------------------
# Mock integration


def test_mock_answers_status_headers_and_body_without_a_function(stack: Stack) -> None:
    before = len(stack.records())
    r = http("GET", stack.base + "/mock")
    assert r.status == 201
    assert r.json() == {"ok": True, "source": "mock"}
    assert r.header("content-type") == "application/json"  # a mapping body is JSON
    assert r.header("x-mock") == "yes" and r.header("cache-control") == "no-store"
    r = http("GET", stack.base + "/mock-text")
    assert (r.status, r.body) == (503, b"down for maintenance")
    # Bodies over Envoy's default 4 KiB for direct responses, and header values with '%' (literal text, not
    # Envoy format strings: nothing of the request is echoed) are served, not a rejected route configuration.
    r = http("GET", stack.base + "/mock-big", headers={"Authorization": "Bearer client-secret"})
    assert r.status == 200 and r.body == ("x" * 20000).encode()
    assert r.header("x-discount") == "100%" and r.header("x-template") == "%REQ(authorization)%"
    assert len(stack.records()) == before


def test_mock_route_keeps_its_method_matching(stack: Stack) -> None:
    r = http("POST", stack.base + "/mock", b"{}", {"content-type": "application/json"})
    assert r.status == 404 and r.json()["message"] == "Not Found"
    head = http("HEAD", stack.base + "/mock")  # HEAD goes with GET, without a body
    assert head.status == 201 and head.body == b""


def test_mock_route_with_rate_limit_and_cors(stack: Stack) -> None:
    # A preflight is answered before the bucket is consulted: it spends no token.
    pre = preflight(stack, "/mock-limited", APP)
    assert pre.status == 200 and pre.header("access-control-allow-origin") == APP
    first = http("GET", stack.base + "/mock-limited", headers={"Origin": APP})
    assert (first.status, first.body) == (200, b"once")
    assert first.header("access-control-allow-origin") == APP
    assert first.header("access-control-expose-headers") == "x-mock"
    second = http("GET", stack.base + "/mock-limited", headers={"Origin": APP})
    assert second.status == 429
    assert second.header("retry-after") == "3600"
    assert second.json()["message"] == "Too Many Requests"


def test_mock_cors_with_any_origin(stack: Stack) -> None:
    r = http("GET", stack.base + "/mock-any", headers={"Origin": EVIL})
    assert (r.status, r.body) == (200, b"anyone")
    assert r.header("access-control-allow-origin") == EVIL
    plain = http("GET", stack.base + "/mock-any")
    assert plain.status == 200 and plain.header("access-control-allow-origin") is None


def test_mock_cors_with_several_origins(stack: Stack) -> None:
    for origin in (APP, "https://admin.example.com"):
        r = http("POST", stack.base + "/mock-two", b"", headers={"Origin": origin})
        assert (r.status, r.body) == (202, b"two")
        assert r.header("access-control-allow-origin") == origin
        pre = preflight(stack, "/mock-two", origin, "POST")
        assert pre.header("access-control-allow-origin") == origin
        assert pre.header("access-control-allow-methods") == "POST"
    r = http("POST", stack.base + "/mock-two", b"", headers={"Origin": EVIL})
    assert (r.status, r.body) == (202, b"two")
    assert r.header("access-control-allow-origin") is None
    assert preflight(stack, "/mock-two", EVIL, "POST").header("access-control-allow-origin") is None
    assert http("GET", stack.base + "/mock-two").status == 404  # the method matching holds


# ---------------------------------------------------------------------------------------------------------------
# Rate limit


def test_rate_limit_answers_429_with_retry_after_and_json(stack: Stack) -> None:
    before = len(stack.records())
    streams = stack.extproc_streams()
    statuses = [http("GET", stack.base + "/limited").status for _ in range(3)]
    assert statuses == [200, 200, 200]
    r = http("GET", stack.base + "/limited")
    assert r.status == 429
    assert r.header("content-type") == "application/json"
    body = r.json()
    assert body["message"] == "Too Many Requests"
    assert body["requestId"]
    retry_after = r.header("retry-after")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1
    assert int(retry_after) == 4  # 3 per 10 s: a token every 3.3 s, rounded up to whole seconds
    # The limited request never reached the function, nor cost an ext_proc stream.
    calls = stack.records()[before:]
    assert [c["path"] for c in calls] == ["/limited"] * 3
    assert stack.extproc_streams() == streams + 3

    # Other routes are unaffected: one without a limit, and one with the same limit but its own bucket.
    assert http("GET", stack.base + "/free").status == 200
    assert [http("GET", stack.base + "/limited-twin").status for _ in range(3)] == [200, 200, 200]
    assert http("GET", stack.base + "/limited-twin").status == 429


def test_rate_limited_answer_carries_cors_headers(stack: Stack) -> None:
    # burst 2: two requests pass, the third is limited; a browser on an allowed origin can read the 429.
    statuses = [http("GET", stack.base + "/cors-limited", headers={"Origin": APP}) for _ in range(3)]
    assert [r.status for r in statuses] == [200, 200, 429]
    assert all(r.header("access-control-allow-origin") == APP for r in statuses)
    assert statuses[2].header("retry-after") == "3600"
    # Preflights do not spend tokens either.
    pre = preflight(stack, "/cors-limited", APP)
    assert pre.status == 200 and pre.header("access-control-allow-origin") == APP


# ---------------------------------------------------------------------------------------------------------------
# CORS


def test_preflight_from_allowed_origin_is_answered_by_envoy(stack: Stack) -> None:
    before = len(stack.records())
    streams = stack.extproc_streams()
    r = preflight(stack, "/cors", APP, "GET", "content-type,x-api-key")
    assert r.status == 200
    assert r.header("access-control-allow-origin") == APP
    assert r.header("access-control-allow-methods") == "GET"  # the route's methods, allow_methods unset
    assert r.header("access-control-allow-headers") == "content-type,x-api-key"
    assert r.header("access-control-max-age") == "600"
    assert r.header("access-control-allow-credentials") == "true"
    # The route only takes GET, yet the preflight (an OPTIONS) was answered, and no function saw it.
    assert len(stack.records()) == before
    assert stack.extproc_streams() == streams


def test_preflight_from_other_origin_gets_no_cors_headers(stack: Stack) -> None:
    before = len(stack.records())
    streams = stack.extproc_streams()
    r = preflight(stack, "/cors", EVIL)
    # Answered by Envoy too, but without access-control-allow-origin: the browser refuses the request.
    assert r.status == 200
    assert r.header("access-control-allow-origin") is None
    assert len(stack.records()) == before
    assert stack.extproc_streams() == streams


def test_actual_request_gets_cors_headers_on_the_functions_answer(stack: Stack) -> None:
    before = len(stack.records())
    r = http("GET", stack.base + "/cors", headers={"Origin": APP})
    assert (r.status, r.body) == (200, b"from the function")
    assert r.header("x-fn") == "yes"  # ext_proc's rewrite of Lambda's answer, then CORS on top
    assert r.header("access-control-allow-origin") == APP
    assert r.header("access-control-expose-headers") == "x-fn"
    assert r.header("access-control-allow-credentials") == "true"
    assert stack.records()[before:] == [{"path": "/cors", "method": "GET"}]

    other = http("GET", stack.base + "/cors", headers={"Origin": EVIL})
    assert other.status == 200 and other.header("access-control-allow-origin") is None
    plain = http("GET", stack.base + "/cors")
    assert plain.status == 200 and plain.header("access-control-allow-origin") is None
    # The route's method matching still holds for everything but preflights.
    assert http("OPTIONS", stack.base + "/cors", headers={"Origin": APP}).status == 404


def test_error_answers_get_cors_headers_too(stack: Stack) -> None:
    r = http("GET", stack.base + "/cors-boom", headers={"Origin": APP})
    assert r.status == 502 and r.json()["message"] == "Internal server error"
    assert r.header("access-control-allow-origin") == APP


def test_an_options_request_that_is_no_preflight_reaches_the_function(stack: Stack) -> None:
    before = len(stack.records())
    r = http(
        "OPTIONS", stack.base + "/inherited", headers={"Origin": APP}
    )  # no Access-Control-Request-Method
    assert r.status == 200 and r.body == b"from the function"
    assert r.header("access-control-allow-origin") == APP
    assert stack.records()[before:] == [{"path": "/inherited", "method": "OPTIONS"}]


def test_cors_from_the_upstream_options_and_a_route_override(stack: Stack) -> None:
    before = len(stack.records())
    r = preflight(stack, "/inherited", EVIL, "DELETE")
    # The Upstream's `allow_origins: ["*"]`: any origin; the route takes every method, so all are allowed.
    assert r.status == 200 and r.header("access-control-allow-origin") == EVIL
    assert "DELETE" in (r.header("access-control-allow-methods") or "").split(",")
    get = http("GET", stack.base + "/inherited", headers={"Origin": EVIL})
    assert get.status == 200 and get.header("access-control-allow-origin") == EVIL

    # The route's own cors replaces the Upstream's.
    assert preflight(stack, "/overridden", EVIL).header("access-control-allow-origin") is None
    r = preflight(stack, "/overridden", APP, "PUT")
    assert r.header("access-control-allow-origin") == APP
    assert r.header("access-control-allow-methods") == "PUT"
    assert [c for c in stack.records()[before:] if c["method"] == "OPTIONS"] == []
