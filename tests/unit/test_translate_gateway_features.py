"""translate(): the Envoy resources for mock routes, per-route rate limits and CORS (route `options` over the
Upstream's `spec.options`). tests/integration/test_gateway_features.py runs the same through a real Envoy."""

from __future__ import annotations

import copy

import pytest
import yaml
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.v3 import percent_pb2

from controlplane.model import parse_document, resolve
from controlplane.model.resources import Endpoint, RateLimit
from controlplane.translate.envoy import (
    CORS_FILTER,
    EXTPROC_FILTER,
    NOWHERE_CLUSTER,
    PREFLIGHT_SUFFIX,
    RATE_LIMIT_FILTER,
    TranslateOptions,
    Translation,
    retry_after_s,
    translate,
)

LOCAL = Endpoint("http", "127.0.0.1", 9001)

BASE = """
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: fns}
spec:
  region: us-east-1
  endpoint: local
  functions: [{name: f, spec: {function_name: fn}}]
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  routes:
  - matcher: {path: /plain, methods: [GET]}
    destination: {upstream: fns, function: f}
"""


def docs(routes: list[dict] | None = None, upstream_options: dict | None = None) -> list[dict]:
    out = list(yaml.safe_load_all(BASE))
    if routes is not None:
        out[1]["spec"]["routes"] = routes
    if upstream_options is not None:
        out[0]["spec"]["options"] = upstream_options
    return out


def run(documents: list[dict]) -> Translation:
    res = resolve([parse_document(copy.deepcopy(d)) for d in documents], local_endpoint=LOCAL)
    assert res.errors == {}, {str(k): str(v) for k, v in res.errors.items()}
    return translate(res.config, TranslateOptions())


def routes_of(t: Translation) -> list[route_components_pb2.Route]:
    (rc,) = t.routes
    (vh,) = rc.virtual_hosts
    return list(vh.routes)


def hcm_of(t: Translation) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert t.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def per_route(route: route_components_pb2.Route, name: str, message):
    """The per-route config of a filter, unwrapped from the FilterConfig that switches it on."""
    fc = route_components_pb2.FilterConfig()
    assert route.typed_per_filter_config[name].Unpack(fc)
    assert fc.disabled is False
    assert fc.config.Unpack(message)
    return message


def cors_of(route: route_components_pb2.Route) -> cors_pb2.CorsPolicy:
    return per_route(route, CORS_FILTER, cors_pb2.CorsPolicy())


def limit_of(route: route_components_pb2.Route) -> local_rate_limit_pb2.LocalRateLimit:
    return per_route(route, RATE_LIMIT_FILTER, local_rate_limit_pb2.LocalRateLimit())


def header(route: route_components_pb2.Route, name: str) -> route_components_pb2.HeaderMatcher | None:
    return next((h for h in route.match.headers if h.name == name), None)


def added(route: route_components_pb2.Route) -> dict[str, str]:
    return {h.header.key: h.header.value for h in route.response_headers_to_add}


ROUTE = {"matcher": {"path": "/r", "methods": ["GET"]}, "destination": {"upstream": "fns", "function": "f"}}


def with_options(options: dict, route: dict = ROUTE) -> dict:
    return {**route, "options": options}


# ---------------------------------------------------------------------------------------------------------------
# The HCM


def test_filters_are_always_there_and_off_until_a_route_turns_them_on():
    hcm = hcm_of(run(docs()))
    names = [f.name for f in hcm.http_filters]
    # Ahead of ext_proc: a preflight or a limited request ends in Envoy.
    assert names == [CORS_FILTER, RATE_LIMIT_FILTER, EXTPROC_FILTER, "envoy.filters.http.router"]
    assert [f.disabled for f in hcm.http_filters] == [True, True, True, False]
    rl = local_rate_limit_pb2.LocalRateLimit()
    assert hcm.http_filters[1].typed_config.Unpack(rl)
    assert not rl.HasField("token_bucket")  # no bucket of its own: only per route


