"""Pure translation of a Config into Envoy resources (clusters, listener, routes) and ext_proc's route table.

No I/O: the same Config and options always give byte-identical protos, which golden tests pin.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from dataclasses import dataclass, field

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    address_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    grpc_service_pb2,
    protocol_pb2,
    substitution_format_string_pb2,
)
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.common.matching.v3 import extension_matcher_pb2
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2, processing_mode_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2 as tls_common_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import http_inputs_pb2, regex_pb2, status_code_input_pb2, string_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message
from xds.core.v3 import extension_pb2 as xds_extension_pb2
from xds.type.matcher.v3 import matcher_pb2 as xds_matcher_pb2
from xds.type.matcher.v3 import regex_pb2 as xds_regex_pb2
from xds.type.matcher.v3 import string_pb2 as xds_string_pb2

from controlplane.addresses import is_ip
from controlplane.model import Config, Matcher, ObjectKey
from controlplane.model.resources import (
    DEFAULT_OPTIONS,
    LOCAL_ENDPOINT,
    MAX_MOCK_BODY,
    CorsPolicy,
    Destination,
    Endpoint,
    FunctionChoice,
    MockResponse,
    RateLimit,
    RouteAuth,
    RouteOptions,
    Secret,
    Upstream,
    VirtualService,
    split_function_name,
)
from controlplane.model.routes import AuthorizerTarget, Invocable, RouteTarget, invoke_path
from controlplane.translate import auth
from controlplane.translate.auth import JWT_FILTER
from controlplane.translate.protos import any_of as _any
from controlplane.translate.protos import duration as _duration

__all__ = ["invoke_path", "translate", "TranslateOptions", "Translation", "Translator"]

LISTENER_NAME = "lambdagate_http"
ROUTE_CONFIG_NAME = "lambdagate_routes"
EXTPROC_CLUSTER = "lambdagate_extproc"
EXTPROC_FILTER = "envoy.filters.http.ext_proc"
CORS_FILTER = "envoy.filters.http.cors"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
RATE_LIMIT_STAT_PREFIX = "lambdagate_rate_limit"
# What a preflight companion route names as its cluster: none such exists. The CORS filter answers every request
# that route matches (all are preflights), so the router never looks the cluster up.
NOWHERE_CLUSTER = "lambdagate_preflight_only"
# The name of a CORS route's companion that takes its preflights (OPTIONS + Origin + Access-Control-Request-Method).
PREFLIGHT_SUFFIX = "/preflight"
# allow_methods when neither the policy nor the route's matcher names any. TRACE and CONNECT are left out:
# browsers refuse to send them.
CORS_ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# The cluster variant for routes with max_retries: its upstream filters sign every attempt anew.
RESIGN_SUFFIX = "_resign"

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

# API Gateway's methodArn names the AWS account; a gateway outside AWS has none, so this stands in for it.
METHOD_ARN_ACCOUNT = "000000000000"

# Attributes Envoy sends with the request headers: which route matched, and who is calling.
EXTPROC_REQUEST_ATTRIBUTES = ("xds.route_name", "source.address", "request.protocol")

# Lambda's synchronous payload limit is 6 MB; a base64 event is larger than the body, so leave room.
BUFFER_LIMIT_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class TranslateOptions:
    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    extproc_host: str = "127.0.0.1"
    extproc_port: int = 18000
    # ext_proc worker processes' ports (on extproc_host); when set, they replace extproc_port.
    extproc_ports: tuple[int, ...] = ()
    ca_bundle: str = "/etc/ssl/certs/ca-certificates.crt"
    # A Lambda function may run 15 minutes, API Gateway stops at 29 s: the API Gateway figure is what users expect.
    route_timeout_s: float = 30.0
    extproc_message_timeout_s: float = 2.0


@dataclass(frozen=True)
class Translation:
    clusters: tuple[cluster_pb2.Cluster, ...]
    listeners: tuple[listener_pb2.Listener, ...]
    routes: tuple[route_pb2.RouteConfiguration, ...]
    route_table: dict[str, RouteTarget] = field(default_factory=dict)
    # Deterministic encodings of some resources (type URL -> name -> bytes), known without serializing them again.
    serialized: dict[str, dict[str, bytes]] = field(default_factory=dict, compare=False, repr=False)

    def resources(self) -> dict[str, dict[str, Message]]:
        """Resources keyed by type URL and name, as the xDS cache wants them."""
        return {
            CLUSTER_TYPE: {c.name: c for c in self.clusters},
            LISTENER_TYPE: {listener.name: listener for listener in self.listeners},
            ROUTE_TYPE: {r.name: r for r in self.routes},
        }


def upstream_endpoint(up: Upstream, config: Config) -> Endpoint:
    if up.endpoint is None:
        return up.default_endpoint()
    if up.endpoint == LOCAL_ENDPOINT:
        assert config.local_endpoint is not None, "resolve() rejects 'local' without a local endpoint"
        return config.local_endpoint
    assert isinstance(up.endpoint, Endpoint)
    return up.endpoint


def cluster_name(ep: Endpoint) -> str:
    return f"lambda_{ep.scheme}_{ep.host}_{ep.port}"


def route_name(vs_namespace: str, vs_name: str, index: int, target_key: str) -> str:
    # The content hash makes a name mean one target forever, so a request routed by a config Envoy still holds
    # can never be sent to the function that a later config put at the same index.
    digest = hashlib.sha256(target_key.encode()).hexdigest()[:10]
    return f"{vs_namespace}/{vs_name}/{index}/{digest}"


def _socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def one_endpoint(cluster: str, host: str, *ports: int) -> endpoint_pb2.ClusterLoadAssignment:
    """One host, on one port or (ext_proc workers) several, balanced round robin."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=cluster,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(host, port))
                    )
                    for port in ports
                ]
            )
        ],
    )


