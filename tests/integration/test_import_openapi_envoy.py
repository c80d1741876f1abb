"""What `lambdagate import-openapi` writes serves through a real Envoy: an OpenAPI document with Lambda
integrations (an alias ARN, an operationId, a greedy any-method path on payload 2.0) and a mock integration becomes
a config folder, requests reach the right functions with their path parameters in the event, and the mock answers
its canned response without any function. A folder exported with `lambdagate export-openapi` imports back and serves
the same."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from harness import LoopThread, gateway, http

from controlplane.cli import main

SECRET = "import-openapi-secret-value"

HANDLERS = """
import json


def _answer(fn, event):
    return {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({"fn": fn, "resource": event["resource"], "pathParameters": event["pathParameters"]}),
    }


def get_pet_latest(event, context):
    return _answer("get-pet:$LATEST", event)


def get_pet_v1(event, context):
    return _answer("get-pet:1", event)


def my_pets(event, context):
    return _answer("myPets", event)


def files(event, context):
    return event  # payload 2.0: any JSON that is not a structured response is a 200 with it as the body
"""

FUNCTIONS_YAML = """
functions:
- {name: get-pet, handler: pets.get_pet_latest, versions: {"1": pets.get_pet_v1}, aliases: {live: "1"}}
- {name: myPets, handler: pets.my_pets}
- {name: files, handler: pets.files}
"""

# The template comes first in the document; the importer puts the literal /pets/mine before it.
OPENAPI = """
openapi: 3.0.1
info: {title: Petstore, version: "1.0"}
servers: [{url: "https://pets.example.com/v1"}]
paths:
  /pets/{petId}:
    get:
      x-amazon-apigateway-integration:
        type: aws_proxy
        httpMethod: POST
        uri: arn:aws:apigateway:us-east-1:lambda:path/2015-03-31/functions/arn:aws:lambda:us-east-1:000000000000:function:get-pet:live/invocations
  /pets/mine:
    get: {operationId: myPets}
  /files/{proxy+}:
    x-amazon-apigateway-any-method:
      x-amazon-apigateway-integration:
        type: aws_proxy
        uri: arn:aws:lambda:us-east-1:000000000000:function:files
        payloadFormatVersion: "2.0"
        timeoutInMillis: 3000
  /status:
    get:
      x-amazon-apigateway-integration:
        type: mock
        requestTemplates: {application/json: '{"statusCode": 200}'}
        responses:
          default:
            statusCode: "503"
            responseParameters:
              method.response.header.Retry-After: "'120'"
              method.response.header.X-Served-By: "'mock'"
            responseTemplates:
              application/json: '{"status": "maintenance"}'
