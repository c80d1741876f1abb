"""Real Lambda web frameworks behind lambdagate, end to end: Envoy -> ext_proc -> local Lambda -> framework.

The handlers are what users deploy unchanged behind API Gateway: AWS Lambda Powertools' REST resolver, and an
ASGI app under Mangum.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import LoopThread, gateway, http

POWERTOOLS_APP = textwrap.dedent("""
    from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response

    app = APIGatewayRestResolver()

    @app.get("/pets/<pet_id>")
    def get_pet(pet_id):
        return {"id": pet_id, "q": app.current_event.get_query_string_value("q"),
                "ua": app.current_event.headers.get("user-agent")}

    @app.post("/pets")
    def create_pet():
        body = app.current_event.json_body
        return Response(status_code=201, content_type="application/json",
                        body='{"created": "%s"}' % body["name"], cookies=["a=1", "b=2"])

    def handler(event, context):
        return app.resolve(event, context)
""")

POWERTOOLS_HTTP_APP = textwrap.dedent("""
    from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response

    app = APIGatewayHttpResolver()

    @app.get("/v2/pets/<pet_id>")
    def get_pet(pet_id):
        return {"id": pet_id, "q": app.current_event.get_query_string_value("q"),
                "ua": app.current_event.headers.get("user-agent"), "cookies": app.current_event.cookies}

    @app.post("/v2/pets")
    def create_pet():
        body = app.current_event.json_body
        return Response(status_code=201, content_type="application/json",
                        body='{"created": "%s"}' % body["name"], cookies=["a=1", "b=2"])

    def handler(event, context):
        return app.resolve(event, context)
""")

MANGUM_APP = textwrap.dedent("""
    import json
    from mangum import Mangum

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        reply = json.dumps({"method": scope["method"], "path": scope["path"],
                            "query": scope["query_string"].decode(), "body_len": len(body)}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"set-cookie", b"s=1"),
                                (b"set-cookie", b"t=2")]})
        await send({"type": "http.response.body", "body": reply})

    handler = Mangum(app, lifespan="off")
""")

CONFIG = """
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData: {access_key: AKIDFW, secret_key: fw-secret}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: local}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  functions:
  - {name: powertools, spec: {function_name: powertools}}
  - {name: asgi, spec: {function_name: asgi_app}}
  - {name: powertools-http, spec: {function_name: powertools_http}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: apps}
spec:
  routes:
  - matcher: {prefix: /pets}
    destination: {upstream: local, function: powertools}
  - matcher: {prefix: /asgi}
    destination: {upstream: local, function: asgi}
  - matcher: {prefix: /v2/pets}
    destination: {upstream: local, function: powertools-http}
    options: {payload_format: apigateway-v2}
  - matcher: {prefix: /v2/asgi}
    destination: {upstream: local, function: asgi}
    options: {payload_format: apigateway-v2}
"""


@pytest.fixture
def base(tmp_path: Path, loop_thread: LoopThread) -> Iterator[str]:
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "powertools.py").write_text(POWERTOOLS_APP)
    (functions / "asgi_app.py").write_text(MANGUM_APP)
    (functions / "powertools_http.py").write_text(POWERTOOLS_HTTP_APP)
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "apps.yaml").write_text(CONFIG)
    with gateway(loop_thread, folder, functions, {"AKIDFW": "fw-secret"}) as url:
        yield url


def test_powertools_rest_resolver(base: str) -> None:
    r = http("GET", base + "/pets/42?q=x", headers={"User-Agent": "fw-test"})
    assert r.status == 200 and r.json() == {"id": "42", "q": "x", "ua": "fw-test"}
    r = http(
        "POST", base + "/pets", json.dumps({"name": "Nemo"}).encode(), {"content-type": "application/json"}
    )
    assert r.status == 201 and r.json() == {"created": "Nemo"}
    assert r.all("set-cookie") == ["a=1", "b=2"]
    assert http("GET", base + "/pets").status == 404  # Powertools' own not-found, through the gateway


def test_mangum_asgi_app(base: str) -> None:
    r = http(
        "POST", base + "/asgi/x?y=1&y=2", b"\x00\x01binary", {"content-type": "application/octet-stream"}
    )
    assert r.status == 200
    assert r.json() == {"method": "POST", "path": "/asgi/x", "query": "y=1&y=2", "body_len": 8}
    assert r.all("set-cookie") == ["s=1", "t=2"]


def test_powertools_http_resolver_with_payload_2(base: str) -> None:
    r = http("GET", base + "/v2/pets/42?q=x", headers={"User-Agent": "fw-test", "Cookie": "c=1; d=2"})
    assert r.status == 200
    assert r.json() == {"id": "42", "q": "x", "ua": "fw-test", "cookies": ["c=1", "d=2"]}
    r = http(
        "POST", base + "/v2/pets", json.dumps({"name": "Nemo"}).encode(), {"content-type": "application/json"}
    )
    assert r.status == 201 and r.json() == {"created": "Nemo"}
    assert r.all("set-cookie") == ["a=1", "b=2"]


def test_mangum_asgi_app_with_payload_2(base: str) -> None:
    r = http(
        "POST", base + "/v2/asgi/x?y=1&y=2", b"\x00\x01binary", {"content-type": "application/octet-stream"}
    )
    assert r.status == 200
    assert r.json() == {"method": "POST", "path": "/v2/asgi/x", "query": "y=1&y=2", "body_len": 8}
    assert r.all("set-cookie") == ["s=1", "t=2"]
