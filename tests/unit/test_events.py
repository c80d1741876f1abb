"""The API Gateway REST (1.0) event: its shape, and that real Lambda web frameworks (Mangum, Powertools) accept it
unchanged and answer with something unwrap_proxy_response turns back into the right HTTP response."""

from __future__ import annotations

import base64
import json
import re

import pytest

from controlplane.aws.events import HttpRequest, RouteInfo, build_v1_event, encode_body, is_text, request_time
from controlplane.aws.responses import unwrap_proxy_response
from controlplane.model import parse_document

NOW = 1_700_000_000.123  # 2023-11-14 22:13:20 UTC


def request(method="GET", path="/", headers=(), body=b"", authority="api.example.com:8080"):
    return HttpRequest(
        method=method,
        path=path,
        headers=list(headers),
        body=body,
        source_ip="203.0.113.7",
        protocol="HTTP/1.1",
        request_id="req-1234",
        authority=authority,
    )


def route_for(matcher: dict, stage: str = "v1") -> RouteInfo:
    """The RouteInfo ext_proc builds from a route's matcher, built here from the parsed model."""
    vs = parse_document(
        {
            "apiVersion": "lambdagate.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "t"},
            "spec": {
                "stage": stage,
                "routes": [{"matcher": matcher, "destination": {"upstream": "u", "function": "f"}}],
            },
        }
    )
    m = vs.routes[0].matcher
    regex = None
    if m.template_regex is not None:
        regex = re.compile(m.template_regex)
    elif m.kind == "regex" and m.params:
        regex = re.compile(m.value)
    return RouteInfo(m.resource, vs.stage, regex, m.value if m.kind == "prefix" else None)


# ---------------------------------------------------------------------------------------------------------------
# Shape


def test_get_with_repeated_query_params_and_headers():
    req = request(
        path="/pets?limit=2&tag=dog&tag=hot%20dog&q=a+b&empty=",
        headers=[
            ("accept", "application/json"),
            ("x-multi", "one"),
            ("x-multi", "two"),
            ("user-agent", "curl/8.0"),
            ("x-envoy-expected-rq-timeout-ms", "30000"),
            ("cookie", "a=1; b=2"),
        ],
    )
    ev = build_v1_event(req, route_for({"path": "/pets"}), now=NOW)
    assert ev["httpMethod"] == "GET"
    assert ev["path"] == "/pets"
    assert ev["resource"] == "/pets"
    assert ev["queryStringParameters"] == {"limit": "2", "tag": "hot dog", "q": "a b", "empty": ""}
    assert ev["multiValueQueryStringParameters"] == {
        "limit": ["2"],
        "tag": ["dog", "hot dog"],
        "q": ["a b"],
        "empty": [""],
    }
    # Single-value map keeps the last value, as API Gateway does; the multi-value map keeps them all, in order.
    assert ev["headers"]["x-multi"] == "two"
    assert ev["multiValueHeaders"]["x-multi"] == ["one", "two"]
    assert ev["headers"]["cookie"] == "a=1; b=2"
    # Envoy's own headers are not the client's.
    assert not any(h.startswith("x-envoy-") for h in ev["headers"])
    assert not any(h.startswith("x-envoy-") for h in ev["multiValueHeaders"])
    # Host comes from :authority when the client sent none.
    assert ev["headers"]["host"] == "api.example.com:8080"
    assert ev["multiValueHeaders"]["host"] == ["api.example.com:8080"]
    assert ev["pathParameters"] is None
    assert ev["stageVariables"] is None
    assert ev["body"] is None and ev["isBase64Encoded"] is False
    json.dumps(ev)  # it must be JSON as is


def test_request_context():
    req = request(path="/pets/7?x=1", headers=[("user-agent", "Mozilla/5.0")])
    ev = build_v1_event(req, route_for({"path": "/pets/{petId}"}, stage="prod"), now=NOW)
    ctx = ev["requestContext"]
    assert ctx["requestId"] == "req-1234"
    assert ctx["httpMethod"] == "GET"
    assert ctx["path"] == "/pets/7"
    assert ctx["resourcePath"] == "/pets/{petId}"
    assert ctx["stage"] == "prod"
    assert ctx["requestTime"] == "14/Nov/2023:22:13:20 +0000"
    assert ctx["requestTimeEpoch"] == 1_700_000_000_123
    assert ctx["identity"]["sourceIp"] == "203.0.113.7"
    assert ctx["identity"]["userAgent"] == "Mozilla/5.0"
    assert ctx["domainName"] == "api.example.com"
    assert ctx["protocol"] == "HTTP/1.1"
    assert isinstance(ctx["accountId"], str) and isinstance(ctx["apiId"], str)