def _processor(
    options: TranslateOptions,
    mode: processing_mode_pb2.ProcessingMode,
    rules: mutation_rules_pb2.HeaderMutationRules,
    max_receive_bytes: int | None = None,
) -> ext_proc_pb2.ExternalProcessor:
    """An ext_proc filter config talking to lambdagate. Fail closed: if the processor is unreachable the request
    ends in 5xx and is never sent unsigned."""
    grpc = grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=EXTPROC_CLUSTER)
    if max_receive_bytes is not None:
        grpc.max_receive_message_length.value = max_receive_bytes
    return ext_proc_pb2.ExternalProcessor(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc, timeout=_duration(options.extproc_message_timeout_s)
        ),
        failure_mode_allow=False,
        processing_mode=mode,
        message_timeout=_duration(options.extproc_message_timeout_s),
        mutation_rules=rules,
    )


def resign_filters(options: TranslateOptions) -> list[hcm_pb2.HttpFilter]:
    """The upstream filter chain of a retrying cluster: ext_proc signs each attempt again (headers only)."""
    mode = processing_mode_pb2.ProcessingMode
    signer = _processor(
        options,
        mode(
            request_header_mode=mode.SEND,
            request_body_mode=mode.NONE,
            request_trailer_mode=mode.SKIP,
            response_header_mode=mode.SKIP,
            response_body_mode=mode.NONE,
            response_trailer_mode=mode.SKIP,
        ),
        mutation_rules_pb2.HeaderMutationRules(disallow_is_error=wrappers_pb2.BoolValue(value=True)),
    )
    return [
        hcm_pb2.HttpFilter(name=EXTPROC_FILTER, typed_config=_any(signer)),
        hcm_pb2.HttpFilter(
            name="envoy.filters.http.upstream_codec", typed_config=_any(upstream_codec_pb2.UpstreamCodec())
        ),
    ]


def lambda_cluster(ep: Endpoint, options: TranslateOptions, *, resign: bool = False) -> cluster_pb2.Cluster:
    name = cluster_name(ep) + (RESIGN_SUFFIX if resign else "")
    cluster = cluster_pb2.Cluster(
        name=name,
        connect_timeout=_duration(5),
        type=cluster_pb2.Cluster.STATIC if is_ip(ep.host) else cluster_pb2.Cluster.LOGICAL_DNS,
        dns_lookup_family=cluster_pb2.Cluster.V4_PREFERRED,
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=BUFFER_LIMIT_BYTES),
        load_assignment=one_endpoint(name, ep.host, ep.port),
    )
    if ep.tls:
        tls = tls_pb2.UpstreamTlsContext(
            sni=ep.host,
            common_tls_context=tls_pb2.CommonTlsContext(
                validation_context=tls_common_pb2.CertificateValidationContext(
                    trusted_ca=base_pb2.DataSource(filename=options.ca_bundle),
                    match_typed_subject_alt_names=[
                        tls_common_pb2.SubjectAltNameMatcher(
                            san_type=tls_common_pb2.SubjectAltNameMatcher.DNS,
                            matcher=string_pb2.StringMatcher(exact=ep.host),
                        )
                    ],
                )
            ),
        )
        cluster.transport_socket.CopyFrom(
            base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=_any(tls))
        )
    if resign:
        http = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http_protocol_options=protocol_pb2.Http1ProtocolOptions()
            ),
            http_filters=resign_filters(options),
        )
        cluster.typed_extension_protocol_options[
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ].CopyFrom(_any(http))
    return cluster


def extproc_cluster(options: TranslateOptions) -> cluster_pb2.Cluster:
    h2 = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    cluster = cluster_pb2.Cluster(
        name=EXTPROC_CLUSTER,
        connect_timeout=_duration(1),
        type=cluster_pb2.Cluster.STATIC if is_ip(options.extproc_host) else cluster_pb2.Cluster.STRICT_DNS,
        load_assignment=one_endpoint(
            EXTPROC_CLUSTER, options.extproc_host, *(options.extproc_ports or (options.extproc_port,))
        ),
    )
    cluster.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ].CopyFrom(_any(h2))
    return cluster


def extproc_filter(options: TranslateOptions, jwt_claims: bool = False) -> hcm_pb2.HttpFilter:
    mode = processing_mode_pb2.ProcessingMode
    ext_proc = _processor(
        options,
        mode(
            request_header_mode=mode.SEND,
            request_body_mode=mode.BUFFERED,
            request_trailer_mode=mode.SKIP,
            response_header_mode=mode.SEND,
            response_body_mode=mode.BUFFERED,
            response_trailer_mode=mode.SKIP,
        ),
        mutation_rules_pb2.HeaderMutationRules(
            allow_all_routing=wrappers_pb2.BoolValue(value=True),
            # x-envoy-* headers (x-envoy-external-address, or any a client sent) must not reach the Invoke API.
            allow_envoy=wrappers_pb2.BoolValue(value=True),
            # A mutation the filter refuses must fail the request rather than pass it on half-rewritten.
            disallow_is_error=wrappers_pb2.BoolValue(value=True),
        ),
        max_receive_bytes=4 * BUFFER_LIMIT_BYTES,
    )
    ext_proc.request_attributes.extend(EXTPROC_REQUEST_ATTRIBUTES)
    if jwt_claims:
        # The claims jwt_authn verified reach the function's event; a client cannot forge dynamic metadata.
        ext_proc.metadata_options.forwarding_namespaces.untyped.append(auth.JWT_FILTER)
    # The route was chosen on the client's path; the rewrite to Lambda's Invoke path must not re-route it.
    ext_proc.route_cache_action = ext_proc_pb2.ExternalProcessor.RETAIN
    # Envoy passes a local reply through every encoder filter the route enables, including those that never saw
    # the request. The local rate limit's 429 must not reach ext_proc (it would open a Python stream and read the
    # answer as a broken Lambda one): the matcher skips ext_proc for a 429 that is not Lambda's.
    wrapped = extension_matcher_pb2.ExtensionWithMatcher(
        extension_config=extension_pb2.TypedExtensionConfig(name=EXTPROC_FILTER, typed_config=_any(ext_proc)),
        xds_matcher=_skip_local_throttle(("429", "401", "403") if jwt_claims else ("429",)),
    )
    # Off by default and switched on by each Lambda route: Envoy's own answers (no route, a redirect, an HTTP/1.0
    # 426) never go through a processor that would read them as Lambda's, and cost no Python stream.
    return hcm_pb2.HttpFilter(name=EXTPROC_FILTER, typed_config=_any(wrapped), disabled=True)


