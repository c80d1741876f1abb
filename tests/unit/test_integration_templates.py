"""Mapping templates (routes[].integration): refused at load with the field named, rendered at request time into
the Lambda payload, and the integration's responses chosen by a function error's message."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from test_model import rejected, vs_doc

from controlplane.aws.events import HttpRequest, Identity, RouteInfo
from controlplane.aws.integration import (
    BODY_NOT_JSON,
    REQUEST_NOT_MAPPED,
    MappingFailed,
    build_payload,
    build_response,
    request_context,
    select_response,
)
from controlplane.model import parse_document
from controlplane.model.errors import ConfigError
from controlplane.model.resources import Integration, IntegrationResponse, VirtualService
from controlplane.model.templates import (
    REQUEST_NAMES,
    RESPONSE_NAMES,
    check_template,
    compile_template,
    sample_context,
)

FIELD = "spec.routes[0].integration"
# The seed's generic custom event: who is calling in `metadata`, what they sent in `data`.
SEED_TEMPLATE = """{
  "metadata": {
    "source_ip": {{ source_ip | tojson }},
    "host": {{ headers.host | tojson }},
    "user_agent": {{ headers["user-agent"] | tojson }},
    "action": {{ (method ~ " " ~ resource) | tojson }},
    "pet": {{ path_params.petId | tojson }},
    "verbose": {{ (query.verbose == "1") | tojson }},
    "tags": {{ multi_query.tag | tojson }},
    "stage": {{ stage | tojson }},
    "env": {{ stage_variables.env | tojson }},
    "request_id": {{ request_id | tojson }},
    "caller": {{ authorizer.claims.sub | tojson }},
    "scopes": {{ authorizer.scopes | tojson }},
    "key": {{ api_key_id | tojson }},
    "missing": {{ json.no.such.key | tojson }}
  },
  "data": {{ json | tojson }}
}"""


def _route(integration: dict[str, Any]) -> dict[str, Any]:
    return {
        "matcher": {"path": "/pets/{petId}", "methods": ["POST"]},
        "destination": {"upstream": "lambdas", "function": "get-pet"},
        "integration": integration,
    }


def _integration(doc: dict[str, Any]) -> Integration:
    vs = parse_document(vs_doc(routes=[_route(doc)]))
    assert isinstance(vs, VirtualService)
    integration = vs.routes[0].integration
    assert integration is not None
    return integration


def _request(
    path: str = "/pets/7?verbose=1&tag=a&tag=b",
    body: bytes = b'{"name": "rex", "age": 3}',
    identity: Identity | None = None,
) -> HttpRequest:
    headers = [
        ("content-type", "application/json"),
        ("user-agent", "curl/8.5"),
        ("x-envoy-internal", "true"),
        ("accept", "a/b"),
        ("accept", "c/d"),
    ]
    return HttpRequest(
        "POST", path, headers, body, "203.0.113.9", "HTTP/1.1", "rid-1", "api.example:8080", identity
    )


ROUTE = RouteInfo("/pets/{petId}", "prod", re.compile(r"/pets/(?P<petId>[^/]+)"), None, {"env": "test"})


# --- load time -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("integration", "field", "words"),
    [
        ({"request_template": '{"a": {{ json.a | tojson }'}, "request_template", "does not compile: line 1"),
        (
            {"request_template": '{"a": 1,\n"b": {{ nope | tojson }}}'},
            "request_template",
            "line 2: unknown name 'nope'",
        ),
        ({"request_template": '{"a": {{ body | shout }}}'}, "request_template", "No filter named 'shout'"),
        (
            {"request_template": '{"a": {{ "".__class__ | tojson }}}'},
            "request_template",
            "not allowed in the sandbox",
        ),
        ({"request_template": '{"a": {{ json }}}'}, "request_template", "not JSON for a sample request"),
        (
            {"request_template": "{% include 'other' %}"},
            "request_template",
            "cannot extend, include or import",
        ),
        # A response template may not read what only exists for a request template's neighbours.
        ({"request_template": '{"s": {{ status }}}'}, "request_template", "unknown name 'status'"),
        (
            {"responses": [{"status": 404, "pattern": "^NotFound", "template": "{{ error.__class__ }}"}]},
            "responses[0].template",
            "not allowed in the sandbox",
        ),
        (
            {"responses": [{"template": "{{ result | attr('__init__') }}"}]},
            "responses[0].template",
            "not allowed in the sandbox",
        ),
        (
            {"responses": [{"template": "{% set l = [] %}{{ l.append(1) }}"}]},
            "responses[0].template",
            "not allowed in the sandbox",
        ),
        (
            {"responses": [{"template": "{{ path + 1 }}"}]},
            "responses[0].template",
            "fails for a sample request: line 1",
        ),
        (
            {"responses": [{"template": "{% for x in y %}{% endfor %}"}]},
            "responses[0].template",
            "unknown name 'y'",
        ),
    ],
)
def test_template_errors_name_the_field(integration: dict[str, Any], field: str, words: str) -> None:
    err = rejected(vs_doc(routes=[_route(integration)]))
    assert err.field == f"{FIELD}.{field}"
    assert words in err.message, err.message


def test_data_dependent_templates_load() -> None:
    # What depends on the body or the function's result cannot fail at load: the sample does not know it.
    check_template(
        '{"n": {{ (json.count + 1) | tojson }}, "big": {{ (json.n > 3) | tojson }}}', "f", "request"
    )
    check_template(
        "{{ result.total * 2 }} {{ result | round }} {{ error.errorMessage | upper }}", "f", "response"
    )
    check_template("{% for k, v in headers.items() %}{{ k }}={{ v }};{% endfor %}", "f", "response")


def test_unknown_kind_is_a_bug() -> None:
    with pytest.raises(KeyError):
        check_template("{}", "f", "sideways")


def test_the_sample_has_every_name() -> None:
    assert set(sample_context("request")) == set(REQUEST_NAMES)
    assert set(sample_context("response")) == set(RESPONSE_NAMES)
    assert set(request_context(_request(), ROUTE)) == set(REQUEST_NAMES)


def test_templates_compile_once() -> None:
    source = '{"once": {{ method | tojson }}}'
    assert compile_template(source) is compile_template(source)


# --- request side ----------------------------------------------------------------------------------------------


def test_request_template_builds_the_seed_event() -> None:
    integration = _integration({"request_template": SEED_TEMPLATE})
    identity = Identity(claims={"sub": "alice"}, scopes=["pets:read"], api_key="k", api_key_id="partner")
    payload, _ = build_payload(integration, _request(identity=identity), ROUTE)
    assert json.loads(payload) == {
        "metadata": {
            "source_ip": "203.0.113.9",
            "host": "api.example:8080",
            "user_agent": "curl/8.5",
            "action": "POST /pets/{petId}",
            "pet": "7",
            "verbose": True,
            "tags": ["a", "b"],
            "stage": "prod",
            "env": "test",
            "request_id": "rid-1",
            "caller": "alice",
            "scopes": ["pets:read"],
            "key": "partner",
            "missing": None,
        },
        "data": {"name": "rex", "age": 3},
    }


def test_request_context_values() -> None:
    ctx = request_context(_request(), ROUTE)
    assert ctx["path"] == "/pets/7" and ctx["query"] == {"verbose": "1", "tag": "b"}
    assert ctx["multi_query"] == {"verbose": ["1"], "tag": ["a", "b"]}
    # Lowercase names, repeats comma-joined, Envoy's own headers hidden, the host from the authority.
    assert ctx["headers"] == {
        "content-type": "application/json",
        "user-agent": "curl/8.5",
        "accept": "a/b,c/d",
        "host": "api.example:8080",
    }
    assert ctx["body"] == '{"name": "rex", "age": 3}' and ctx["json"] == {"name": "rex", "age": 3}
    # No identity: empty values, so templates need no guards.
    assert ctx["authorizer"] == {"claims": {}, "scopes": [], "principal_id": "", "context": {}}
    assert ctx["api_key_id"] is None
    assert request_context(_request(body=b"not json"), ROUTE)["json"] is None


def test_without_a_request_template_the_body_is_the_payload() -> None:
    integration = _integration({"responses": [{"status": 201}]})
    payload, context = build_payload(integration, _request(), ROUTE)
    assert payload == b'{"name": "rex", "age": 3}' and context == {}
    assert build_payload(integration, _request(body=b""), ROUTE)[0] == b"{}"
    for bad in (b"name=rex", b'{"n": NaN}'):
        with pytest.raises(MappingFailed) as info:
            build_payload(integration, _request(body=bad), ROUTE)
        assert info.value.public == BODY_NOT_JSON


def test_request_render_failure_is_refused() -> None:
    # Data-dependent: the sample does not know the body, so this loads, and fails only for some requests.
    integration = _integration({"request_template": '{"next": {{ json.age + 1 }}}'})
    assert json.loads(build_payload(integration, _request(), ROUTE)[0]) == {"next": 4}
    with pytest.raises(MappingFailed) as info:
        build_payload(integration, _request(body=b'{"age": "three"}'), ROUTE)
    assert info.value.public == REQUEST_NOT_MAPPED and "line 1" in str(info.value)
    with pytest.raises(MappingFailed) as info:
        build_payload(integration, _request(body=b"{}"), ROUTE)
    assert "has no attribute 'age'" in str(info.value)
    # A missing value printed without tojson leaves a hole: not JSON, so never sent half-built.
    integration = _integration({"request_template": '{"name": {{ json.name }}}'})
    with pytest.raises(MappingFailed) as info:
        build_payload(integration, _request(body=b"{}"), ROUTE)
    assert info.value.public == REQUEST_NOT_MAPPED and "not JSON" in str(info.value)


# --- response side ---------------------------------------------------------------------------------------------

RESPONSES = {
    "request_template": '{"id": {{ path_params.petId | tojson }}}',
    "responses": [
        {
            "status": 200,
            "template": '{"pet": {{ result.name | tojson }}, "asked": {{ path_params.petId | tojson }}}',
        },
        {
            "status": 404,
            "pattern": "^NotFound",
            "template": '{"message": {{ error.errorMessage | tojson }}, "status": {{ status }}}',
            "headers": {"x-mapped": "yes"},
        },
        {"status": 409, "pattern": "Conflict|NotFound", "content_type": "text/plain"},
        {"status": 400, "pattern": "^Invalid", "template": "{{ error.errorMessage.split(':')[1] + 1 }}"},
    ],
}


def _error(message: str, etype: str = "ValueError") -> bytes:
    return json.dumps({"errorMessage": message, "errorType": etype, "stackTrace": ["  File x"]}).encode()


def test_success_uses_the_default_response() -> None:
    integration = _integration(RESPONSES)
    _, context = build_payload(integration, _request(), ROUTE)
    assert context["path_params"] == {"petId": "7"}  # kept: a response template reads it
    out = build_response(integration, b'{"name": "rex"}', None, context, "rid-1")
    assert out is not None and out.status == 200
    assert json.loads(out.body) == {"pet": "rex", "asked": "7"}
    assert out.headers == [("content-type", "application/json")]


def test_error_patterns_choose_the_response() -> None:
    integration = _integration(RESPONSES)
    out = build_response(integration, _error("NotFound: pet 7"), "Unhandled", {}, "rid-1")
    assert out is not None and out.status == 404
    assert json.loads(out.body) == {"message": "NotFound: pet 7", "status": 404}
    assert out.headers == [("content-type", "application/json"), ("x-mapped", "yes")]
    # re.search: anywhere in the message; the first matching response wins (404 above, before 409).
    out = build_response(integration, _error("pet 7: Conflict"), "Unhandled", {}, "rid-1")
    assert out is not None and out.status == 409 and out.headers == [("content-type", "text/plain")]
    assert json.loads(out.body)["errorMessage"] == "pet 7: Conflict"  # no template: the output as is
    assert select_response(integration, "xNotFound") is integration.responses[2]


def test_unmatched_error_falls_back_to_the_error_mapping() -> None:
    integration = _integration(RESPONSES)
    assert build_response(integration, _error("kaboom"), "Unhandled", {}, "rid-1") is None
    # An error that is not even JSON is matched on its text.
    assert build_response(integration, b"NotFound (raw)", "Unhandled", {}, "rid-1") is not None


def test_no_responses_configured() -> None:
    integration = _integration({"request_template": "{}"})
    out = build_response(integration, b"[1, 2]", None, {}, "rid-1")
    assert out is not None and (out.status, out.body) == (200, b"[1, 2]")
    assert out.headers == [("content-type", "application/json")]
    assert build_response(integration, _error("NotFound"), "Unhandled", {}, "rid-1") is None


def test_response_render_failure_is_a_502() -> None:
    integration = _integration(RESPONSES)
    out = build_response(integration, _error("Invalid: x"), "Unhandled", {}, "rid-9")
    assert out is not None and out.status == 502 and out.kind == "malformed_response"
    assert json.loads(out.body) == {"message": "Internal server error", "requestId": "rid-9"}
    assert out.log_reason == "response mapping failed" and "line 1" in (out.log_detail or "")
    assert "Invalid" not in out.body.decode()


def test_sandbox_holds_at_request_time() -> None:
    # An attribute named by the data reaches the sandbox only at request time: a 502, never the attribute.
    integration = _integration({"responses": [{"template": "{{ result | attr(result.field | string) }}"}]})
    out = build_response(integration, b'{"field": "__class__"}', None, {}, "rid-1")
    assert out is not None and out.status == 502 and b"class" not in out.body
    out = build_response(integration, b'{"field": "upper"}', None, {}, "rid-1")
    assert out is not None and out.status == 200


def test_templates_outside_the_model_are_checked_the_same() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        check_template("{{", "f", "response")
    built = Integration(None, (IntegrationResponse(201, None, None, (("content-type", "text/csv"),)),))
    out = build_response(built, b"a,b", None, {}, "rid-1")
    assert out is not None and out.status == 201 and out.headers == [("content-type", "text/csv")]