def test_request_time_format():
    assert request_time(0) == "01/Jan/1970:00:00:00 +0000"
    assert request_time(1_709_251_199) == "29/Feb/2024:23:59:59 +0000"


def test_client_host_header_is_kept():
    ev = build_v1_event(
        request(headers=[("host", "client.example")], authority="other:1"), route_for({"path": "/"}), NOW
    )
    assert ev["headers"]["host"] == "client.example"
    assert ev["multiValueHeaders"]["host"] == ["client.example"]


def test_domain_name_of_ipv6_authority_and_without_port():
    ev = build_v1_event(request(authority="[::1]"), route_for({"path": "/"}), NOW)
    assert ev["requestContext"]["domainName"] == "[::1]"
    ev = build_v1_event(request(authority="api.example.com"), route_for({"path": "/"}), NOW)
    assert ev["requestContext"]["domainName"] == "api.example.com"
    assert ev["requestContext"]["domainPrefix"] == "api"


def test_path_template_params_are_url_decoded():
    ev = build_v1_event(
        request(path="/pets/hot%20dog/toys/b%C3%A4ll?x=1"),
        route_for({"path": "/pets/{petId}/toys/{toyId}"}),
        NOW,
    )
    assert ev["pathParameters"] == {"petId": "hot dog", "toyId": "bäll"}
    assert ev["resource"] == "/pets/{petId}/toys/{toyId}"
    # `path` stays as the client sent it, as API Gateway's does.
    assert ev["path"] == "/pets/hot%20dog/toys/b%C3%A4ll"


def test_greedy_proxy_param():
    ev = build_v1_event(request(path="/files/a/b/c%20d.txt"), route_for({"path": "/files/{proxy+}"}), NOW)
    assert ev["pathParameters"] == {"proxy": "a/b/c d.txt"}
    assert ev["resource"] == "/files/{proxy+}"


@pytest.mark.parametrize(
    "prefix, path, expected",
    [
        ("/api", "/api/v1/items/9", {"proxy": "v1/items/9"}),
        ("/api/", "/api/v1/items", {"proxy": "v1/items"}),
        ("/api", "/api/a%2Fb", {"proxy": "a/b"}),
        ("/api", "/api", None),
        ("/api/", "/api/", None),
    ],
)
def test_prefix_route_gives_proxy_param(prefix, path, expected):
    ev = build_v1_event(request(path=path), route_for({"prefix": prefix}), NOW)
    assert ev["resource"] == "/api/{proxy+}"
    assert ev["requestContext"]["resourcePath"] == "/api/{proxy+}"
    assert ev["pathParameters"] == expected


def test_regex_route_named_groups_become_path_params():
    ev = build_v1_event(
        request(path="/v2/widgets"), route_for({"regex": "^/v(?P<version>[0-9]+)/(?P<item>[a-z]+)$"}), NOW
    )
    assert ev["pathParameters"] == {"version": "2", "item": "widgets"}


def test_regex_params_match_the_whole_path_as_envoy_does():
    # Envoy routed /r/fg with this regex; a prefix match would read the shorter alternative, f.
    ev = build_v1_event(request(path="/r/fg"), route_for({"regex": "/r/(?P<fn>f|fg)"}), NOW)
    assert ev["pathParameters"] == {"fn": "fg"}


def test_binary_body_is_base64():
    png = b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"
    ev = build_v1_event(
        request("POST", "/up", [("content-type", "image/png")], png), route_for({"path": "/up"}), NOW
    )
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"]) == png


def test_body_without_content_type_is_base64():
    ev = build_v1_event(request("POST", "/up", [], b"hello"), route_for({"path": "/up"}), NOW)
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"]) == b"hello"


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        "text/plain",
        "TEXT/HTML; charset=UTF-8",
        "application/vnd.api+json",
        "application/soap+xml",
        "application/x-www-form-urlencoded",
    ],
)
def test_text_body_stays_text(content_type):
    body = '{"name": "Rëx"}'.encode()
    ev = build_v1_event(
        request("POST", "/pets", [("content-type", content_type)], body), route_for({"path": "/pets"}), NOW
    )
    assert ev["isBase64Encoded"] is False
    assert ev["body"] == '{"name": "Rëx"}'