def _skip_local_throttle(statuses: tuple[str, ...] = ("429",)) -> xds_matcher_pb2.Matcher:
    """Matches a 429 that is not Lambda's (neither x-amzn-requestid nor x-amzn-errortype): the local rate limit's.
    With JWT authorizers, also jwt_authn's 401 and RBAC's 403 (`statuses`).

    A non-Lambda 429 from upstream would pass unmapped too; the Invoke API always sends x-amzn-requestid."""
    predicate = xds_matcher_pb2.Matcher.MatcherList.Predicate

    def response(
        input_: Message, value: xds_string_pb2.StringMatcher, name: str
    ) -> xds_matcher_pb2.Matcher.MatcherList.Predicate:
        return predicate(
            single_predicate=predicate.SinglePredicate(
                input=xds_extension_pb2.TypedExtensionConfig(name=name, typed_config=_any(input_)),
                value_match=value,
            )
        )

    def present(header: str) -> xds_matcher_pb2.Matcher.MatcherList.Predicate:
        anything = xds_regex_pb2.RegexMatcher(google_re2=xds_regex_pb2.RegexMatcher.GoogleRE2(), regex=".*")
        return response(
            http_inputs_pb2.HttpResponseHeaderMatchInput(header_name=header),
            xds_string_pb2.StringMatcher(safe_regex=anything),
            header,
        )

    status_429 = response(
        status_code_input_pb2.HttpResponseStatusCodeMatchInput(),
        xds_string_pb2.StringMatcher(exact=statuses[0])
        if len(statuses) == 1
        else xds_string_pb2.StringMatcher(
            safe_regex=xds_regex_pb2.RegexMatcher(
                google_re2=xds_regex_pb2.RegexMatcher.GoogleRE2(), regex="|".join(statuses)
            )
        ),
        "status",
    )
    from_lambda = predicate(
        or_matcher=predicate.PredicateList(
            predicate=[present("x-amzn-requestid"), present("x-amzn-errortype")]
        )
    )
    local_429 = predicate(
        and_matcher=predicate.PredicateList(predicate=[status_429, predicate(not_matcher=from_lambda)])
    )
    skip = xds_extension_pb2.TypedExtensionConfig(
        name="skip", typed_config=_any(skip_action_pb2.SkipFilter())
    )
    return xds_matcher_pb2.Matcher(
        matcher_list=xds_matcher_pb2.Matcher.MatcherList(
            matchers=[
                xds_matcher_pb2.Matcher.MatcherList.FieldMatcher(
                    predicate=local_429, on_match=xds_matcher_pb2.Matcher.OnMatch(action=skip)
                )
            ]
        )
    )


def _enable(config: Message) -> any_pb2.Any:
    """Per-route config that switches on a filter the HCM lists as disabled."""
    return _any(route_components_pb2.FilterConfig(config=_any(config), disabled=False))


def _extproc_enabled() -> dict[str, any_pb2.Any]:
    per_route = ext_proc_pb2.ExtProcPerRoute(overrides=ext_proc_pb2.ExtProcOverrides())
    return {EXTPROC_FILTER: _enable(per_route)}


# The same for every Lambda route: built once, copied into each route by the Route constructor.
_EXTPROC_ENABLED = _extproc_enabled()


@functools.lru_cache(maxsize=1024)
def _effective_options(route: RouteOptions, upstream: RouteOptions) -> RouteOptions:
    """A route's options over its Upstream's over the defaults; routes mostly share a handful of combinations."""
    return route.over(upstream).over(DEFAULT_OPTIONS)


@functools.lru_cache(maxsize=64)
def _timeout(seconds: float) -> duration_pb2.Duration:
    """A route timeout, built once per value and copied into each RouteAction (never mutate it)."""
    return _duration(seconds)


def cors_filter() -> hcm_pb2.HttpFilter:
    # Off by default: a route with `options.cors` switches it on with its policy. Ahead of ext_proc, so a preflight
    # is answered here and never reaches a function; on the way back it runs after ext_proc's rewrite of Lambda's
    # answer, so the function's response gets the CORS headers too.
    return hcm_pb2.HttpFilter(name=CORS_FILTER, typed_config=_any(cors_pb2.Cors()), disabled=True)


def rate_limit_filter() -> hcm_pb2.HttpFilter:
    # Off by default (and, with no token bucket, a no-op even if on): a route with `options.rate_limit` switches it
    # on with its own bucket. Ahead of ext_proc, so a limited request never reaches a function nor costs a stream.
    config = local_rate_limit_pb2.LocalRateLimit(stat_prefix=RATE_LIMIT_STAT_PREFIX)
    return hcm_pb2.HttpFilter(name=RATE_LIMIT_FILTER, typed_config=_any(config), disabled=True)