def test_adding_gateway_features_never_changes_the_listener():
    before = run(docs()).listeners[0].SerializeToString(deterministic=True)
    routes = [
        with_options({"cors": {"allow_origins": ["*"]}, "rate_limit": {"requests": 5}}),
        {
            "matcher": {"path": "/m"},
            "mock": {"status": 200, "body": "x"},
            "options": {"rate_limit": {"requests": 1}},
        },
    ]
    after = run(docs(routes)).listeners[0].SerializeToString(deterministic=True)
    assert after == before  # a Listener change would drain every connection


def test_local_replies_are_json():
    hcm = hcm_of(run(docs()))
    nr, limited = hcm.local_reply_config.mappers
    assert list(nr.filter.response_flag_filter.flags) == ["NR"]
    assert nr.body_format_override.json_format["message"] == "Not Found"
    # The rate limit sets its flag RL only after its reply went out: the mapper selects on the status.
    assert limited.filter.status_code_filter.comparison.value.default_value == 429
    body = limited.body_format_override.json_format
    assert (body["message"], body["requestId"]) == ("Too Many Requests", "%REQ(X-REQUEST-ID)%")


def test_ext_proc_is_skipped_for_a_429_that_is_not_lambdas():
    hcm = hcm_of(run(docs()))
    wrapped = extension_matcher_pb2.ExtensionWithMatcher()
    assert hcm.http_filters[2].typed_config.Unpack(wrapped)
    (field,) = wrapped.xds_matcher.matcher_list.matchers
    assert field.on_match.action.typed_config.type_url.endswith("SkipFilter")
    status, not_lambda = field.predicate.and_matcher.predicate
    assert status.single_predicate.value_match.exact == "429"
    names = [p.single_predicate.input.name for p in not_lambda.not_matcher.or_matcher.predicate]
    assert names == ["x-amzn-requestid", "x-amzn-errortype"]


# ---------------------------------------------------------------------------------------------------------------
# Mock integration


MOCK = {
    "matcher": {"path": "/health", "methods": ["GET"]},
    "mock": {"status": 201, "headers": {"x-mock": "yes"}, "body": {"ok": True}},
}


def test_mock_route_is_a_direct_response_without_ext_proc():
    t = run(docs([MOCK, ROUTE]))
    mock, _lambda = routes_of(t)
    assert mock.WhichOneof("action") == "direct_response"
    assert mock.direct_response.status == 201
    assert mock.direct_response.body.inline_string == '{"ok":true}'
    assert added(mock) == {"x-mock": "yes", "content-type": "application/json"}
    assert mock.match.path == "/health"
    assert header(mock, ":method").string_match.safe_regex.regex == "^(GET|HEAD)$"
    assert EXTPROC_FILTER not in mock.typed_per_filter_config
    assert mock.name not in t.route_table  # ext_proc never hears of it
    assert mock.name.startswith("default/api/0/")


def test_mock_route_name_is_a_content_hash():
    name = routes_of(run(docs([MOCK])))[0].name
    assert routes_of(run(docs([MOCK])))[0].name == name
    changed = copy.deepcopy(MOCK)
    changed["mock"]["body"] = "other"
    assert routes_of(run(docs([changed])))[0].name != name
    limited = with_options({"rate_limit": {"requests": 2}}, MOCK)
    assert routes_of(run(docs([limited])))[0].name != name


def test_mock_route_takes_only_its_own_options():
    # The Upstream's options are for the routes to it; a mock has no Upstream.
    t = run(docs([MOCK], upstream_options={"rate_limit": {"requests": 1}, "cors": {"allow_origins": ["*"]}}))
    (mock,) = routes_of(t)
    assert dict(mock.typed_per_filter_config) == {}
    (mock,) = routes_of(run(docs([with_options({"rate_limit": {"requests": 7, "per": "1m"}}, MOCK)])))
    assert limit_of(mock).token_bucket.tokens_per_fill.value == 7


def test_mock_cors_with_one_origin_names_it():
    route = with_options(
        {"cors": {"allow_origins": ["https://a.example"], "expose_headers": ["x-mock"]}}, MOCK
    )
    preflight, mock = routes_of(run(docs([route])))
    assert preflight.name == mock.name + PREFLIGHT_SUFFIX
    assert added(mock)["access-control-allow-origin"] == "https://a.example"
    assert added(mock)["access-control-expose-headers"] == "x-mock"
    assert added(mock)["x-mock"] == "yes"


