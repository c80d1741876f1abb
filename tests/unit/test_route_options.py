"""Route options and stage variables in the model, and the HTTP API (2.0) response rules."""

from __future__ import annotations

import pytest
from test_model import rejected, upstream_doc, vs_doc

from controlplane.aws.responses import MalformedResponse, unwrap_v2_response
from controlplane.model import parse_document
from controlplane.model.resources import DEFAULT_OPTIONS, RouteOptions, Upstream, VirtualService


def _route(**options: object) -> dict[str, object]:
    return {
        "matcher": {"prefix": "/"},
        "destination": {"upstream": "lambdas", "function": "list-pets"},
        "options": options,
    }


def test_options_parse_and_layer() -> None:
    vs = parse_document(vs_doc(routes=[_route(timeout="1.5s", invocation_type="Event")]))
    up = parse_document(upstream_doc(options={"payload_format": "apigateway-v2", "timeout": 20}))
    assert isinstance(vs, VirtualService) and isinstance(up, Upstream)
    assert vs.routes[0].options == RouteOptions(None, "Event", 1.5)
    assert up.options == RouteOptions("apigateway-v2", None, 20.0)
    effective = vs.routes[0].options.over(up.options).over(DEFAULT_OPTIONS)
    assert effective == RouteOptions("apigateway-v2", "Event", 1.5, 0, None, False)
    assert RouteOptions().over(RouteOptions()).over(DEFAULT_OPTIONS) == DEFAULT_OPTIONS


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"payload_format": "v3"}, "spec.routes[0].options.payload_format", "apigateway-v1, apigateway-v2, raw"),
        ({"invocation_type": "event"}, "spec.routes[0].options.invocation_type", "RequestResponse, Event"),
        ({"timeout": "soon"}, "spec.routes[0].options.timeout", "not a duration"),
        ({"timeout": "16m"}, "spec.routes[0].options.timeout", "at most 900s"),
        ({"timeout": 0}, "spec.routes[0].options.timeout", "more than 0"),
        ({"retries": 2}, "spec.routes[0].options.retries", "unknown field"),
    ],
)
def test_bad_options_name_the_field(options: dict[str, object], field: str, words: str) -> None:
    err = rejected(vs_doc(routes=[_route(**options)]))
    assert err.field == field and words in err.message


def test_stage_variables() -> None:
    vs = parse_document(vs_doc(stage_variables={"b": "x:/y?z=1", "a": 3}))
    assert isinstance(vs, VirtualService)
    assert vs.stage_variables == (("a", "3"), ("b", "x:/y?z=1"))
    assert rejected(vs_doc(stage_variables={"bad-name": "x"})).field == "spec.stage_variables.bad-name"
    assert rejected(vs_doc(stage_variables={"v": "has space"})).field == "spec.stage_variables.v"


def test_v2_response_rules() -> None:
    # Not an object with statusCode: the JSON itself is the body of a 200.
    out = unwrap_v2_response(b'{"hello": "world"}')
    assert (out.status, out.headers, out.body) == (
        200,
        [("content-type", "application/json")],
        b'{"hello": "world"}',
    )
    assert unwrap_v2_response(b'"text"').body == b'"text"'
    out = unwrap_v2_response(
        b'{"statusCode": 302, "headers": {"location": "/x"}, "cookies": ["a=1", "b=2"],'
        b' "multiValueHeaders": {"x-ignored": ["1"]}}'
    )
    assert out.status == 302
    assert out.headers == [("location", "/x"), ("set-cookie", "a=1"), ("set-cookie", "b=2")]
    with pytest.raises(MalformedResponse, match="cookies must be a list"):
        unwrap_v2_response(b'{"statusCode": 200, "cookies": "a=1"}')
    with pytest.raises(MalformedResponse, match="control character"):
        unwrap_v2_response(b'{"statusCode": 200, "cookies": ["a=1\\r\\nx: y"]}')
    with pytest.raises(MalformedResponse, match="not JSON"):
        unwrap_v2_response(b"{oops")