"""

SECRET_YAML = f"""
apiVersion: v1
kind: Secret
metadata: {{name: aws}}
stringData: {{access_key: AKIDIMPORT, secret_key: {SECRET}}}
"""


def _imported(tmp_path: Path, spec: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """`lambdagate import-openapi SPEC --endpoint local --secret-ref aws` into a config folder with the Secret."""
    config = tmp_path / "config"
    config.mkdir()
    (config / "secret.yaml").write_text(SECRET_YAML)
    args = ["import-openapi", str(spec), "-o", str(config / "petstore.yaml"), "--endpoint", "local"]
    assert main([*args, "--secret-ref", "aws"]) == 0, capsys.readouterr().err
    return config


def test_imported_config_serves_through_envoy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "pets.py").write_text(textwrap.dedent(HANDLERS))
    (functions / "functions.yaml").write_text(FUNCTIONS_YAML)
    spec = tmp_path / "petstore.yaml"
    spec.write_text(OPENAPI)
    config = _imported(tmp_path, spec, capsys)

    loop = LoopThread()
    try:
        with gateway(loop, config, functions, {"AKIDIMPORT": SECRET}) as base:
            # The templated path, with the base path from servers[0].url, reaches the alias's version.
            r = http("GET", base + "/v1/pets/42")
            assert r.status == 200, r
            assert r.json() == {
                "fn": "get-pet:1",
                "resource": "/v1/pets/{petId}",
                "pathParameters": {"petId": "42"},
            }
            # The literal path is not shadowed by the template the document lists first.
            r = http("GET", base + "/v1/pets/mine")
            assert r.status == 200 and r.json()["fn"] == "myPets", r
            # The route takes GET (and HEAD) only; the paths without the base path are not routed.
            assert http("POST", base + "/v1/pets/42", b"{}").status == 404
            assert http("GET", base + "/pets/42").status == 404
            # Any method on the greedy path, with payload format 2.0.
            r = http("DELETE", base + "/v1/files/a/b.txt")
            assert r.status == 200, r
            event = r.json()
            assert event["version"] == "2.0"
            assert event["pathParameters"] == {"proxy": "a/b.txt"}
            assert event["routeKey"] == "ANY /v1/files/{proxy+}"
            assert event["requestContext"]["http"]["method"] == "DELETE"
            # The mock integration: its status, literal headers and template, answered by Envoy itself.
            r = http("GET", base + "/v1/status")
            assert (r.status, r.body) == (503, b'{"status": "maintenance"}'), r
            assert r.header("retry-after") == "120" and r.header("x-served-by") == "mock", r
            assert r.header("content-type") == "application/json", r
            # Like the Lambda routes, it takes GET (and HEAD) only.
            assert http("POST", base + "/v1/status", b"{}").status == 404
    finally:
        loop.close()


# Mocks only: no function, so no Upstream is written; HTTP APIs' CORS settings on every route.
MOCKS_WITH_CORS = """
openapi: 3.0.1
info: {title: Status, version: "1.0"}
x-amazon-apigateway-cors:
  allowOrigins: [https://app.example.com]
  allowMethods: [GET]
  allowHeaders: [x-api-key]
  maxAge: 600
paths:
  /ping:
    get:
      x-amazon-apigateway-integration:
        type: mock
        responses:
          default:
            statusCode: 200
            responseTemplates: {text/plain: pong}
"""


def test_imported_mocks_and_cors_serve_without_an_upstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    functions = tmp_path / "functions"
    functions.mkdir()
    spec = tmp_path / "status.yaml"
    spec.write_text(MOCKS_WITH_CORS)
    config = tmp_path / "config"
    config.mkdir()
    assert main(["import-openapi", str(spec), "-o", str(config / "status.yaml")]) == 0, (
        capsys.readouterr().err
    )
    assert "Upstream" not in (config / "status.yaml").read_text()

    loop = LoopThread()
    try:
        with gateway(loop, config, functions, {}) as base:
            origin = {"Origin": "https://app.example.com"}
            r = http("GET", base + "/ping", headers=origin)
            assert (r.status, r.body) == (200, b"pong"), r
            assert r.header("content-type") == "text/plain", r
            assert r.header("access-control-allow-origin") == "https://app.example.com", r
            # The preflight is answered from the imported policy, before the mock route.
            preflight = {**origin, "Access-Control-Request-Method": "GET"}
            r = http("OPTIONS", base + "/ping", headers=preflight)
            assert r.status in (200, 204), r
            assert r.header("access-control-allow-origin") == "https://app.example.com", r
            assert r.header("access-control-allow-methods") == "GET", r
            assert r.header("access-control-allow-headers") == "x-api-key", r
            assert r.header("access-control-max-age") == "600", r
            # Another origin is never allowed (a single allowed origin may still be named: browsers refuse it).
            r = http("GET", base + "/ping", headers={"Origin": "https://evil.example.com"})
            assert (
                r.status == 200 and r.header("access-control-allow-origin") != "https://evil.example.com"
            ), r
            evil = {**preflight, "Origin": "https://evil.example.com"}
            assert http("OPTIONS", base + "/ping", headers=evil).header("access-control-allow-origin") is None
    finally:
        loop.close()


# A hand-written folder: an Upstream default (payload 2.0), a route option of its own, an alias, a prefix and a
# regex mock, which API Gateway's dialect alone does not all say.
HANDWRITTEN = """
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: pets}
spec:
  region: us-east-1
  endpoint: local
  secret_ref: aws
  options: {payload_format: apigateway-v2}
  functions:
  - {name: pet, spec: {function_name: get-pet, qualifier: live}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: petstore}
spec:
  routes:
  - matcher: {path: "/pets/{petId}", methods: [GET]}
    destination: {upstream: pets, function: pet}
    options: {payload_format: apigateway-v1}
  - matcher: {prefix: /files}
    destination: {upstream: pets, function_name: files}
  - matcher: {regex: "^/v[0-9]+/ping$", methods: [GET]}
    mock: {status: 200, headers: {content-type: text/plain}, body: pong}
"""


def test_exported_config_imports_back_and_serves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Folder -> export-openapi -> import-openapi -> a real Envoy: the re-imported routes serve as the original's
    would (alias, payload formats, the prefix route's resource, the regex mock)."""
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "pets.py").write_text(textwrap.dedent(HANDLERS))
    (functions / "functions.yaml").write_text(FUNCTIONS_YAML)
    original = tmp_path / "original"
    original.mkdir()
    (original / "secret.yaml").write_text(SECRET_YAML)
    (original / "petstore.yaml").write_text(HANDWRITTEN)
    spec = tmp_path / "petstore.openapi.yaml"
    assert main(["export-openapi", "--config-dir", str(original), "-o", str(spec)]) == 0, (
        capsys.readouterr().err
    )
    config = _imported(tmp_path, spec, capsys)

    loop = LoopThread()
    try:
        with gateway(loop, config, functions, {"AKIDIMPORT": SECRET}) as base:
            # The alias, with the route's own payload format 1.0.
            r = http("GET", base + "/pets/42")
            assert r.status == 200, r
            assert r.json() == {
                "fn": "get-pet:1",
                "resource": "/pets/{petId}",
                "pathParameters": {"petId": "42"},
            }
            # The prefix route, any method, with the Upstream's default payload format 2.0 (files echoes its event).
            r = http("DELETE", base + "/files/a/b.txt")
            assert r.status == 200, r
            event = r.json()
            assert event["version"] == "2.0" and event["rawPath"] == "/files/a/b.txt", event
            assert event["requestContext"]["http"]["method"] == "DELETE", event
            r = http("GET", base + "/v2/ping")
            assert (r.status, r.body, r.header("content-type")) == (200, b"pong", "text/plain"), r
            assert http("GET", base + "/v2/pong").status == 404
    finally:
        loop.close()
