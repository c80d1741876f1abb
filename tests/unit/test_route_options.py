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
        (
            {"payload_format": "v3"},
            "spec.routes[0].options.payload_format",
            "apigateway-v1, apigateway-v2, raw",
        ),
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


# --- issue 5: the rest of the options, destination forms, mock routes and keep-warm ----------------------------

from test_model import parsed, secret_doc  # noqa: E402

from controlplane.model import resolve  # noqa: E402
from controlplane.model.resources import (  # noqa: E402
    CorsPolicy,
    Destination,
    FunctionChoice,
    KeepWarm,
    MockResponse,
    RateLimit,
)
from controlplane.translate.envoy import RESIGN_SUFFIX, TranslateOptions, translate  # noqa: E402


def test_every_option_parses() -> None:
    vs = parse_document(
        vs_doc(
            routes=[
                _route(
                    payload_format="raw",
                    max_retries=3,
                    errors={"function_error": 500, "throttled": 503},
                    log_tail=True,
                    rate_limit={"requests": 10, "per": "1m", "burst": 20},
                    cors={
                        "allow_origins": ["https://app.example.com"],
                        "allow_methods": ["get", "POST"],
                        "allow_headers": ["x-api-key"],
                        "expose_headers": ["x-request-id"],
                        "max_age": "10m",
                        "allow_credentials": True,
                    },
                )
            ]
        )
    )
    assert isinstance(vs, VirtualService)
    opts = vs.routes[0].options
    assert opts.payload_format == "raw" and opts.max_retries == 3 and opts.log_tail is True
    assert opts.errors == (("function_error", 500), ("throttled", 503))
    assert opts.rate_limit == RateLimit(10, 60.0, 20)
    assert opts.cors == CorsPolicy(
        ("https://app.example.com",), ("GET", "POST"), ("x-api-key",), ("x-request-id",), 600, True
    )
    assert opts.error_status("function_error") == 500 and opts.error_status("function_timeout") == 504
    # A rate limit's burst defaults to its rate, its period to a second.
    vs = parse_document(vs_doc(routes=[_route(rate_limit={"requests": 5})]))
    assert isinstance(vs, VirtualService) and vs.routes[0].options.rate_limit == RateLimit(5, 1.0, 5)


def test_error_mappings_merge_kind_by_kind() -> None:
    route = RouteOptions(errors=(("function_error", 500),))
    upstream = RouteOptions(errors=(("function_error", 400), ("throttled", 503)))
    merged = route.over(upstream).over(DEFAULT_OPTIONS)
    assert merged.errors == (("function_error", 500), ("throttled", 503))
    assert merged.error_status("malformed_response") == 502


@pytest.mark.parametrize(
    ("options", "field", "words"),
    [
        ({"max_retries": 6}, "spec.routes[0].options.max_retries", "from 0 to 5"),
        ({"max_retries": True}, "spec.routes[0].options.max_retries", "whole number"),
        ({"errors": {"oops": 500}}, "spec.routes[0].options.errors.oops", "unknown error kind"),
        ({"errors": {"throttled": 200}}, "spec.routes[0].options.errors.throttled", "from 400 to 599"),
        ({"log_tail": "yes"}, "spec.routes[0].options.log_tail", "true or false"),
        ({"rate_limit": {"per": "1s"}}, "spec.routes[0].options.rate_limit.requests", "missing"),
        ({"rate_limit": {"requests": 0}}, "spec.routes[0].options.rate_limit.requests", "from 1"),
        ({"rate_limit": {"requests": 5, "burst": 2}}, "spec.routes[0].options.rate_limit.burst", "from 5"),
        ({"rate_limit": {"requests": 5, "per": "10ms"}}, "spec.routes[0].options.rate_limit.per", "50ms"),
        ({"cors": {}}, "spec.routes[0].options.cors.allow_origins", "non-empty list"),
        (
            {"cors": {"allow_origins": ["app.example.com"]}},
            "spec.routes[0].options.cors.allow_origins[0]",
            "origin",
        ),
        (
            {"cors": {"allow_origins": ["*"], "allow_credentials": True}},
            "spec.routes[0].options.cors.allow_credentials",
            "list the origins",
        ),
        (
            {"cors": {"allow_origins": ["*"], "allow_headers": ["bad header"]}},
            "spec.routes[0].options.cors.allow_headers[0]",
            "header name",
        ),
    ],
)
def test_bad_new_options_name_the_field(options: dict[str, object], field: str, words: str) -> None:
    err = rejected(vs_doc(routes=[_route(**options)]))
    assert err.field == field and words in err.message