def test_mock_cors_with_any_origin_echoes_it():
    route = with_options({"cors": {"allow_origins": ["*"]}}, MOCK)
    _preflight, mock = routes_of(run(docs([route])))
    assert added(mock)["access-control-allow-origin"] == "%REQ(origin)%"


def test_mock_cors_with_several_origins_has_a_copy_per_origin():
    origins = ["https://a.example", "https://b.example"]
    route = with_options({"cors": {"allow_origins": origins, "allow_credentials": True}}, MOCK)
    preflight, for_a, for_b, rest = routes_of(run(docs([route])))
    assert preflight.name.endswith(PREFLIGHT_SUFFIX)
    for variant, origin in ((for_a, origins[0]), (for_b, origins[1])):
        assert header(variant, "origin").string_match.exact == origin
        assert header(variant, "origin").string_match.ignore_case
        assert added(variant)["access-control-allow-origin"] == "%REQ(origin)%"
        assert added(variant)["access-control-allow-credentials"] == "true"
        assert variant.name.startswith(rest.name + "/origin")
    assert header(rest, "origin") is None
    assert "access-control-allow-origin" not in added(rest)


# ---------------------------------------------------------------------------------------------------------------
# Rate limit


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (RateLimit(3, 10.0, 3), 4),  # a token every 3.33 s
        (RateLimit(100, 1.0, 100), 1),  # at least 1
        (RateLimit(1, 3600.0, 5), 3600),
        (RateLimit(2, 0.5, 2), 1),
    ],
)
def test_retry_after_is_the_time_to_the_next_token_in_whole_seconds(limit, expected):
    assert retry_after_s(limit) == expected


def test_rate_limit_is_a_token_bucket_enforced_on_every_request():
    route = with_options({"rate_limit": {"requests": 3, "per": "10s", "burst": 6}})
    t = run(docs([route]))
    (r,) = routes_of(t)
    rl = limit_of(r)
    assert rl.token_bucket.max_tokens == 6
    assert rl.token_bucket.tokens_per_fill.value == 3
    assert rl.token_bucket.fill_interval.seconds == 10
    full = percent_pb2.FractionalPercent(numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED)
    assert rl.filter_enabled.default_value == full
    assert rl.filter_enforced.default_value == full
    (retry_after,) = rl.response_headers_to_add
    assert (retry_after.header.key, retry_after.header.value) == ("retry-after", "4")
    assert EXTPROC_FILTER in r.typed_per_filter_config  # still a Lambda route
    assert CORS_FILTER not in r.typed_per_filter_config


def test_rate_limit_defaults_burst_to_requests_and_period_to_a_second():
    (r,) = routes_of(run(docs([with_options({"rate_limit": {"requests": 50}})])))
    bucket = limit_of(r).token_bucket
    assert (bucket.max_tokens, bucket.tokens_per_fill.value, bucket.fill_interval.seconds) == (50, 50, 1)


def test_options_layer_route_over_upstream():
    upstream = {"rate_limit": {"requests": 10}, "cors": {"allow_origins": ["https://up.example"]}}
    routes = [
        ROUTE,  # inherits both
        with_options({"rate_limit": {"requests": 2}}, {**ROUTE, "matcher": {"path": "/own"}}),
    ]
    inherited_pre, inherited, own_pre, own = routes_of(run(docs(routes, upstream_options=upstream)))
    assert limit_of(inherited).token_bucket.tokens_per_fill.value == 10
    assert [m.exact for m in cors_of(inherited).allow_origin_string_match] == ["https://up.example"]
    assert limit_of(own).token_bucket.tokens_per_fill.value == 2  # the route's own wins
    assert [m.exact for m in cors_of(own).allow_origin_string_match] == ["https://up.example"]
    assert inherited_pre.name.endswith(PREFLIGHT_SUFFIX) and own_pre.name.endswith(PREFLIGHT_SUFFIX)