def _percent_100() -> base_pb2.RuntimeFractionalPercent:
    return base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    )


def retry_after_s(rl: RateLimit) -> int:
    """Whole seconds until the bucket holds a token again after it ran dry. Envoy's bucket refills continuously,
    `requests` per `per_s` (it is not timer-based; measured on 1.40), so one token takes per_s/requests."""
    return max(1, math.ceil(rl.per_s / rl.requests))


def rate_limit_config(rl: RateLimit) -> local_rate_limit_pb2.LocalRateLimit:
    """One route's token bucket, enabled and enforced for every request. Each Envoy instance has its own."""
    return local_rate_limit_pb2.LocalRateLimit(
        stat_prefix=RATE_LIMIT_STAT_PREFIX,
        token_bucket=token_bucket_pb2.TokenBucket(
            max_tokens=rl.burst,
            tokens_per_fill=wrappers_pb2.UInt32Value(value=rl.requests),
            fill_interval=_duration(rl.per_s),
        ),
        filter_enabled=_percent_100(),
        filter_enforced=_percent_100(),
        response_headers_to_add=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key="retry-after", value=str(retry_after_s(rl))),
                append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
            )
        ],
    )


def cors_policy(policy: CorsPolicy, matcher: Matcher) -> cors_pb2.CorsPolicy:
    """Envoy's CORS policy for a route; with no allow_methods, the route's own methods (or all of them)."""
    methods = policy.allow_methods or matcher.methods or CORS_ALL_METHODS
    out = cors_pb2.CorsPolicy(
        # Envoy treats a matcher that matches "*" as any origin, and answers with the request's Origin.
        allow_origin_string_match=[
            string_pb2.StringMatcher(exact=origin, ignore_case=True) for origin in policy.allow_origins
        ],
        allow_methods=",".join(methods),
    )
    if policy.allow_headers:
        out.allow_headers = ",".join(policy.allow_headers)
    if policy.expose_headers:
        out.expose_headers = ",".join(policy.expose_headers)
    if policy.max_age_s is not None:
        out.max_age = str(policy.max_age_s)
    if policy.allow_credentials:
        out.allow_credentials.value = True
    # A preflight from an origin not allowed is answered too (without CORS headers): preflights never reach a
    # function, whatever the route's methods.
    out.forward_not_matching_preflights.value = False
    return out


def _gateway_filters(opts: RouteOptions, matcher: Matcher) -> dict[str, any_pb2.Any]:
    """Per-route configs of the CORS and rate limit filters, for the options that set them."""
    out: dict[str, any_pb2.Any] = {}
    if opts.cors is not None:
        out[CORS_FILTER] = _enable(cors_policy(opts.cors, matcher))
    if opts.rate_limit is not None:
        out[RATE_LIMIT_FILTER] = _enable(rate_limit_config(opts.rate_limit))
    return out


def preflight_route(name: str, matcher: Matcher, policy: CorsPolicy) -> route_components_pb2.Route:
    """The companion placed before a CORS route: it takes that route's preflights whatever methods the route
    accepts, and the CORS filter answers all of them (those from other origins without CORS headers).

    It must forward somewhere (Envoy's CORS filter ignores direct_response routes), but never does: it matches only
    what the filter calls a preflight (OPTIONS, a non-empty Origin and Access-Control-Request-Method)."""
    match = route_match(dataclasses.replace(matcher, methods=()))
    non_empty = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"))
    match.headers.extend(
        [
            route_components_pb2.HeaderMatcher(
                name=":method", string_match=string_pb2.StringMatcher(exact="OPTIONS")
            ),
            route_components_pb2.HeaderMatcher(name="origin", string_match=non_empty),
            route_components_pb2.HeaderMatcher(name="access-control-request-method", string_match=non_empty),
        ]
    )
    return route_components_pb2.Route(
        name=name + PREFLIGHT_SUFFIX,
        match=match,
        route=route_components_pb2.RouteAction(cluster=NOWHERE_CLUSTER),
        typed_per_filter_config={CORS_FILTER: _enable(cors_policy(policy, matcher))},
    )


def _set_header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def mock_route(
    name: str, matcher: Matcher, mock: MockResponse, extra_headers: tuple[tuple[str, str], ...] = ()
) -> route_components_pb2.Route:
    """API Gateway's mock integration: Envoy answers by itself, no ext_proc, no function."""
    action = route_components_pb2.DirectResponseAction(status=mock.status)
    if mock.body:
        action.body.CopyFrom(base_pb2.DataSource(inline_string=mock.body))
    return route_components_pb2.Route(
        name=name,
        match=route_match(matcher),
        direct_response=action,
        # The mock's own headers come last, so they win over the CORS headers added for it. Envoy reads these
        # values as format strings: the mock's are literal text, so their '%' is escaped (a bare one would make
        # Envoy reject the whole route configuration, and %REQ(...)% would echo request headers).
        response_headers_to_add=[_set_header(k, v) for k, v in extra_headers]
        + [_set_header(k, v.replace("%", "%%")) for k, v in mock.headers],
    )


def _mock_cors_headers(policy: CorsPolicy, origin: str) -> tuple[tuple[str, str], ...]:
    """The headers Envoy's CORS filter adds to an answer for an allowed origin."""
    out = [("access-control-allow-origin", origin)]
    if policy.allow_credentials:
        out.append(("access-control-allow-credentials", "true"))
    if policy.expose_headers:
        out.append(("access-control-expose-headers", ",".join(policy.expose_headers)))
    return tuple(out)