def _dest_route(destination: dict[str, object], path: str = "/fn/{name}") -> dict[str, object]:
    return {"matcher": {"path": path}, "destination": {"upstream": "lambdas", **destination}}


def test_destination_forms() -> None:
    vs = parse_document(
        vs_doc(
            routes=[
                _dest_route({"function_name": "arn:aws:lambda:us-east-1:123456789012:function:f:live"}),
                _dest_route({"function_param": "name"}),
                _dest_route(
                    {
                        "functions": [
                            {"function": "list-pets", "weight": 80},
                            {"function_name": "PetsGet:2", "weight": 20},
                        ]
                    }
                ),
            ]
        )
    )
    assert isinstance(vs, VirtualService)
    one, param, weighted = (r.destination for r in vs.routes)
    assert one == Destination(
        "lambdas", "default", function_name="arn:aws:lambda:us-east-1:123456789012:function:f:live"
    )
    assert param is not None and param.function_param == "name" and param.choices() == ()
    assert weighted is not None and weighted.choices() == (
        FunctionChoice("list-pets", None, 80),
        FunctionChoice("", "PetsGet:2", 20),
    )


@pytest.mark.parametrize(
    ("destination", "field", "words"),
    [
        (
            {"function": "a", "function_param": "name"},
            "spec.routes[0].destination.function_param",
            "only one",
        ),
        ({"function_param": "id"}, "spec.routes[0].destination.function_param", "not a path parameter"),
        ({"function_name": "bad name!"}, "spec.routes[0].destination.function_name", "not a Lambda function"),
        ({"functions": []}, "spec.routes[0].destination.functions", "non-empty"),
        (
            {"functions": [{"function": "a"}]},
            "spec.routes[0].destination.functions[0].weight",
            "missing",
        ),
        (
            {"functions": [{"function": "a", "function_name": "b", "weight": 1}]},
            "spec.routes[0].destination.functions[0].function",
            "exactly one",
        ),
        (
            {"functions": [{"function": "a", "weight": 0}]},
            "spec.routes[0].destination.functions",
            "more than 0",
        ),
    ],
)
def test_bad_destinations_name_the_field(destination: dict[str, object], field: str, words: str) -> None:
    err = rejected(vs_doc(routes=[_dest_route(destination)]))
    assert err.field == field and words in err.message


def test_resolve_checks_every_choice_and_the_arn_region() -> None:
    bad_choice = vs_doc(
        routes=[
            _dest_route(
                {"functions": [{"function": "list-pets", "weight": 1}, {"function": "gone", "weight": 1}]}
            )
        ]
    )
    res = resolve(parsed(secret_doc(), upstream_doc(), bad_choice))
    (err,) = res.errors.values()
    assert err.field == "spec.routes[0].destination.functions[1].function" and "'gone'" in err.message
    other_region = vs_doc(
        routes=[_dest_route({"function_name": "arn:aws:lambda:eu-west-1:123456789012:function:f"})]
    )
    (err,) = resolve(parsed(secret_doc(), upstream_doc(), other_region)).errors.values()
    assert err.field == "spec.routes[0].destination.function_name" and "eu-west-1" in err.message
    ok = vs_doc(routes=[_dest_route({"function_param": "name"})])
    assert not resolve(parsed(secret_doc(), upstream_doc(), ok)).errors