def test_plain_routes_keep_their_names_and_gateway_options_change_them():
    (plain,) = routes_of(run(docs()))
    (again,) = routes_of(run(docs()))
    assert plain.name == again.name
    (limited,) = routes_of(
        run(docs([with_options({"rate_limit": {"requests": 1}}, docs()[1]["spec"]["routes"][0])]))
    )
    assert limited.name != plain.name
    assert limited.name.rsplit("/", 1)[0] == plain.name.rsplit("/", 1)[0]


# ---------------------------------------------------------------------------------------------------------------
# CORS


def test_cors_policy_fields():
    cors = {
        "allow_origins": ["https://a.example", "https://b.example:8443"],
        "allow_headers": ["content-type", "x-api-key"],
        "expose_headers": ["x-request-id"],
        "max_age": "10m",
        "allow_credentials": True,
    }
    _pre, r = routes_of(run(docs([with_options({"cors": cors})])))
    policy = cors_of(r)
    assert [(m.exact, m.ignore_case) for m in policy.allow_origin_string_match] == [
        ("https://a.example", True),
        ("https://b.example:8443", True),
    ]
    assert policy.allow_methods == "GET"  # the route's methods when allow_methods is not given
    assert policy.allow_headers == "content-type,x-api-key"
    assert policy.expose_headers == "x-request-id"
    assert policy.max_age == "600"
    assert policy.allow_credentials.value is True
    # A preflight from another origin is answered too (without CORS headers), never forwarded.
    assert policy.forward_not_matching_preflights.value is False
    assert EXTPROC_FILTER in r.typed_per_filter_config


def test_cors_allow_methods_default_and_explicit():
    any_method = {"matcher": {"prefix": "/p"}, "destination": {"upstream": "fns", "function": "f"}}
    _pre, r = routes_of(run(docs([with_options({"cors": {"allow_origins": ["*"]}}, any_method)])))
    assert cors_of(r).allow_methods == "GET,HEAD,POST,PUT,PATCH,DELETE,OPTIONS"
    assert [m.exact for m in cors_of(r).allow_origin_string_match] == ["*"]  # Envoy reads "*" as any
    explicit = {"cors": {"allow_origins": ["*"], "allow_methods": ["put", "DELETE"]}}
    _pre, r = routes_of(run(docs([with_options(explicit)])))
    assert cors_of(r).allow_methods == "PUT,DELETE"
    assert not cors_of(r).HasField("allow_credentials")
    assert cors_of(r).max_age == ""


def test_preflight_companion_precedes_the_route_and_takes_its_preflights():
    route = with_options({"cors": {"allow_origins": ["https://a.example"]}, "rate_limit": {"requests": 1}})
    t = run(docs([route, ROUTE]))
    preflight, main, other = routes_of(t)
    assert preflight.name == main.name + PREFLIGHT_SUFFIX
    assert preflight.match.path == main.match.path == "/r"
    assert header(main, ":method").string_match.safe_regex.regex == "^(GET|HEAD)$"
    assert header(preflight, ":method").string_match.exact == "OPTIONS"
    for name in ("origin", "access-control-request-method"):
        assert (
            header(preflight, name).string_match.safe_regex.regex == ".+"
        )  # what the filter calls a preflight
    # Envoy's CORS filter ignores direct_response routes, so the companion forwards -- to no cluster: the filter
    # answers every request it matches.
    assert preflight.WhichOneof("action") == "route"
    assert preflight.route.cluster == NOWHERE_CLUSTER
    assert NOWHERE_CLUSTER not in {c.name for c in t.clusters}
    assert list(preflight.typed_per_filter_config) == [CORS_FILTER]  # no ext_proc, no token spent
    assert cors_of(preflight) == cors_of(main)
    assert preflight.name not in t.route_table and main.name in t.route_table
    assert CORS_FILTER not in other.typed_per_filter_config


def test_preflight_companion_of_a_template_route_uses_its_regex():
    route = {
        "matcher": {"path": "/items/{id}", "methods": ["DELETE"]},
        "destination": {"upstream": "fns", "function": "f"},
    }
    preflight, main = routes_of(run(docs([with_options({"cors": {"allow_origins": ["*"]}}, route)])))
    assert preflight.match.safe_regex.regex == main.match.safe_regex.regex == "^/items/(?P<id>[^/]+)$"
    assert cors_of(preflight).allow_methods == "DELETE"
