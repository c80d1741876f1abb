"""Issue 5's invocation features through a real Envoy, ext_proc and our local Lambda endpoint: the raw (KrakenD)
payload format, every way a destination names its function (a Lambda name or ARN, a path parameter, weighted
choices), retries signed again per attempt, the error mapping, Retry-After, the log tail and trace headers."""

from __future__ import annotations

import logging
import re
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from harness import RecordingStack as Stack
from harness import http, recording_gateway

SECRET = "features-secret-value"

FUNCTIONS = {
    "echo": """
        import json, os

        def handler(event, context):
            return {"statusCode": 200, "headers": {"content-type": "application/json"},
                    "body": json.dumps({"event": event, "fn": context.function_name,
                                        "arn": context.invoked_function_arn,
                                        "trace": os.environ.get("_X_AMZN_TRACE_ID")})}
    """,
    "other": """
        def handler(event, context):
            return {"statusCode": 200, "body": "other"}
    """,
    "raw": """
        import json, os

        def handler(event, context):
            with open(os.environ["LG_FEATURES_RECORD"], "a") as f:
                f.write('"raw"\\n')
            return {"got": event, "fn": context.function_name}
    """,
    "boom": """
        def handler(event, context):
            raise ValueError("kaboom")
    """,
    "garbage": """
        def handler(event, context):
            return {"statusCode": "teapot"}
    """,
    "chatty": """
        def handler(event, context):
            print("chatty says: the secret sauce is 42")
            print("second line of the tail")
            return {"statusCode": 200, "body": "quiet"}
    """,
    "busy": """
        import time

        def handler(event, context):
            time.sleep(0.8)
            return {"statusCode": 200, "body": "done"}
    """,
}

FUNCTIONS_YAML = """
functions:
- {name: echo, handler: echo.handler, versions: {"1": echo.handler}, aliases: {live: "1"}}
- {name: busy, handler: busy.handler, reserved_concurrency: 1}
- {name: closed, handler: other.handler, reserved_concurrency: 0}
- {name: other, handler: other.handler}
- {name: raw, handler: raw.handler}
- {name: boom, handler: boom.handler}
- {name: garbage, handler: garbage.handler}
- {name: chatty, handler: chatty.handler}
- {name: sleepy, handler: busy.handler, timeout: 0.2}
"""