def mock_routes(
    name: str, matcher: Matcher, mock: MockResponse, policy: CorsPolicy | None
) -> list[route_components_pb2.Route]:
    """A mock and, with CORS, what stands in for the CORS filter, which ignores direct_response routes: the
    preflight companion (a forwarding route the filter does answer), and the CORS headers on the mock itself.

    "*" echoes the request's Origin (a header whose value is empty is not sent); a single origin is named as is
    (a browser on another origin then refuses the answer, as it would without the header); with several origins,
    one copy of the mock per origin carries the headers, and the last copy, without them, answers the rest."""
    if policy is None:
        return [mock_route(name, matcher, mock)]
    out = [preflight_route(name, matcher, policy)]
    origins = policy.allow_origins
    if "*" in origins:
        out.append(mock_route(name, matcher, mock, _mock_cors_headers(policy, "%REQ(origin)%")))
    elif len(origins) == 1:
        out.append(mock_route(name, matcher, mock, _mock_cors_headers(policy, origins[0])))
    else:
        for k, origin in enumerate(origins):
            variant = mock_route(
                f"{name}/origin{k}", matcher, mock, _mock_cors_headers(policy, "%REQ(origin)%")
            )
            variant.match.headers.append(
                route_components_pb2.HeaderMatcher(
                    name="origin", string_match=string_pb2.StringMatcher(exact=origin, ignore_case=True)
                )
            )
            out.append(variant)
        out.append(mock_route(name, matcher, mock))
    return out


def _json_reply(message: str, flag: str | None = None, status: int | None = None) -> hcm_pb2.ResponseMapper:
    body = struct_pb2.Struct()
    body.update({"message": message, "requestId": "%REQ(X-REQUEST-ID)%"})
    if flag is not None:
        selector = accesslog_pb2.AccessLogFilter(
            response_flag_filter=accesslog_pb2.ResponseFlagFilter(flags=[flag])
        )
    else:
        selector = accesslog_pb2.AccessLogFilter(
            status_code_filter=accesslog_pb2.StatusCodeFilter(
                comparison=accesslog_pb2.ComparisonFilter(
                    op=accesslog_pb2.ComparisonFilter.EQ,
                    value=base_pb2.RuntimeUInt32(
                        default_value=status or 0, runtime_key=f"lambdagate.json_reply.status_{status}"
                    ),
                )
            )
        )
    return hcm_pb2.ResponseMapper(
        filter=selector,
        body_format_override=substitution_format_string_pb2.SubstitutionFormatString(json_format=body),
    )


def local_reply_config() -> hcm_pb2.LocalReplyConfig:
    """Envoy's own answers get the JSON error body every other lambdagate error has: no route matched (flag NR),
    and a 429, which only the local rate limit makes (API Gateway's `{"message":"Too Many Requests"}`). The rate
    limit sets its flag RL only after sending its reply, too late for a mapper, hence the status."""
    return hcm_pb2.LocalReplyConfig(
        mappers=[_json_reply("Not Found", flag="NR"), _json_reply("Too Many Requests", status=429)]
    )


def listener(options: TranslateOptions, jwt: auth.JwtSetup | None = None) -> listener_pb2.Listener:
    reply = local_reply_config()
    if jwt is not None:
        reply = hcm_pb2.LocalReplyConfig(mappers=[*auth.reply_mappers(), *reply.mappers])
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix="lambdagate",
        # The client's address is the peer's: it becomes identity.sourceIp and is appended to X-Forwarded-For,
        # as API Gateway does. Behind another proxy, raise xff_num_trusted_hops.
        use_remote_address=wrappers_pb2.BoolValue(value=True),
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(
            route_config_name=ROUTE_CONFIG_NAME,
            config_source=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        # CORS and the rate limit come first: a preflight or a limited request ends in Envoy. Always listed (off
        # unless a route turns them on), so giving one route CORS or a limit changes RDS only, never the Listener.
        http_filters=[
            cors_filter(),
            rate_limit_filter(),
            # Listed only while some VirtualService has a JWT authorizer: its providers live in this config.
            *(auth.http_filters(jwt) if jwt is not None else ()),
            extproc_filter(options, jwt_claims=jwt is not None),
            hcm_pb2.HttpFilter(
                name="envoy.filters.http.router",
                typed_config=_any(router_pb2.Router(suppress_envoy_headers=True)),
            ),
        ],
        # Lambda invocations can be slow; the route timeout, not the stream idle timeout, is what bounds them.
        stream_idle_timeout=_duration(300),
        request_timeout=_duration(0),
        local_reply_config=reply,
        normalize_path=wrappers_pb2.BoolValue(value=True),
        merge_slashes=True,
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.UNESCAPE_AND_REDIRECT,
    )
    return listener_pb2.Listener(
        name=LISTENER_NAME,
        address=_socket_address(options.listen_address, options.listen_port),
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=BUFFER_LIMIT_BYTES),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_any(hcm)
                    )
                ]
            )
        ],
    )


def route_match(m: Matcher) -> route_components_pb2.RouteMatch:
    match = route_components_pb2.RouteMatch()
    if m.kind == "prefix":
        match.prefix = m.value
    elif m.kind == "regex":
        match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=m.value))
    elif m.template_regex is not None:
        match.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=m.template_regex))
    else:
        match.path = m.value
    if m.methods:
        methods = list(m.methods)
        if "GET" in methods and "HEAD" not in methods:
            # HEAD is GET without a body; routing it like GET is what API Gateway and every HTTP server do.
            methods.append("HEAD")
        regex = "^(" + "|".join(methods) + ")$"
        match.headers.append(
            route_components_pb2.HeaderMatcher(
                name=":method",
                string_match=string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex)),
            )
        )
    return match


