"""API Gateway's non-proxy integration through a real Envoy, ext_proc and our local Lambda endpoint: a request
template builds the seed's custom event, and a function error's message chooses the HTTP status and body."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from harness import RecordingStack as Stack
from harness import http, recording_gateway

SECRET = "mapping-secret-value"

FUNCTIONS = {
    "echo": """
        import json, os

        def handler(event, context):
            with open(os.environ["LG_MAPPING_RECORD"], "a") as f:
                f.write(json.dumps(event) + "\\n")
            return event
    """,
    "pets": """
        class NotFound(Exception):
            pass

        def handler(event, context):
            pet = event["id"]
            if pet.startswith("missing"):
                raise NotFound(f"NotFound: no pet {pet}")
            if pet == "boom":
                raise ValueError("kaboom")
            return {"name": "rex", "id": pet}
    """,
}

FUNCTIONS_YAML = """
functions:
- {name: echo, handler: echo.handler}
- {name: pets, handler: pets.handler}
"""

# The seed's generic custom event: the invoker in `metadata`, what it sent in `data`.
SEED_TEMPLATE = """
{
  "metadata": {
    "source_ip": {{ source_ip | tojson }},
    "host": {{ headers.host | tojson }},
    "user_agent": {{ headers["user-agent"] | tojson }},
    "action": {{ path_params.action | tojson }},
    "request_id": {{ request_id | tojson }},
    "stage": {{ stage | tojson }},
    "env": {{ stage_variables.env | tojson }},
    "dry_run": {{ (query.dry_run == "1") | tojson }},
    "caller": {{ authorizer.principal_id | tojson }}
  },
  "data": {{ json | tojson }}
}
"""

CONFIG_TEMPLATE = """
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData: {access_key: AKIDMAPPING, secret_key: @SECRET@}
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
  - {name: pets, spec: {function_name: pets}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: mapping}
spec:
  stage: prod
  stage_variables: {env: staging}
  routes:
  - matcher: {path: "/events/{action}", methods: [POST]}
    destination: {upstream: lambdas, function: echo}
    integration:
      request_template: |@SEED@
  - matcher: {path: "/pets/{id}", methods: [GET]}
    destination: {upstream: lambdas, function: pets}
    integration:
      request_template: '{"id": {{ path_params.id | tojson }}}'
      responses:
      - status: 200
        template: '{"pet": {{ result.name | tojson }}, "asked": {{ path_params.id | tojson }}}'
      - status: 404
        pattern: "^NotFound"
        template: '{"message": {{ error.errorMessage | tojson }}, "type": {{ error.errorType | tojson }}}'
        headers: {x-mapped: "yes"}
  - matcher: {path: "/broken/{id}", methods: [GET]}
    destination: {upstream: lambdas, function: pets}
    integration:
      request_template: '{"id": {{ path_params.id | tojson }}}'
      responses:
      - {status: 200, template: "{{ result.name + 1 }}"}
  - matcher: {path: /next, methods: [POST]}
    destination: {upstream: lambdas, function: echo}
    integration:
      request_template: '{"next": {{ (json.n + 1) | tojson }}}'
  - matcher: {path: /passthrough, methods: [POST]}
    destination: {upstream: lambdas, function: echo}
    integration:
      responses:
      - {status: 201, content_type: text/plain, template: "got {{ result.n }}"}
"""
# The seed template goes in as a YAML block scalar, indented under request_template.
CONFIG = CONFIG_TEMPLATE.replace("@SECRET@", SECRET).replace(
    "@SEED@", "".join(f"\n        {line}" for line in SEED_TEMPLATE.strip().splitlines())
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("mapping")
    with recording_gateway(
        tmp, FUNCTIONS, CONFIG, {"AKIDMAPPING": SECRET}, "LG_MAPPING_RECORD", FUNCTIONS_YAML
    ) as running:
        yield running


def test_request_template_builds_the_seed_event(stack: Stack) -> None:
    body = {"pet": {"name": "rex", "tags": ["good", "dog"]}, "n": 1.5}
    r = http(
        "POST",
        stack.base + "/events/adopt?dry_run=1",
        json.dumps(body).encode(),
        {"content-type": "application/json", "user-agent": "seed-client/1.0"},
    )
    assert r.status == 200 and r.header("content-type") == "application/json"
    event = {
        "metadata": {
            "source_ip": "127.0.0.1",
            "host": stack.base.removeprefix("http://"),
            "user_agent": "seed-client/1.0",
            "action": "adopt",
            "request_id": r.header("x-amzn-requestid"),
            "stage": "prod",
            "env": "staging",
            "dry_run": True,
            "caller": "",
        },
        "data": body,
    }
    # The function got exactly this event (no API Gateway envelope), and its output is the answer as is.
    assert stack.records()[-1] == event
    assert r.json() == event


def test_function_errors_map_by_message(stack: Stack) -> None:
    r = http("GET", stack.base + "/pets/7")
    assert r.status == 200 and r.json() == {"pet": "rex", "asked": "7"}
    r = http("GET", stack.base + "/pets/missing-9")
    assert r.status == 404 and r.header("x-mapped") == "yes"
    assert r.header("content-type") == "application/json"
    assert r.json() == {"message": "NotFound: no pet missing-9", "type": "NotFound"}
    # An error no pattern matches keeps the usual mapping: 502, and nothing of the error reaches the client.
    r = http("GET", stack.base + "/pets/boom")
    assert r.status == 502 and r.json()["message"] == "Internal server error"
    assert "kaboom" not in r.body.decode() and r.header("x-mapped") is None


def test_render_failures_never_reach_the_function_or_a_500(stack: Stack) -> None:
    r = http("POST", stack.base + "/next", b'{"n": 41}', {"content-type": "application/json"})
    assert r.status == 200 and r.json() == {"next": 42}
    calls = len(stack.records())
    # Data-dependent: "x" + 1 fails for this body only. Refused before anything is invoked.
    r = http("POST", stack.base + "/next", b'{"n": "x"}', {"content-type": "application/json"})
    assert r.status == 400 and r.json()["message"] == "The request could not be mapped"
    assert r.json()["requestId"]
    assert len(stack.records()) == calls
    # The response side: the function ran, its answer could not be mapped.
    r = http("GET", stack.base + "/broken/7")
    assert r.status == 502 and r.json()["message"] == "Internal server error"


def test_without_a_request_template_the_body_is_the_payload(stack: Stack) -> None:
    r = http("POST", stack.base + "/passthrough", b'{"n": 3}', {"content-type": "application/json"})
    assert r.status == 201 and r.header("content-type") == "text/plain" and r.body == b"got 3"
    assert stack.records()[-1] == {"n": 3}
    calls = len(stack.records())
    r = http(
        "POST", stack.base + "/passthrough", b"n=3", {"content-type": "application/x-www-form-urlencoded"}
    )
    assert r.status == 400 and r.json()["message"] == "The request body must be JSON"
    assert len(stack.records()) == calls