CONFIG = """
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData: {access_key: AKIDFEATURES, secret_key: features-secret-value}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: lambdas}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  functions:
  - {name: echo, spec: {function_name: echo}}
  - {name: other, spec: {function_name: other}}
  - {name: raw, spec: {function_name: raw}}
  - {name: boom, spec: {function_name: boom}}
  - {name: garbage, spec: {function_name: garbage}}
  - {name: chatty, spec: {function_name: chatty}}
  - {name: busy, spec: {function_name: busy}}
  - {name: closed, spec: {function_name: closed}}
  - {name: sleepy, spec: {function_name: sleepy}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: features}
spec:
  routes:
  - matcher: {path: "/raw/{id}"}
    destination: {upstream: lambdas, function: raw}
    options: {payload_format: raw}
  - matcher: {path: /arn}
    destination: {upstream: lambdas, function_name: "arn:aws:lambda:us-east-1:000000000000:function:echo:live"}
  - matcher: {path: /partial}
    destination: {upstream: lambdas, function_name: "000000000000:function:echo"}
  - matcher: {path: /qualified}
    destination: {upstream: lambdas, function_name: "echo:1"}
  - matcher: {path: "/call/{fn}/{rest+}"}
    destination: {upstream: lambdas, function_param: fn}
  - matcher: {path: /canary}
    destination:
      upstream: lambdas
      functions:
      - {function: echo, weight: 80}
      - {function: other, weight: 20}
      - {function: boom, weight: 0}
  - matcher: {path: /boom}
    destination: {upstream: lambdas, function: boom}
  - matcher: {path: /boom-mapped}
    destination: {upstream: lambdas, function: boom}
    options: {errors: {function_error: 500, malformed_response: 500}}
  - matcher: {path: /sleepy}
    destination: {upstream: lambdas, function: sleepy}
  - matcher: {path: /sleepy-mapped}
    destination: {upstream: lambdas, function: sleepy}
    options: {errors: {function_timeout: 503}}
  - matcher: {path: /boom-429}
    destination: {upstream: lambdas, function: boom}
    options: {errors: {function_error: 429}}
  - matcher: {path: /garbage}
    destination: {upstream: lambdas, function: garbage}
  - matcher: {path: /garbage-mapped}
    destination: {upstream: lambdas, function: garbage}
    options: {errors: {malformed_response: 500}}
  - matcher: {path: /chatty}
    destination: {upstream: lambdas, function: chatty}
    options: {log_tail: true}
  - matcher: {path: /busy}
    destination: {upstream: lambdas, function: busy}
  - matcher: {path: /busy-retried}
    destination: {upstream: lambdas, function: busy}
    options: {max_retries: 4}
  - matcher: {path: /closed}
    destination: {upstream: lambdas, function: closed}
  - matcher: {path: /closed-mapped}
    destination: {upstream: lambdas, function: closed}
    options: {errors: {throttled: 503}}
  - matcher: {path: /closed-retried}
    destination: {upstream: lambdas, function: closed}
    options: {max_retries: 2}
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("features")
    with recording_gateway(
        tmp, FUNCTIONS, CONFIG, {"AKIDFEATURES": SECRET}, "LG_FEATURES_RECORD", FUNCTIONS_YAML
    ) as running:
        yield running


def test_raw_payload_format(stack: Stack) -> None:
    # GET: the request's parameters, path over query, repeated query parameters as lists.
    r = http("GET", stack.base + "/raw/7?tag=a&tag=b&q=x&id=spoofed")
    assert r.status == 200 and r.header("content-type") == "application/json"
    assert r.json() == {"got": {"tag": ["a", "b"], "q": "x", "id": "7"}, "fn": "raw"}
    # Other methods: the body as sent, no API Gateway envelope.
    r = http(
        "POST", stack.base + "/raw/7", b'{"name": "rex", "n": [1, 2]}', {"content-type": "application/json"}
    )
    assert r.status == 200 and r.json() == {"got": {"name": "rex", "n": [1, 2]}, "fn": "raw"}
    # A body Lambda would refuse is refused before anything is invoked.
    calls = len(stack.records())
    for bad in (b"not json", b'{"n": NaN}', b"\xef\xbb\xbf{}", '{"a": 1}'.encode("utf-16")):
        r = http("POST", stack.base + "/raw/7", bad, {"content-type": "text/plain"})
        assert r.status == 400 and r.json()["message"] == "The request body must be JSON", bad
    assert len(stack.records()) == calls


def test_function_name_forms(stack: Stack) -> None:
    r = http("GET", stack.base + "/arn")
    assert r.status == 200
    assert r.json()["arn"] == "arn:aws:lambda:us-east-1:000000000000:function:echo:live"
    r = http("GET", stack.base + "/partial")
    assert r.status == 200 and r.json()["fn"] == "echo"
    r = http("GET", stack.base + "/qualified")
    assert r.status == 200 and r.json()["arn"].endswith(":function:echo:1")


def test_function_from_a_path_parameter(stack: Stack) -> None:
    r = http("GET", stack.base + "/call/echo/x/y")
    assert r.status == 200 and r.json()["fn"] == "echo"
    assert r.json()["event"]["pathParameters"] == {"fn": "echo", "rest": "x/y"}
    assert http("GET", stack.base + "/call/other/z").body == b"other"
    calls = len(stack.records())
    # Anything that is not one of the Upstream's own names is refused without invoking: no other function,
    # no ARN of another account, no qualifier the Upstream does not list.
    for bad in (
        "nope",
        "arn:aws:lambda:us-east-1:999999999999:function:raw",
        "999999999999:function:raw",
        "raw:9",
        "r%41w",
    ):
        r = http("GET", stack.base + f"/call/{bad}/x")
        assert r.status == 404, bad
        assert r.json()["message"] == "No such function"
    # A dot-segment never gets this far: Envoy normalises the path, and nothing matches.
    assert http("GET", stack.base + "/call/%2e%2e/x").status == 404
    assert len(stack.records()) == calls


def test_weighted_destinations(stack: Stack) -> None:
    counts: Counter[str] = Counter()
    for _ in range(200):
        r = http("GET", stack.base + "/canary")
        assert r.status == 200  # the weight-0 choice (boom) is never taken
        counts["other" if r.body == b"other" else r.json()["fn"]] += 1
    # 80/20 over 200 requests: mean 160, standard deviation 5.7; these bounds are 5+ deviations out.
    assert 130 <= counts["echo"] <= 190 and counts["echo"] + counts["other"] == 200


def test_error_mapping_defaults_and_overrides(stack: Stack) -> None:
    r = http("GET", stack.base + "/boom")
    assert r.status == 502 and r.json()["message"] == "Internal server error"
    assert "kaboom" not in r.body.decode()
    assert http("GET", stack.base + "/boom-mapped").status == 500
    # Mapped to 429, an error still says when to come back.
    r = http("GET", stack.base + "/boom-429")
    assert r.status == 429 and r.header("retry-after") == "1"
    assert http("GET", stack.base + "/garbage").status == 502
    # The function ran past its own timeout (Lambda's Sandbox.Timedout): 504, or what the route maps it to.
    r = http("GET", stack.base + "/sleepy")
    assert r.status == 504 and r.json()["message"] == "Endpoint request timed out"
    assert http("GET", stack.base + "/sleepy-mapped").status == 503
    assert http("GET", stack.base + "/garbage-mapped").status == 500


def test_throttling_gives_429_with_retry_after(stack: Stack) -> None:
    r = http("GET", stack.base + "/closed")
    assert r.status == 429 and r.json()["message"] == "Too Many Requests"
    assert r.header("retry-after") == "1"
    r = http("GET", stack.base + "/closed-mapped")
    assert r.status == 503 and r.header("retry-after") is None


def _parallel(url: str, n: int) -> list[int]:
    statuses: list[int] = []
    lock = threading.Lock()

    def one() -> None:
        status = http("GET", url, timeout=20).status
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(statuses)


def test_retries_sign_every_attempt_again(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    # busy has a reserved concurrency of 1 and runs 0.8 s: of two calls at once, one is throttled.
    assert _parallel(stack.base + "/busy", 2) == [200, 429]
    caplog.set_level(logging.DEBUG, logger="lambdagate.extproc")
    # With retries, Envoy tries the throttled call again after Lambda's Retry-After, and it succeeds.
    assert _parallel(stack.base + "/busy-retried", 2) == [200, 200]
    signed = [r for r in caplog.records if "attempt signed" in r.getMessage()]
    assert len(signed) >= 3  # two first attempts and at least one retry, each signed by the upstream ext_proc
    caplog.clear()
    # Retries give up after max_retries: 1 + 2 attempts, each signed again, then the 429.
    r = http("GET", stack.base + "/closed-retried", timeout=20)
    assert r.status == 429 and r.header("retry-after") == "1"
    assert len([r for r in caplog.records if "attempt signed" in r.getMessage()]) == 3


def test_log_tail_goes_to_the_gateway_log_only(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lambdagate.extproc")
    r = http("GET", stack.base + "/chatty")
    assert r.status == 200 and r.body == b"quiet"
    assert "secret sauce" not in r.body.decode() and r.header("x-amz-log-result") is None
    rid = r.header("x-amzn-requestid")
    lines = [rec.getMessage() for rec in caplog.records if f"request {rid}:" in rec.getMessage()]
    assert any("chatty says: the secret sauce is 42" in line for line in lines)
    assert any("second line of the tail" in line for line in lines)
    # The routes without log_tail log nothing of the function's output.
    caplog.clear()
    http("GET", stack.base + "/boom")
    assert not any("log (lambda request" in rec.getMessage() for rec in caplog.records)


def test_trace_headers_reach_event_and_invoke(stack: Stack) -> None:
    given = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
    r = http("GET", stack.base + "/partial", headers={"X-Amzn-Trace-Id": given})
    assert r.json()["event"]["headers"]["x-amzn-trace-id"] == given
    assert r.json()["trace"] == given
    # A W3C traceparent becomes the X-Ray header with the same trace id, and is passed on as well.
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = http("GET", stack.base + "/partial", headers={"traceparent": tp})
    expected = "Root=1-4bf92f35-77b34da6a3ce929d0e0e4736;Parent=00f067aa0ba902b7;Sampled=1"
    assert r.json()["event"]["headers"]["x-amzn-trace-id"] == expected
    assert r.json()["event"]["headers"]["traceparent"] == tp
    assert r.json()["trace"] == expected
    # Without either, one is made, as API Gateway does.
    r = http("GET", stack.base + "/partial")
    made = r.json()["event"]["headers"]["x-amzn-trace-id"]
    assert re.fullmatch(r"Root=1-[0-9a-f]{8}-[0-9a-f]{24}", made) and r.json()["trace"] == made
