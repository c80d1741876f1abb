"""What `lambdagate import-openapi` writes serves through a real Envoy: an OpenAPI document with Lambda
integrations (an alias ARN, an operationId, a greedy any-method path on payload 2.0) becomes a config folder, and
requests reach the right functions with their path parameters in the event."""

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
"""

SECRET_YAML = f"""
apiVersion: v1
kind: Secret
metadata: {{name: aws}}
stringData: {{access_key: AKIDIMPORT, secret_key: {SECRET}}}
"""


def test_imported_config_serves_through_envoy(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "pets.py").write_text(textwrap.dedent(HANDLERS))
    (functions / "functions.yaml").write_text(FUNCTIONS_YAML)
    spec = tmp_path / "petstore.yaml"
    spec.write_text(OPENAPI)
    config = tmp_path / "config"
    config.mkdir()
    (config / "secret.yaml").write_text(SECRET_YAML)
    args = ["import-openapi", str(spec), "-o", str(config / "petstore.yaml"), "--endpoint", "local"]
    assert main([*args, "--secret-ref", "aws"]) == 0, capsys.readouterr().err

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
    finally:
        loop.close()