def route_key(m: Matcher) -> str:
    """API Gateway's routeKey for payload 2.0: the method (ANY when the route takes all) and the template."""
    methods = "|".join(m.methods) if m.methods else "ANY"
    return f"{methods} {m.resource}"


def _invocable(up: Upstream, choice: FunctionChoice) -> Invocable | None:
    if choice.function_name is not None:
        name, qualifier = split_function_name(choice.function_name)
        return Invocable(choice.function_name, name, qualifier, invoke_path(name, qualifier), choice.weight)
    fn = up.function(choice.function)
    if fn is None:
        return None
    return Invocable(
        fn.name, fn.function_name, fn.qualifier, invoke_path(fn.function_name, fn.qualifier), choice.weight
    )


def retry_policy(retries: int) -> route_components_pb2.RetryPolicy:
    """Lambda's throttling (429) and the Invoke API's own 5xx, with backoff; Retry-After, when sent, wins."""
    return route_components_pb2.RetryPolicy(
        retry_on="5xx,reset-before-request,connect-failure,retriable-status-codes",
        retriable_status_codes=[429],
        num_retries=wrappers_pb2.UInt32Value(value=retries),
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_duration(0.1), max_interval=_duration(2)
        ),
        rate_limited_retry_back_off=route_components_pb2.RetryPolicy.RateLimitedRetryBackOff(
            reset_headers=[
                route_components_pb2.RetryPolicy.ResetHeader(
                    name="retry-after", format=route_components_pb2.RetryPolicy.SECONDS
                )
            ],
            max_interval=_duration(10),
        ),
    )


def _mock_routes(
    vs: VirtualService, index: int, matcher: Matcher, mock: MockResponse, own: RouteOptions
) -> list[route_components_pb2.Route]:
    """A mock route's Envoy routes. It has no Upstream: only its own options apply."""
    gateway = RouteOptions(rate_limit=own.rate_limit, cors=own.cors)
    key = ("mock", matcher, mock) + ((gateway,) if gateway != RouteOptions() else ())
    name = route_name(vs.namespace, vs.name, index, repr(key))
    routes = mock_routes(name, matcher, mock, own.cors)
    if own.rate_limit is not None:
        limit = _enable(rate_limit_config(own.rate_limit))
        for route in routes:
            if not route.name.endswith(PREFLIGHT_SUFFIX):
                route.typed_per_filter_config[RATE_LIMIT_FILTER].CopyFrom(limit)
    return routes


def translate(config: Config, options: TranslateOptions) -> Translation:
    """Translate a Config from scratch (a Translator that remembers nothing)."""
    return Translator().translate(config, options)


@dataclass
class _Service:
    """One VirtualService translated, with everything its translation read, to tell when it must be done again."""

    vs: VirtualService
    options: TranslateOptions
    local_endpoint: Endpoint | None
    # The Secret holding the service's API keys, if it has any.
    api_key_secret: Secret | None
    # Each Upstream its routes name, in the order first named: (namespace, name, the Upstream, its Secret).
    deps: tuple[tuple[str, str, Upstream | None, Secret | None], ...]
    # Its virtual host, deterministically encoded (the message itself is not kept: the route configuration
    # parsed from these bytes holds it).
    vhost_bytes: bytes
    table: dict[str, RouteTarget]
    # The Lambda clusters its routes use: name -> (endpoint, re-signing).
    clusters: dict[str, tuple[Endpoint, bool]]