def test_mock_routes() -> None:
    vs = parse_document(
        vs_doc(
            routes=[
                {"matcher": {"path": "/health"}, "mock": {"status": 200, "body": {"ok": True}}},
                {
                    "matcher": {"path": "/teapot"},
                    "mock": {"status": 418, "headers": {"X-Kind": "tea"}, "body": "short"},
                },
            ]
        )
    )
    assert isinstance(vs, VirtualService)
    health, teapot = vs.routes
    assert health.destination is None and health.mock == MockResponse(
        200, (("content-type", "application/json"),), '{"ok":true}'
    )
    assert teapot.mock == MockResponse(418, (("x-kind", "tea"),), "short")
    both = {"matcher": {"path": "/x"}, "mock": {}, "destination": {"upstream": "lambdas", "function": "f"}}
    assert rejected(vs_doc(routes=[both])).field == "spec.routes[0].mock"
    assert rejected(vs_doc(routes=[{"matcher": {"path": "/x"}, "mock": {"status": 99}}])).field == (
        "spec.routes[0].mock.status"
    )
    assert rejected(
        vs_doc(routes=[{"matcher": {"path": "/x"}, "mock": {"headers": {"x": "a\nb"}}}])
    ).field == ("spec.routes[0].mock.headers.x")
    for bad_mock, field in (
        ({"status": 429}, "spec.routes[0].mock.status"),
        ({"headers": {"Host": "x"}}, "spec.routes[0].mock.headers.Host"),
        ({"headers": {"content-length": "3"}}, "spec.routes[0].mock.headers.content-length"),
    ):
        assert rejected(vs_doc(routes=[{"matcher": {"path": "/x"}, "mock": bad_mock}])).field == field
    # Only rate_limit and cors mean something on a route that invokes nothing.
    retried_mock = {"matcher": {"path": "/x"}, "mock": {}, "options": {"max_retries": 2}}
    assert rejected(vs_doc(routes=[retried_mock])).field == "spec.routes[0].options.max_retries"
    # A mock route needs no Upstream, so it resolves on its own.
    only_mock = vs_doc(routes=[{"matcher": {"path": "/health"}, "mock": {}}])
    assert not resolve(parsed(only_mock)).errors


def test_keep_warm_parses() -> None:
    fns = [
        {"name": "hot", "spec": {"function_name": "Hot"}, "keep_warm": {"interval": "5m", "concurrency": 3}}
    ]
    up = parse_document(upstream_doc(functions=fns))
    assert isinstance(up, Upstream) and up.functions[0].keep_warm == KeepWarm(300.0, 3)
    fns[0]["keep_warm"] = {"concurrency": 3}
    assert rejected(upstream_doc(functions=fns)).field == "spec.functions[0].keep_warm.interval"
    fns[0]["keep_warm"] = {"interval": "1m", "concurrency": 51}
    assert rejected(upstream_doc(functions=fns)).field == "spec.functions[0].keep_warm.concurrency"


def test_translate_targets_for_the_new_destinations() -> None:
    vs = vs_doc(
        routes=[
            _dest_route({"function_param": "name"}),
            _dest_route(
                {
                    "functions": [
                        {"function": "list-pets", "weight": 3},
                        {"function_name": "Other:7", "weight": 1},
                    ]
                },
                path="/canary",
            ),
            {**_dest_route({"function": "list-pets"}, path="/retried"), "options": {"max_retries": 2}},
        ]
    )
    res = resolve(parsed(secret_doc(), upstream_doc(), vs))
    assert not res.errors
    out = translate(res.config, TranslateOptions())
    param, canary, retried = out.route_table.values()
    assert param.function_param == "name" and param.param_functions is not None
    assert param.param_functions["get-pet"].invoke_path.endswith("PetsPetIdGet/invocations?Qualifier=live")
    assert [(c.function_name, c.qualifier, c.weight) for c in canary.choices] == [
        ("PetsGet", None, 3),
        ("Other", "7", 1),
    ]
    assert retried.max_retries == 2
    (route_config,) = out.routes
    actions = {r.name: r.route for r in route_config.virtual_hosts[0].routes}
    action = actions[retried.route_name]
    assert action.cluster.endswith(RESIGN_SUFFIX) and action.retry_policy.num_retries.value == 2
    assert 429 in action.retry_policy.retriable_status_codes
    assert not actions[canary.route_name].HasField("retry_policy")
    clusters = {c.name: c for c in out.clusters}
    resign = clusters[action.cluster]
    assert "envoy.extensions.upstreams.http.v3.HttpProtocolOptions" in resign.typed_extension_protocol_options