def test_non_utf8_text_body_is_base64():
    body = "café".encode("latin-1")
    ev = build_v1_event(
        request("POST", "/x", [("content-type", "text/plain")], body), route_for({"path": "/x"}), NOW
    )
    assert ev["isBase64Encoded"] is True
    assert base64.b64decode(ev["body"]) == body


def test_empty_body_is_null():
    ev = build_v1_event(
        request("POST", "/x", [("content-type", "application/json")], b""), route_for({"path": "/x"}), NOW
    )
    assert ev["body"] is None
    assert ev["isBase64Encoded"] is False


def test_is_text_and_encode_body_helpers():
    assert is_text("application/problem+json")
    assert not is_text("application/octet-stream")
    assert not is_text(None)
    assert encode_body(b"", "text/plain") == (None, False)
    assert encode_body(b"\x00\x01", "application/octet-stream") == ("AAE=", True)


# ---------------------------------------------------------------------------------------------------------------
# Mangum (ASGI)


class FakeContext:
    function_name = "PetsFunction"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:PetsFunction"
    memory_limit_in_mb = 128
    aws_request_id = "lambda-req-1"
    log_group_name = "/aws/lambda/PetsFunction"
    log_stream_name = "stream"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def make_asgi_app(seen: dict, response_body: bytes, content_type: bytes):
    async def app(scope, receive, send):
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        seen.update(
            method=scope["method"],
            path=scope["path"],
            query=scope["query_string"],
            headers=[(k.decode(), v.decode()) for k, v in scope["headers"]],
            body=body,
            client=scope["client"],
            event=scope["aws.event"],
        )
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [
                    (b"content-type", content_type),
                    (b"set-cookie", b"session=abc; Path=/; HttpOnly"),
                    (b"set-cookie", b"theme=dark; Path=/"),
                    (b"x-app", b"mangum"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": response_body})

    return app


def run_mangum(app, event):
    from mangum import Mangum

    handler = Mangum(app, lifespan="off")
    # Through JSON both ways, as Lambda does.
    result = handler(json.loads(json.dumps(event)), FakeContext())
    return unwrap_proxy_response(json.dumps(result).encode())


def header_values(resp, name):
    return [v for k, v in resp.headers if k == name]


def test_mangum_sees_the_request_and_its_response_unwraps():
    seen: dict = {}
    app = make_asgi_app(seen, b'{"ok": true}', b"application/json")
    req = request(
        "POST",
        "/pets/42?tag=dog&tag=cat&limit=1",
        [("content-type", "application/json"), ("x-trace", "t1"), ("user-agent", "pytest")],
        b'{"name": "Rex"}',
    )
    event = build_v1_event(req, route_for({"path": "/pets/{petId}"}), NOW)
    resp = run_mangum(app, event)

    assert seen["method"] == "POST"
    assert seen["path"] == "/pets/42"
    from urllib.parse import parse_qs

    assert parse_qs(seen["query"].decode()) == {"tag": ["dog", "cat"], "limit": ["1"]}
    headers = dict(seen["headers"])
    assert headers["x-trace"] == "t1"
    assert headers["content-type"] == "application/json"
    assert headers["host"] == "api.example.com:8080"
    assert seen["body"] == b'{"name": "Rex"}'
    assert seen["client"][0] == "203.0.113.7"
    assert seen["event"]["pathParameters"] == {"petId": "42"}

    assert resp.status == 201
    assert resp.body == b'{"ok": true}'
    assert header_values(resp, "set-cookie") == ["session=abc; Path=/; HttpOnly", "theme=dark; Path=/"]
    assert header_values(resp, "x-app") == ["mangum"]
    assert header_values(resp, "content-type") == ["application/json"]


def test_mangum_binary_request_and_response_round_trip():
    seen: dict = {}
    png = bytes(range(256))
    app = make_asgi_app(seen, png, b"image/png")
    req = request("PUT", "/files/a%20b/c.bin", [("content-type", "application/octet-stream")], png)
    event = build_v1_event(req, route_for({"path": "/files/{proxy+}"}), NOW)
    assert event["isBase64Encoded"] is True
    resp = run_mangum(app, event)
    assert seen["body"] == png
    assert seen["path"] == "/files/a b/c.bin"  # Mangum decodes the raw path itself
    assert seen["method"] == "PUT"
    assert resp.body == png
    assert resp.status == 201


def test_mangum_get_without_body_or_query():
    seen: dict = {}
    app = make_asgi_app(seen, b"", b"text/plain")
    event = build_v1_event(request("GET", "/health"), route_for({"path": "/health"}), NOW)
    resp = run_mangum(app, event)
    assert seen["body"] == b""
    assert seen["query"] == b""
    assert resp.body == b""
    assert resp.status == 201


# ---------------------------------------------------------------------------------------------------------------
# AWS Lambda Powertools


def make_powertools_app():
    from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response

    app = APIGatewayRestResolver()

    @app.get("/pets/<petId>")
    def get_pet(petId: str):
        ev = app.current_event
        return Response(
            status_code=200,
            content_type="application/json",
            body=json.dumps(
                {
                    "petId": petId,
                    "pathParameters": ev.path_parameters,
                    "method": ev.http_method,
                    "path": ev.path,
                    "limit": ev.get_query_string_value("limit"),
                    "tags": ev.get_multi_value_query_string_values("tag"),
                    "accept": ev.headers.get("accept"),
                    "sourceIp": ev.request_context.identity.source_ip,
                    "stage": ev.request_context.stage,
                    "requestId": ev.request_context.request_id,
                }
            ),
            cookies=["a=1; Path=/", "b=2; Secure"],
            headers={"X-Pet": petId},
        )

    @app.post("/pets")
    def create_pet():
        pet = app.current_event.json_body
        return Response(
            status_code=201, content_type="application/json", body=json.dumps({"created": pet["name"]})
        )

    @app.put("/pets/<petId>/photo")
    def upload(petId: str):
        ev = app.current_event
        assert ev.is_base64_encoded
        raw = base64.b64decode(ev.body)
        return Response(
            status_code=200, content_type="text/plain", body=f"{petId}:{len(raw)}:{raw[:4].hex()}"
        )

    return app


def run_powertools(app, event):
    result = app.resolve(json.loads(json.dumps(event)), FakeContext())
    return unwrap_proxy_response(json.dumps(result).encode())


def test_powertools_get_with_path_param_query_and_headers():
    app = make_powertools_app()
    req = request(
        "GET",
        "/pets/42?limit=5&tag=dog&tag=cat",
        [("accept", "application/json"), ("user-agent", "pytest")],
    )
    event = build_v1_event(req, route_for({"path": "/pets/{petId}", "methods": ["GET"]}, stage="prod"), NOW)
    resp = run_powertools(app, event)
    assert resp.status == 200
    seen = json.loads(resp.body)
    assert seen == {
        "petId": "42",
        "pathParameters": {"petId": "42"},
        "method": "GET",
        "path": "/pets/42",
        "limit": "5",
        "tags": ["dog", "cat"],
        "accept": "application/json",
        "sourceIp": "203.0.113.7",
        "stage": "prod",
        "requestId": "req-1234",
    }
    assert header_values(resp, "set-cookie") == ["a=1; Path=/", "b=2; Secure"]
    assert header_values(resp, "x-pet") == ["42"]
    assert header_values(resp, "content-type") == ["application/json"]


def test_powertools_post_json_body():
    app = make_powertools_app()
    req = request("POST", "/pets", [("content-type", "application/json")], b'{"name": "Tom"}')
    resp = run_powertools(app, build_v1_event(req, route_for({"path": "/pets"}), NOW))
    assert resp.status == 201
    assert json.loads(resp.body) == {"created": "Tom"}


def test_powertools_binary_body_is_decoded():
    app = make_powertools_app()
    data = b"\xff\xd8\xff\xe0" + bytes(100)
    req = request("PUT", "/pets/9/photo", [("content-type", "image/jpeg")], data)
    resp = run_powertools(app, build_v1_event(req, route_for({"path": "/pets/{petId}/photo"}), NOW))
    assert resp.status == 200
    assert resp.body == b"9:104:ffd8ffe0"


def test_powertools_unknown_route_is_its_404():
    app = make_powertools_app()
    resp = run_powertools(app, build_v1_event(request("GET", "/owners"), route_for({"prefix": "/"}), NOW))
    assert resp.status == 404