class Translator:
    """`translate` that remembers its work: a VirtualService whose inputs (the object itself, the Upstreams and
    Secrets its routes name, the options) are the same objects, or equal ones, as in the previous call is not
    translated again, and its serialized virtual host is reused. The result is exactly what `translate` gives.

    The protos it returns are shared with later results: treat them as immutable."""

    def __init__(self) -> None:
        self._services: dict[ObjectKey, _Service] = {}
        self._clusters: dict[tuple[str, Endpoint, bool, TranslateOptions], cluster_pb2.Cluster] = {}
        self._static: tuple[TranslateOptions, cluster_pb2.Cluster] | None = None
        self._listener: tuple[TranslateOptions, auth.JwtSetup | None, listener_pb2.Listener] | None = None
        # function_param routes share one name table per Upstream object.
        self._params: dict[tuple[str, str], tuple[Upstream, dict[str, Invocable]]] = {}
        self.translated = 0  # VirtualServices translated (not reused) by the last call, for tests and logs

    def translate(self, config: Config, options: TranslateOptions) -> Translation:
        if self._static is None or self._static[0] != options:
            self._static = (options, extproc_cluster(options))
        _, extproc = self._static
        jwt = auth.jwt_setup(config)
        if self._listener is None or self._listener[:2] != (options, jwt):
            self._listener = (options, jwt, listener(options, jwt))
        http_listener = self._listener[2]
        clusters: dict[str, cluster_pb2.Cluster] = {EXTPROC_CLUSTER: extproc}
        for ep in jwt.jwks_endpoints if jwt is not None else ():
            # Envoy fetches remote JWKS through a cluster of its own (TLS verified like Lambda's).
            jwks = lambda_cluster(ep, options)
            jwks.name = jwks.load_assignment.cluster_name = auth.jwks_cluster_name(ep)
            clusters[jwks.name] = jwks
        cluster_cache: dict[tuple[str, Endpoint, bool, TranslateOptions], cluster_pb2.Cluster] = {}
        services: dict[ObjectKey, _Service] = {}
        table: dict[str, RouteTarget] = {}
        vhost_bytes: list[bytes] = []
        same: dict[tuple[int, int], bool] = {}
        self.translated = 0
        for vs in config.virtual_services:
            svc = self._services.get(vs.key)
            if svc is None or not self._unchanged(svc, vs, config, options, same):
                svc = self._translate_service(vs, config, options)
                self.translated += 1
            services[vs.key] = svc
            vhost_bytes.append(svc.vhost_bytes)
            table.update(svc.table)
            for cname, (ep, resign) in svc.clusters.items():
                if cname in clusters:
                    continue
                ckey = (cname, ep, resign, options)
                cluster = self._clusters.get(ckey)
                if cluster is None:
                    cluster = lambda_cluster(ep, options, resign=resign)
                cluster_cache[ckey] = clusters[cname] = cluster
        self._services, self._clusters = services, cluster_cache
        self._params = {k: v for k, v in self._params.items() if config.upstream(*k) is v[0]}
        # The route configuration is assembled from the virtual hosts' serialized bytes (a repeated field is its
        # elements' encodings one after another), then parsed: cheaper than copying ten thousand routes.
        data = route_config_bytes(vhost_bytes)
        return Translation(
            clusters=tuple(clusters[k] for k in sorted(clusters)),
            listeners=(http_listener,),
            routes=(route_pb2.RouteConfiguration.FromString(data),),
            route_table=table,
            serialized={ROUTE_TYPE: {ROUTE_CONFIG_NAME: data}},
        )

    @staticmethod
    def _unchanged(
        svc: _Service,
        vs: VirtualService,
        config: Config,
        options: TranslateOptions,
        same: dict[tuple[int, int], bool],
    ) -> bool:
        def equal(a: object, b: object) -> bool:
            if a is b:
                return True
            if a is None or b is None:
                return False
            key = (id(a), id(b))
            if key not in same:
                same[key] = a == b
            return same[key]

        if (
            not (svc.options is options or svc.options == options)
            or svc.local_endpoint != config.local_endpoint
        ):
            return False
        if not equal(svc.vs, vs):
            return False
        if not equal(svc.api_key_secret, _api_key_secret(vs, config)):
            return False
        for namespace, name, up, secret in svc.deps:
            now = config.upstream(namespace, name)
            if not equal(up, now):
                return False
            now_secret = (
                config.secret(now.namespace, now.secret_ref) if now is not None and now.secret_ref else None
            )
            if not equal(secret, now_secret):
                return False
        return True

    @staticmethod
    def _authorizer(
        vs: VirtualService,
        who: RouteAuth,
        config: Config,
        deps: dict[tuple[str, str], tuple[str, str, Upstream | None, Secret | None]],
    ) -> AuthorizerTarget | None:
        """A route's Lambda authorizer, ready to invoke through its own Upstream (region, endpoint, keys)."""
        name = who.effective_authorizer
        found = vs.authorizer(name) if name is not None else None
        if found is None or found.function is None:
            return None
        dest = found.function.destination
        up = config.upstream(dest.upstream_namespace, dest.upstream)
        secret = config.secret(up.namespace, up.secret_ref) if up is not None and up.secret_ref else None
        deps.setdefault(
            (dest.upstream_namespace, dest.upstream), (dest.upstream_namespace, dest.upstream, up, secret)
        )
        if up is None:
            return None
        invocable = _invocable(up, dest.choices()[0])
        if invocable is None:
            return None
        ep = upstream_endpoint(up, config)
        return AuthorizerTarget(
            name=auth.provider_name(vs, found),
            invocable=invocable,
            scheme=ep.scheme,
            authority=ep.authority,
            region=up.region,
            credentials=secret.credentials if secret else None,
            role_arn=up.role_arn,
            identity_sources=found.function.identity_sources,
            ttl_s=found.function.ttl_s,
        )

    def _param_functions(self, up: Upstream) -> dict[str, Invocable]:
        key = (up.namespace, up.name)
        kept = self._params.get(key)
        if kept is not None and kept[0] is up:
            return kept[1]
        names = {
            name: inv
            for name in up.function_names()
            if (inv := _invocable(up, FunctionChoice(name))) is not None
        }
        self._params[key] = (up, names)
        return names

    def _translate_service(self, vs: VirtualService, config: Config, options: TranslateOptions) -> _Service:
        routes: list[route_components_pb2.Route] = []
        table: dict[str, RouteTarget] = {}
        clusters: dict[str, tuple[Endpoint, bool]] = {}
        deps: dict[tuple[str, str], tuple[str, str, Upstream | None, Secret | None]] = {}
        for i, route in enumerate(vs.routes):
            dest = route.destination
            if dest is None:
                if route.mock is not None:
                    mocked = _mock_routes(vs, i, route.matcher, route.mock, route.options)
                    checks = auth.route_filters(vs, route.auth.over(vs.auth))
                    for r in mocked:
                        if checks and not r.name.endswith(PREFLIGHT_SUFFIX):
                            for fname, cfg in checks.items():
                                r.typed_per_filter_config[fname].CopyFrom(cfg)
                    routes.extend(mocked)
                continue
            up = config.upstream(dest.upstream_namespace, dest.upstream)
            secret = config.secret(up.namespace, up.secret_ref) if up is not None and up.secret_ref else None
            deps.setdefault(
                (dest.upstream_namespace, dest.upstream), (dest.upstream_namespace, dest.upstream, up, secret)
            )
            if up is None:  # resolve() guarantees it; translate stays total anyway
                continue
            choices = [_invocable(up, c) for c in dest.choices()]
            if any(c is None for c in choices):
                continue
            invocables = [c for c in choices if c is not None]
            ep = upstream_endpoint(up, config)
            opts = _effective_options(route.options, up.options)
            retries = opts.max_retries or 0
            # Retried routes go through the cluster whose upstream ext_proc signs each attempt again.
            cname = cluster_name(ep) + (RESIGN_SUFFIX if retries else "")
            clusters.setdefault(cname, (ep, bool(retries)))
            param_functions = None
            if dest.function_param is not None:
                param_functions = self._param_functions(up)
            first = next((c for c in invocables if c.weight), None) or Invocable(
                f"{{{dest.function_param}}}", "", None, ""
            )
            parts: tuple[object, ...] = (
                route.matcher,
                first.invoke_path,
                ep,
                up.region,
                vs.stage,
                up.namespace,
                up.name,
                first.function,
            )
            plain = dest == Destination(dest.upstream, dest.upstream_namespace, dest.function)
            who = route.auth.over(vs.auth)
            checks = auth.route_filters(vs, who)
            authorizer = self._authorizer(vs, who, config, deps)
            keys = None
            if who.api_key_required and vs.api_keys is not None:
                api_key_secret = config.secret(vs.namespace, vs.api_keys.secret_ref)
                keys = auth.api_key_table(vs, api_key_secret)
            # Only what is set beyond the defaults joins the name's hash: names of plain routes stay as they were.
            extra = tuple(
                x
                for x in (
                    up.role_arn,
                    opts if opts != DEFAULT_OPTIONS else None,
                    vs.stage_variables,
                    None if plain else dest,
                    who if who != RouteAuth() else None,
                    route.integration,
                )
                if x
            )
            key = repr(parts + extra if extra else parts)
            name = route_name(vs.namespace, vs.name, i, key)
            table[name] = RouteTarget(
                route_name=name,
                virtual_service=f"{vs.namespace}/{vs.name}",
                upstream=f"{up.namespace}/{up.name}",
                function=first.function,
                function_name=first.function_name,
                qualifier=first.qualifier,
                invoke_path=first.invoke_path,
                scheme=ep.scheme,
                authority=ep.authority,
                region=up.region,
                credentials=secret.credentials if secret else None,
                matcher=route.matcher,
                resource=route.matcher.resource,
                stage=vs.stage,
                role_arn=up.role_arn,
                payload_format=opts.payload_format or "apigateway-v1",
                invocation_type=opts.invocation_type or "RequestResponse",
                stage_variables=vs.stage_variables,
                route_key=route_key(route.matcher),
                choices=tuple(invocables) if len(invocables) > 1 else (),
                function_param=dest.function_param,
                param_functions=param_functions,
                max_retries=retries,
                errors=opts.errors or (),
                log_tail=bool(opts.log_tail),
                integration=route.integration,
                jwt=JWT_FILTER in checks,
                authorizer=authorizer,
                api_keys=keys,
                method_arn_prefix=f"arn:aws:execute-api:{up.region}:{METHOD_ARN_ACCOUNT}:{vs.name}/{vs.stage}",
            )
            action = route_components_pb2.RouteAction(
                cluster=cname,
                timeout=_timeout(opts.timeout_s or options.route_timeout_s),
            )
            if retries:
                action.retry_policy.CopyFrom(retry_policy(retries))
            if opts.cors is not None:
                routes.append(preflight_route(name, route.matcher, opts.cors))
            routes.append(
                route_components_pb2.Route(
                    name=name,
                    match=route_match(route.matcher),
                    route=action,
                    typed_per_filter_config={
                        **_gateway_filters(opts, route.matcher),
                        **checks,
                        **_EXTPROC_ENABLED,
                    },
                )
            )
        vhost = route_components_pb2.VirtualHost(
            name=f"{vs.namespace}/{vs.name}", domains=list(vs.domains), routes=routes
        )
        return _Service(
            vs=vs,
            options=options,
            local_endpoint=config.local_endpoint,
            api_key_secret=_api_key_secret(vs, config),
            deps=tuple(deps.values()),
            vhost_bytes=vhost.SerializeToString(deterministic=True),
            table=table,
            clusters=clusters,
        )


def _api_key_secret(vs: VirtualService, config: Config) -> Secret | None:
    return config.secret(vs.namespace, vs.api_keys.secret_ref) if vs.api_keys is not None else None


def _route_config_shell() -> tuple[bytes, bytes]:
    """The route configuration's encoding before and after its virtual hosts (field 2): the name (field 1), and
    the fields numbered above 2, which a deterministic encoding writes after them."""
    head = route_pb2.RouteConfiguration(name=ROUTE_CONFIG_NAME).SerializeToString(deterministic=True)
    tail = route_pb2.RouteConfiguration(
        # Envoy refuses a route configuration with a direct response over 4 KiB by default; mocks may hold 64.
        max_direct_response_body_size_bytes=wrappers_pb2.UInt32Value(value=MAX_MOCK_BODY),
    ).SerializeToString(deterministic=True)
    return head, tail


_ROUTE_CONFIG_HEAD, _ROUTE_CONFIG_TAIL = _route_config_shell()
_VIRTUAL_HOSTS_TAG = b"\x12"  # field 2, length-delimited


def route_config_bytes(vhosts: list[bytes]) -> bytes:
    """The deterministic encoding of the route configuration holding these (deterministically encoded) hosts."""
    parts = [_ROUTE_CONFIG_HEAD]
    for data in vhosts:
        parts += (_VIRTUAL_HOSTS_TAG, _varint(len(data)), data)
    parts.append(_ROUTE_CONFIG_TAIL)
    return b"".join(parts)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
