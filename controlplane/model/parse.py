"""Turns one plain document (a dict from YAML or the Kubernetes API) into a model object.

Every rejection is a ConfigError naming the object and the dotted field path, and saying what would be valid.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any
from urllib.parse import urlsplit

from controlplane.model.errors import ConfigError
from controlplane.model.resources import (
    API_GROUP,
    DEFAULT_NAMESPACE,
    DNS_LABEL_RE,
    ERROR_KINDS,
    FUNCTION_NAME_RE,
    HTTP_METHODS,
    IDENTITY_KINDS,
    INVOCATION_TYPES,
    KIND_SECRET,
    KIND_UPSTREAM,
    KIND_VIRTUAL_SERVICE,
    LOCAL_ENDPOINT,
    MAX_MOCK_BODY,
    MAX_RETRIES,
    MAX_TIMEOUT_S,
    NO_AUTHORIZER,
    PAYLOAD_FORMATS,
    QUALIFIER_RE,
    REGION_RE,
    RESERVED_MOCK_STATUSES,
    ApiKeys,
    Authorizer,
    AwsCredentials,
    CorsPolicy,
    Destination,
    DiscoverySettings,
    Endpoint,
    Function,
    FunctionChoice,
    Integration,
    IntegrationResponse,
    Jwks,
    JwtAuthorizer,
    KeepWarm,
    LambdaAuthorizer,
    Matcher,
    MockResponse,
    ObjectKey,
    RateLimit,
    Route,
    RouteAuth,
    RouteOptions,
    Secret,
    Upstream,
    VirtualService,
    split_function_name,
    template_to_regex,
)
from controlplane.model.templates import check_template

Resource = Secret | Upstream | VirtualService

SECRET_KEYS = ("access_key", "secret_key", "session_token")
# Kubernetes namespaces are RFC 1123 labels.
NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LOGICAL_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._:-]{0,126}[A-Za-z0-9])?$")


def object_key(doc: Any) -> ObjectKey | None:
    """The kind/namespace/name of a document, when it has them, so errors can name the object."""
    if not isinstance(doc, dict):
        return None
    kind = doc.get("kind")
    meta = doc.get("metadata")
    if not isinstance(kind, str) or not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return None
    ns = meta.get("namespace")
    return ObjectKey(kind, ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE, meta["name"])


def parse_document(doc: Any, *, default_namespace: str = DEFAULT_NAMESPACE) -> Resource | None:
    """Parse one document into a model object; anything else (an unknown kind included) is a ConfigError."""
    if not isinstance(doc, dict):
        raise ConfigError(f"a document must be a mapping, got {_typename(doc)}")
    kind = doc.get("kind")
    if kind is None:
        raise ConfigError("missing; expected Secret, Upstream or VirtualService", field="kind")
    if not isinstance(kind, str):
        raise ConfigError(f"must be a string, got {_typename(kind)}", field="kind")
    api_version = doc.get("apiVersion")
    meta = _mapping(doc.get("metadata"), "metadata", required=True)
    name = _str(meta.get("name"), "metadata.name", required=True)
    if not DNS_LABEL_RE.fullmatch(name) or len(name) > 253:
        raise ConfigError(
            f"{name!r} is not a valid name: lowercase letters, digits, '-' and '.'", field="metadata.name"
        )
    namespace = _str(meta.get("namespace"), "metadata.namespace") or default_namespace
    if not NAMESPACE_RE.fullmatch(namespace):
        raise ConfigError(
            f"{namespace!r} is not a valid namespace: lowercase letters, digits and '-', at most 63",
            field="metadata.namespace",
        )
    generation = meta.get("generation", 0)
    generation = generation if isinstance(generation, int) else 0
    obj = f"{kind} {namespace}/{name}"
    try:
        if kind == KIND_SECRET:
            if api_version not in (None, "v1"):
                raise ConfigError(f"must be v1 for a Secret, got {api_version!r}", field="apiVersion")
            return _parse_secret(doc, name, namespace)
        if kind in (KIND_UPSTREAM, KIND_VIRTUAL_SERVICE):
            _check_api_version(api_version)
            spec = _mapping(doc.get("spec"), "spec", required=True)
            if kind == KIND_UPSTREAM:
                return _parse_upstream(spec, name, namespace, generation)
            return _parse_virtual_service(spec, name, namespace, generation)
    except ConfigError as err:
        raise err.with_context(obj=obj) from None
    raise ConfigError(
        f"unknown kind {kind!r}; lambdagate reads Secret, Upstream and VirtualService", obj=obj, field="kind"
    )


def _check_api_version(api_version: Any) -> None:
    if not isinstance(api_version, str) or not api_version.startswith(API_GROUP + "/"):
        raise ConfigError(f"must be {API_GROUP}/v1, got {api_version!r}", field="apiVersion")
    if api_version != f"{API_GROUP}/v1":
        raise ConfigError(f"unsupported version {api_version!r}; expected {API_GROUP}/v1", field="apiVersion")


def _parse_secret(doc: dict[str, Any], name: str, namespace: str) -> Secret:
    values: dict[str, str] = {}
    data = _mapping(doc.get("data"), "data")
    for key, raw in data.items():
        if not isinstance(raw, str):
            raise ConfigError("must be a base64 string", field=f"data.{key}")
        try:
            values[str(key)] = base64.b64decode(raw, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ConfigError("is not valid base64 of UTF-8 text", field=f"data.{key}") from None
    string_data = _mapping(doc.get("stringData"), "stringData")
    for key, raw in string_data.items():
        if not isinstance(raw, str):
            raise ConfigError(f"must be a string, got {_typename(raw)}", field=f"stringData.{key}")
        values[str(key)] = raw
    values = {k: v.strip() for k, v in values.items()}
    creds = None
    if values.get("access_key") and values.get("secret_key"):
        creds = AwsCredentials(
            values["access_key"], values["secret_key"], values.get("session_token") or None
        )
    # A Secret without AWS keys is legal (it may be someone else's); Upstreams that reference it are rejected.
    return Secret(name, namespace, creds, tuple(sorted(values)), tuple(sorted(values.items())))


UPSTREAM_FIELDS = (
    "type",
    "region",
    "secret_ref",
    "role_arn",
    "endpoint",
    "functions",
    "discovery",
    "options",
)
OPTION_FIELDS = (
    "payload_format",
    "invocation_type",
    "timeout",
    "max_retries",
    "errors",
    "log_tail",
    "rate_limit",
    "cors",
)
DAY_S = 86400.0
# An origin as browsers send it: scheme://host[:port], no path.
ORIGIN_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
# An HTTP header name (RFC 9110 token).
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
STAGE_VARIABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# API Gateway's rule for stage variable values.
STAGE_VARIABLE_VALUE_RE = re.compile(r"^[A-Za-z0-9\-._~:/?#&=,]{0,512}$")
_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)?$")
DISCOVERY_FIELDS = ("enabled", "name_prefix", "tags")
# IAM's own pattern for a role ARN (any partition).
ROLE_ARN_RE = re.compile(r"^arn:aws[a-zA-Z-]*:iam::[0-9]{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$")
NAME_PREFIX_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,140}$")
# AWS's tag key and value rules: up to 128 / 256 characters.
TAG_KEY_MAX, TAG_VALUE_MAX = 128, 256


def _parse_upstream(spec: dict[str, Any], name: str, namespace: str, generation: int) -> Upstream:
    _no_unknown(spec, UPSTREAM_FIELDS, "spec")
    utype = _str(spec.get("type"), "spec.type") or "aws"
    if utype != "aws":
        raise ConfigError(f"unsupported upstream type {utype!r}; only 'aws' is supported", field="spec.type")
    region = _str(spec.get("region"), "spec.region", required=True)
    if not REGION_RE.fullmatch(region):
        raise ConfigError(f"{region!r} is not an AWS region such as us-east-1", field="spec.region")
    secret_ref = _str(spec.get("secret_ref"), "spec.secret_ref") or None
    endpoint = _parse_endpoint(spec.get("endpoint"))
    raw_functions = spec.get("functions") or []
    if not isinstance(raw_functions, list):
        raise ConfigError(f"must be a list, got {_typename(raw_functions)}", field="spec.functions")
    functions: list[Function] = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_functions):
        fn = _parse_function(raw, f"spec.functions[{i}]")
        if fn.name in seen:
            raise ConfigError(f"duplicate function name {fn.name!r}", field=f"spec.functions[{i}].name")
        seen.add(fn.name)
        functions.append(fn)
    role_arn = _str(spec.get("role_arn"), "spec.role_arn") or None
    if role_arn is not None and not ROLE_ARN_RE.fullmatch(role_arn):
        raise ConfigError(
            f"{role_arn!r} is not an IAM role ARN such as arn:aws:iam::123456789012:role/lambdagate",
            field="spec.role_arn",
        )
    return Upstream(
        name,
        namespace,
        region,
        secret_ref,
        endpoint,
        tuple(functions),
        generation,
        role_arn=role_arn,
        discovery=_parse_discovery(spec.get("discovery")),
        options=_parse_options(spec.get("options"), "spec.options"),
    )


def _parse_options(raw: Any, path: str) -> RouteOptions:
    opts = _mapping(raw, path)
    _no_unknown(opts, OPTION_FIELDS, path)
    fmt = _str(opts.get("payload_format"), f"{path}.payload_format") or None
    if fmt is not None and fmt not in PAYLOAD_FORMATS:
        raise ConfigError(
            f"{fmt!r} is not one of {', '.join(PAYLOAD_FORMATS)}", field=f"{path}.payload_format"
        )
    itype = _str(opts.get("invocation_type"), f"{path}.invocation_type") or None
    if itype is not None and itype not in INVOCATION_TYPES:
        raise ConfigError(
            f"{itype!r} is not one of {', '.join(INVOCATION_TYPES)}", field=f"{path}.invocation_type"
        )
    timeout = None
    if "timeout" in opts:
        timeout = _duration(opts["timeout"], f"{path}.timeout")
    retries = None
    if "max_retries" in opts:
        retries = _int(opts["max_retries"], f"{path}.max_retries", 0, MAX_RETRIES)
    errors = None
    if "errors" in opts:
        errors = _parse_errors(opts["errors"], f"{path}.errors")
    log_tail = None
    if "log_tail" in opts:
        log_tail = _bool(opts["log_tail"], f"{path}.log_tail")
    rate_limit = None
    if "rate_limit" in opts:
        rate_limit = _parse_rate_limit(opts["rate_limit"], f"{path}.rate_limit")
    cors = None
    if "cors" in opts:
        cors = _parse_cors(opts["cors"], f"{path}.cors")
    return RouteOptions(fmt, itype, timeout, retries, errors, log_tail, rate_limit, cors)


def _parse_errors(raw: Any, path: str) -> tuple[tuple[str, int], ...]:
    mapping = _mapping(raw, path, required=True)
    out = []
    for kind, status in mapping.items():
        if kind not in ERROR_KINDS:
            raise ConfigError(
                f"unknown error kind; expected one of {', '.join(ERROR_KINDS)}", field=f"{path}.{kind}"
            )
        out.append((kind, _int(status, f"{path}.{kind}", 400, 599)))
    return tuple(sorted(out))


def _parse_rate_limit(raw: Any, path: str) -> RateLimit:
    spec = _mapping(raw, path, required=True)
    _no_unknown(spec, ("requests", "per", "burst"), path)
    if "requests" not in spec:
        raise ConfigError("missing; the number of requests allowed per period", field=f"{path}.requests")
    requests = _int(spec["requests"], f"{path}.requests", 1, 1_000_000)
    per = _duration(spec["per"], f"{path}.per", max_s=DAY_S) if "per" in spec else 1.0
    if per < 0.05:
        raise ConfigError(
            "must be at least 50ms (Envoy's token bucket refills no faster)", field=f"{path}.per"
        )
    burst = requests
    if "burst" in spec:
        burst = _int(spec["burst"], f"{path}.burst", requests, 10_000_000)
    return RateLimit(requests, per, burst)


def _parse_cors(raw: Any, path: str) -> CorsPolicy:
    spec = _mapping(raw, path, required=True)
    _no_unknown(
        spec,
        ("allow_origins", "allow_methods", "allow_headers", "expose_headers", "max_age", "allow_credentials"),
        path,
    )
    origins = _str_list(spec.get("allow_origins"), f"{path}.allow_origins", required=True)
    for i, origin in enumerate(origins):
        if origin != "*" and not ORIGIN_RE.fullmatch(origin):
            raise ConfigError(
                f"{origin!r} is not an origin such as https://app.example.com (or '*')",
                field=f"{path}.allow_origins[{i}]",
            )
    methods = tuple(m.upper() for m in _str_list(spec.get("allow_methods"), f"{path}.allow_methods"))
    for i, method in enumerate(methods):
        if method != "*" and method not in HTTP_METHODS:
            raise ConfigError(f"{method!r} is not an HTTP method", field=f"{path}.allow_methods[{i}]")
    headers = {}
    for key in ("allow_headers", "expose_headers"):
        names = _str_list(spec.get(key), f"{path}.{key}")
        for i, name in enumerate(names):
            if name != "*" and not HEADER_NAME_RE.fullmatch(name):
                raise ConfigError(f"{name!r} is not a header name", field=f"{path}.{key}[{i}]")
        headers[key] = tuple(names)
    max_age = None
    if "max_age" in spec:
        max_age = int(_duration(spec["max_age"], f"{path}.max_age", max_s=DAY_S))
    credentials = _bool(spec.get("allow_credentials", False), f"{path}.allow_credentials")
    if credentials and "*" in origins:
        raise ConfigError(
            "browsers refuse credentials with the '*' origin; list the origins",
            field=f"{path}.allow_credentials",
        )
    return CorsPolicy(
        tuple(origins), methods, headers["allow_headers"], headers["expose_headers"], max_age, credentials
    )


def _duration(raw: Any, path: str, *, max_s: float = MAX_TIMEOUT_S) -> float:
    """`29s`, `500ms`, `2m`, `1h` or a number of seconds; more than 0 and at most `max_s` (Lambda's 900 s)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"must be a duration such as 10s or 500ms, got {_typename(raw)}", field=path)
    if isinstance(raw, str):
        m = _DURATION_RE.fullmatch(raw.strip())
        if m is None:
            raise ConfigError(f"{raw!r} is not a duration such as 10s, 500ms or 2m", field=path)
        value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}[m.group(2)]
    else:
        value = float(raw)
    if not 0 < value <= max_s:
        limit = f"{max_s:g}s (Lambda's limit)" if max_s == MAX_TIMEOUT_S else f"{max_s:g}s"
        raise ConfigError(f"must be more than 0 and at most {limit}", field=path)
    return value


def _int(raw: Any, path: str, low: int, high: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(f"must be a whole number from {low} to {high}, got {_typename(raw)}", field=path)
    if not low <= raw <= high:
        raise ConfigError(f"must be from {low} to {high}, got {raw}", field=path)
    return raw


def _bool(raw: Any, path: str) -> bool:
    if not isinstance(raw, bool):
        raise ConfigError(f"must be true or false, got {_typename(raw)}", field=path)
    return raw


def _str_list(raw: Any, path: str, *, required: bool = False) -> list[str]:
    if raw is None and not required:
        return []
    if not isinstance(raw, list) or (required and not raw):
        raise ConfigError("must be a non-empty list of strings" if required else "must be a list", field=path)
    return [_str(v, f"{path}[{i}]", required=True) for i, v in enumerate(raw)]


def _parse_discovery(raw: Any) -> DiscoverySettings:
    spec = _mapping(raw, "spec.discovery")
    _no_unknown(spec, DISCOVERY_FIELDS, "spec.discovery")
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"must be true or false, got {_typename(enabled)}", field="spec.discovery.enabled")
    prefix = _str(spec.get("name_prefix"), "spec.discovery.name_prefix") or None
    if prefix is not None and not NAME_PREFIX_RE.fullmatch(prefix):
        raise ConfigError(
            f"{prefix!r} is not the start of a Lambda function name (letters, digits, '-', '_' and '.')",
            field="spec.discovery.name_prefix",
        )
    tags: list[tuple[str, str]] = []
    for key, value in _mapping(spec.get("tags"), "spec.discovery.tags").items():
        field = f"spec.discovery.tags.{key}"
        if not isinstance(key, str) or not 0 < len(key) <= TAG_KEY_MAX:
            raise ConfigError(f"a tag key must be 1 to {TAG_KEY_MAX} characters", field=field)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"must be a string, got {_typename(value)}", field=field)
        if len(str(value)) > TAG_VALUE_MAX:
            raise ConfigError(f"a tag value must be at most {TAG_VALUE_MAX} characters", field=field)
        tags.append((key, str(value)))
    return DiscoverySettings(enabled, prefix, tuple(sorted(tags)))


def _parse_endpoint(raw: Any) -> Endpoint | str | None:
    value = _str(raw, "spec.endpoint")
    if not value:
        return None
    if value == LOCAL_ENDPOINT:
        return LOCAL_ENDPOINT
    if "@" in value.split("?", 1)[0].split("#", 1)[0]:
        # Never echo such a URL: its user-info may be a credential.
        raise ConfigError(
            "must not carry credentials (user:password@); use secret_ref", field="spec.endpoint"
        )
    bad = ConfigError(
        f"{value!r} is not a URL such as https://lambda.us-east-1.amazonaws.com or http://127.0.0.1:9001",
        field="spec.endpoint",
    )
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise bad from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(
            f"{value!r} must be scheme://host[:port] with no path, query or credentials",
            field="spec.endpoint",
        )
    return Endpoint(parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80))


def _parse_function(raw: Any, path: str) -> Function:
    fn = _mapping(raw, path, required=True)
    _no_unknown(fn, ("name", "spec", "keep_warm"), path)
    name = _str(fn.get("name"), f"{path}.name", required=True)
    if not LOGICAL_NAME_RE.fullmatch(name):
        raise ConfigError(f"{name!r} is not a valid function name", field=f"{path}.name")
    spec = _mapping(fn.get("spec"), f"{path}.spec", required=True)
    _no_unknown(spec, ("function_name", "qualifier"), f"{path}.spec")
    function_name = _check_function_name(
        _str(spec.get("function_name"), f"{path}.spec.function_name", required=True),
        f"{path}.spec.function_name",
    )
    qualifier = _str(spec.get("qualifier"), f"{path}.spec.qualifier") or None
    if qualifier is not None and not QUALIFIER_RE.fullmatch(qualifier):
        raise ConfigError(f"{qualifier!r} is not a version, alias or $LATEST", field=f"{path}.spec.qualifier")
    base, embedded = split_function_name(function_name)
    if embedded is not None:
        if qualifier is not None and qualifier != embedded:
            raise ConfigError(
                f"function_name carries qualifier {embedded!r} but qualifier is {qualifier!r}",
                field=f"{path}.spec.qualifier",
            )
        function_name, qualifier = base, embedded
    keep_warm = None
    if "keep_warm" in fn:
        warm = _mapping(fn["keep_warm"], f"{path}.keep_warm", required=True)
        _no_unknown(warm, ("interval", "concurrency"), f"{path}.keep_warm")
        if "interval" not in warm:
            raise ConfigError("missing; how often to warm, such as 5m", field=f"{path}.keep_warm.interval")
        interval = _duration(warm["interval"], f"{path}.keep_warm.interval", max_s=DAY_S)
        if interval < 1:
            raise ConfigError("must be at least 1s", field=f"{path}.keep_warm.interval")
        concurrency = _int(warm.get("concurrency", 1), f"{path}.keep_warm.concurrency", 1, 50)
        keep_warm = KeepWarm(interval, concurrency)
    return Function(name, function_name, qualifier, keep_warm)


def _check_function_name(value: str, path: str) -> str:
    if not FUNCTION_NAME_RE.fullmatch(value) or len(value) > 170:
        raise ConfigError(
            f"{value!r} is not a Lambda function name: use a name, name:qualifier, "
            "a full ARN or a partial ARN (123456789012:function:name)",
            field=path,
        )
    return value


VS_FIELDS = ("domains", "routes", "stage", "stage_variables", "authorizers", "auth", "api_keys")


def _parse_virtual_service(
    spec: dict[str, Any], name: str, namespace: str, generation: int
) -> VirtualService:
    _no_unknown(spec, VS_FIELDS, "spec")
    raw_domains = spec.get("domains", ["*"])
    if not isinstance(raw_domains, list) or not raw_domains:
        raise ConfigError("must be a non-empty list of host names, e.g. ['*']", field="spec.domains")
    domains: list[str] = []
    for i, d in enumerate(raw_domains):
        d = _str(d, f"spec.domains[{i}]", required=True).lower()
        if not re.fullmatch(r"(\*|\*[.-]?[a-z0-9.-]+|[a-z0-9.-]+\*?|[a-z0-9.-]+)(:[0-9]+|:\*)?", d):
            raise ConfigError(f"{d!r} is not a host name or wildcard", field=f"spec.domains[{i}]")
        if d in domains:
            raise ConfigError(f"duplicate domain {d!r}", field=f"spec.domains[{i}]")
        domains.append(d)
    stage = _str(spec.get("stage"), "spec.stage") or "$default"
    raw_routes = spec.get("routes")
    if not isinstance(raw_routes, list) or not raw_routes:
        raise ConfigError("must be a non-empty list of routes", field="spec.routes")
    routes = tuple(_parse_route(r, f"spec.routes[{i}]", namespace) for i, r in enumerate(raw_routes))
    variables: list[tuple[str, str]] = []
    for key, value in _mapping(spec.get("stage_variables"), "spec.stage_variables").items():
        field = f"spec.stage_variables.{key}"
        if not isinstance(key, str) or not STAGE_VARIABLE_NAME_RE.fullmatch(key):
            raise ConfigError("a stage variable name is letters, digits and '_' (at most 64)", field=field)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"must be a string, got {_typename(value)}", field=field)
        if not STAGE_VARIABLE_VALUE_RE.fullmatch(str(value)):
            raise ConfigError(
                "a stage variable value is at most 512 of letters, digits and -._~:/?#&=,", field=field
            )
        variables.append((key, str(value)))
    authorizers = _parse_authorizers(spec.get("authorizers"), "spec.authorizers", namespace)
    auth = _parse_auth(spec.get("auth"), "spec.auth")
    api_keys = _parse_api_keys(spec["api_keys"], "spec.api_keys") if "api_keys" in spec else None
    names = {a.name for a in authorizers}
    for where, a in [("spec.auth", auth)] + [
        (f"spec.routes[{i}].auth", r.auth) for i, r in enumerate(routes)
    ]:
        if a.authorizer is not None and a.authorizer != NO_AUTHORIZER and a.authorizer not in names:
            have = ", ".join(sorted(names)) or "none defined"
            raise ConfigError(
                f"{a.authorizer!r} is not in spec.authorizers ({have}); or use 'none'",
                field=f"{where}.authorizer",
            )
    default = next((a for a in authorizers if a.name == auth.effective_authorizer), None)
    if auth.scopes and (default is None or default.jwt is None):
        raise ConfigError("scopes need a JWT authorizer in spec.auth", field="spec.auth.scopes")
    for i, r in enumerate(routes):
        effective = r.auth.over(auth)
        rpath = f"spec.routes[{i}]"
        chosen = next((a for a in authorizers if a.name == effective.effective_authorizer), None)
        if r.auth.scopes and (chosen is None or chosen.jwt is None):
            # Only scopes the route sets itself: inherited ones simply do not apply to a non-JWT route.
            raise ConfigError("scopes need a JWT authorizer on the route", field=f"{rpath}.auth.scopes")
        if effective.api_key_required and api_keys is None:
            raise ConfigError("needs spec.api_keys (the Secret holding the keys)", field=f"{rpath}.auth")
        if r.mock is not None and (effective.api_key_required or (chosen is not None and chosen.jwt is None)):
            raise ConfigError(
                "a mock route is answered by Envoy: only a JWT authorizer applies to it",
                field=f"{rpath}.auth",
            )
    return VirtualService(
        name,
        namespace,
        tuple(domains),
        routes,
        stage,
        generation,
        stage_variables=tuple(sorted(variables)),
        authorizers=authorizers,
        auth=auth,
        api_keys=api_keys,
    )


AUTHORIZER_NAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_-]{0,62}[A-Za-z0-9])?$")
SCOPE_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]{1,256}$")  # RFC 6749's scope-token
MAX_TTL_S = 3600.0
QUERY_NAME_RE = re.compile(r"^[A-Za-z0-9._~-]{1,128}$")
# type/subtype and parameters, visible ASCII and spaces only: it becomes a header value.
CONTENT_TYPE_RE = re.compile(
    r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+( *;[\x20-\x7e]*)?$"
)  # API Gateway's limit on cached authorizer results


def _parse_authorizers(raw: Any, path: str, namespace: str) -> tuple[Authorizer, ...]:
    out = []
    for name, item in _mapping(raw, path).items():
        apath = f"{path}.{name}"
        if not isinstance(name, str) or not AUTHORIZER_NAME_RE.fullmatch(name) or name == NO_AUTHORIZER:
            raise ConfigError("an authorizer name is letters, digits, '-' and '_' (not 'none')", field=apath)
        spec = _mapping(item, apath, required=True)
        kind = _str(spec.get("type"), f"{apath}.type", required=True)
        if kind == "jwt":
            _no_unknown(spec, ("type", "issuer", "audiences", "jwks", "header", "query"), apath)
            out.append(Authorizer(name, jwt=_parse_jwt(spec, apath)))
        elif kind == "lambda":
            _no_unknown(
                spec, ("type", "upstream", "function", "function_name", "identity_sources", "ttl"), apath
            )
            out.append(Authorizer(name, function=_parse_lambda_authorizer(spec, apath, namespace)))
        else:
            raise ConfigError(f"{kind!r} is not jwt or lambda", field=f"{apath}.type")
    return tuple(out)


def _parse_jwt(spec: dict[str, Any], path: str) -> JwtAuthorizer:
    issuer = _str(spec.get("issuer"), f"{path}.issuer", required=True)
    audiences = tuple(_str_list(spec.get("audiences"), f"{path}.audiences"))
    jpath = f"{path}.jwks"
    raw = _mapping(spec.get("jwks"), jpath, required=True)
    _no_unknown(raw, ("inline", "file", "uri", "timeout", "cache_duration"), jpath)
    given = [k for k in ("inline", "file", "uri") if k in raw]
    if len(given) != 1:
        raise ConfigError("give exactly one of inline, file or uri", field=jpath)
    timeout = _duration(raw["timeout"], f"{jpath}.timeout", max_s=60) if "timeout" in raw else 5.0
    cache = (
        _duration(raw["cache_duration"], f"{jpath}.cache_duration", max_s=DAY_S)
        if "cache_duration" in raw
        else 300.0
    )
    jwks: Jwks
    if "inline" in raw:
        value = raw["inline"]
        text = json.dumps(value) if isinstance(value, dict) else _str(value, f"{jpath}.inline", required=True)
        check_jwks(text, f"{jpath}.inline")
        jwks = Jwks(inline=text, timeout_s=timeout, cache_s=cache)
    elif "file" in raw:
        jwks = Jwks(file=_str(raw["file"], f"{jpath}.file", required=True), timeout_s=timeout, cache_s=cache)
    else:
        uri = _str(raw["uri"], f"{jpath}.uri", required=True)
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{uri!r} is not an http(s) URL", field=f"{jpath}.uri")
        jwks = Jwks(uri=uri, timeout_s=timeout, cache_s=cache)
    header = _str(spec.get("header"), f"{path}.header") or "authorization"
    if not HEADER_NAME_RE.fullmatch(header):
        raise ConfigError(f"{header!r} is not a header name", field=f"{path}.header")
    query = _str(spec.get("query"), f"{path}.query") or None
    if query is not None and not QUERY_NAME_RE.fullmatch(query):
        raise ConfigError(f"{query!r} is not a query parameter name", field=f"{path}.query")
    return JwtAuthorizer(issuer, audiences, jwks, header.lower(), query)


def check_jwks(text: str, path: str) -> None:
    """A JWKS document: {"keys": [{"kty": ...}, ...]}. Envoy would otherwise fail every token at request time."""
    try:
        doc = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"is not JSON: {err}", field=path) from None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list) or not keys:
        raise ConfigError('must be a JWKS: {"keys": [...]} with at least one key', field=path)
    for i, key in enumerate(keys):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
            raise ConfigError("a key must be an object with kty", field=f"{path}.keys[{i}]")


def _parse_lambda_authorizer(spec: dict[str, Any], path: str, namespace: str) -> LambdaAuthorizer:
    fields = {k: spec[k] for k in ("upstream", "function", "function_name") if k in spec}
    if "function" not in fields and "function_name" not in fields:
        raise ConfigError("missing; the authorizer function", field=f"{path}.function")
    destination = _parse_destination(fields, path, namespace, Matcher("path", "/"), key="")
    sources = []
    for i, item in enumerate(
        _str_list(spec.get("identity_sources"), f"{path}.identity_sources", required=True)
    ):
        kind, _, name = item.partition(":")
        if kind not in IDENTITY_KINDS or not name:
            raise ConfigError(
                f"{item!r} is not header:NAME or query:NAME", field=f"{path}.identity_sources[{i}]"
            )
        if kind == "header" and not HEADER_NAME_RE.fullmatch(name):
            raise ConfigError(f"{name!r} is not a header name", field=f"{path}.identity_sources[{i}]")
        sources.append((kind, name.lower() if kind == "header" else name))
    ttl = 300.0
    if "ttl" in spec:
        if not isinstance(spec["ttl"], bool) and spec["ttl"] in (0, "0", "0s"):
            ttl = 0.0
        else:
            ttl = _duration(spec["ttl"], f"{path}.ttl", max_s=MAX_TTL_S)
    return LambdaAuthorizer(destination, tuple(sources), ttl)


def _parse_auth(raw: Any, path: str) -> RouteAuth:
    spec = _mapping(raw, path)
    _no_unknown(spec, ("authorizer", "scopes", "api_key_required"), path)
    authorizer = _str(spec.get("authorizer"), f"{path}.authorizer") or None
    scopes = None
    if "scopes" in spec:
        scopes = tuple(_str_list(spec["scopes"], f"{path}.scopes"))
        for i, scope in enumerate(scopes):
            if not SCOPE_RE.fullmatch(scope):
                raise ConfigError(f"{scope!r} is not an OAuth scope", field=f"{path}.scopes[{i}]")
    required = (
        _bool(spec["api_key_required"], f"{path}.api_key_required") if "api_key_required" in spec else None
    )
    return RouteAuth(authorizer, scopes, required)


def _parse_api_keys(raw: Any, path: str) -> ApiKeys:
    spec = _mapping(raw, path, required=True)
    _no_unknown(spec, ("secret_ref", "rate_limit", "limits"), path)
    ref = _str(spec.get("secret_ref"), f"{path}.secret_ref", required=True)
    rate = _parse_rate_limit(spec["rate_limit"], f"{path}.rate_limit") if "rate_limit" in spec else None
    limits = tuple(
        (str(k), _parse_rate_limit(v, f"{path}.limits.{k}"))
        for k, v in sorted(_mapping(spec.get("limits"), f"{path}.limits").items())
    )
    return ApiKeys(ref, rate, limits)


INTEGRATION_STATUS_RANGE = (200, 599)


def _parse_integration(raw: Any, path: str) -> Integration:
    spec = _mapping(raw, path, required=True)
    _no_unknown(spec, ("request_template", "responses"), path)
    request = None
    if "request_template" in spec:
        request = _str(spec["request_template"], f"{path}.request_template", required=True)
        check_template(request, f"{path}.request_template", "request")
    responses = []
    raw_responses = spec.get("responses", [])
    if not isinstance(raw_responses, list):
        raise ConfigError("must be a list of {status, pattern, template, headers}", field=f"{path}.responses")
    defaults = 0
    for i, item in enumerate(raw_responses):
        rpath = f"{path}.responses[{i}]"
        r = _mapping(item, rpath, required=True)
        _no_unknown(r, ("status", "pattern", "template", "headers", "content_type"), rpath)
        status = _int(r.get("status", 200), f"{rpath}.status", *INTEGRATION_STATUS_RANGE)
        pattern = None
        if "pattern" in r:
            pattern = _str(r["pattern"], f"{rpath}.pattern", required=True)
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(
                    f"{pattern!r} is not a regular expression: {err}", field=f"{rpath}.pattern"
                ) from None
        else:
            defaults += 1
            if defaults > 1:
                raise ConfigError("only one response may have no pattern (the default)", field=rpath)
        template = None
        if "template" in r:
            template = _str(r["template"], f"{rpath}.template", required=True)
            check_template(template, f"{rpath}.template", "response")
        headers = _header_map(r.get("headers"), f"{rpath}.headers")
        content_type = _str(r.get("content_type"), f"{rpath}.content_type") or "application/json"
        if not CONTENT_TYPE_RE.fullmatch(content_type):
            raise ConfigError(f"{content_type!r} is not a media type", field=f"{rpath}.content_type")
        responses.append(IntegrationResponse(status, pattern, template, headers, content_type))
    return Integration(request, tuple(responses))


def _header_map(raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    headers = []
    for key, value in _mapping(raw, path).items():
        hpath = f"{path}.{key}"
        if not isinstance(key, str) or not HEADER_NAME_RE.fullmatch(key) or key.startswith(":"):
            raise ConfigError("not a header name", field=hpath)
        if key.lower() in MOCK_FORBIDDEN_HEADERS:
            raise ConfigError("Envoy sets this header itself; a route may not", field=hpath)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ConfigError(f"must be a string, got {_typename(value)}", field=hpath)
        text = str(value)
        if any(c in text for c in "\r\n\0"):
            raise ConfigError("a header value cannot hold line breaks", field=hpath)
        headers.append((key.lower(), text))
    return tuple(headers)


DESTINATION_FIELDS = ("upstream", "function", "function_name", "function_param", "functions")
MAX_WEIGHT = 1_000_000


def _parse_route(raw: Any, path: str, namespace: str) -> Route:
    route = _mapping(raw, path, required=True)
    _no_unknown(route, ("matcher", "destination", "options", "mock", "auth", "integration"), path)
    matcher = _parse_matcher(route.get("matcher"), f"{path}.matcher")
    options = _parse_options(route.get("options"), f"{path}.options")
    auth = _parse_auth(route.get("auth"), f"{path}.auth")
    if "mock" in route:
        if "destination" in route:
            raise ConfigError(
                "a mock route answers by itself; remove destination or mock", field=f"{path}.mock"
            )
        for key in _mapping(route.get("options"), f"{path}.options"):
            if key not in MOCK_OPTIONS:
                raise ConfigError(
                    f"a mock route invokes nothing; only {' and '.join(MOCK_OPTIONS)} apply to it",
                    field=f"{path}.options.{key}",
                )
        if "integration" in route:
            raise ConfigError("a mock route invokes nothing to integrate", field=f"{path}.integration")
        return Route(matcher, None, options, _parse_mock(route["mock"], f"{path}.mock"), auth)
    integration = None
    if "integration" in route:
        integration = _parse_integration(route["integration"], f"{path}.integration")
        if options.payload_format is not None:
            raise ConfigError(
                "an integration builds its own payload; remove options.payload_format",
                field=f"{path}.options.payload_format",
            )
    destination = _parse_destination(route.get("destination"), path, namespace, matcher)
    return Route(matcher, destination, options, None, auth, integration)


def _parse_destination(
    raw: Any, path: str, namespace: str, matcher: Matcher, key: str = "destination"
) -> Destination:
    dpath = f"{path}.{key}" if key else path
    dest = _mapping(raw, dpath, required=True)
    _no_unknown(dest, DESTINATION_FIELDS, dpath)
    up = dest.get("upstream")
    if isinstance(up, dict):
        # Gloo's form: {name, namespace}.
        _no_unknown(up, ("name", "namespace"), f"{dpath}.upstream")
        up_name = _str(up.get("name"), f"{dpath}.upstream.name", required=True)
        up_ns = _str(up.get("namespace"), f"{dpath}.upstream.namespace") or namespace
    else:
        up_name = _str(up, f"{dpath}.upstream", required=True)
        up_ns = namespace
    given = [k for k in ("function", "function_name", "function_param", "functions") if k in dest]
    if not given:
        raise ConfigError(
            "missing; name the function (or give function_name, function_param or functions)",
            field=f"{dpath}.function",
        )
    if len(given) > 1:
        raise ConfigError(f"give only one of {', '.join(given)}", field=f"{dpath}.{given[1]}")
    which = given[0]
    if which == "function":
        return Destination(up_name, up_ns, _str(dest["function"], f"{dpath}.function", required=True))
    if which == "function_name":
        fname = _str(dest["function_name"], f"{dpath}.function_name", required=True)
        return Destination(
            up_name, up_ns, function_name=_check_function_name(fname, f"{dpath}.function_name")
        )
    if which == "function_param":
        param = _str(dest["function_param"], f"{dpath}.function_param", required=True)
        if param not in matcher.params:
            have = ", ".join(matcher.params) or "none"
            raise ConfigError(
                f"{param!r} is not a path parameter of this route's matcher (it has: {have})",
                field=f"{dpath}.function_param",
            )
        return Destination(up_name, up_ns, function_param=param)
    raw_choices = dest["functions"]
    if not isinstance(raw_choices, list) or not raw_choices:
        raise ConfigError("must be a non-empty list of {function, weight}", field=f"{dpath}.functions")
    choices = []
    for i, item in enumerate(raw_choices):
        cpath = f"{dpath}.functions[{i}]"
        choice = _mapping(item, cpath, required=True)
        _no_unknown(choice, ("function", "function_name", "weight"), cpath)
        if ("function" in choice) == ("function_name" in choice):
            raise ConfigError("give exactly one of function or function_name", field=f"{cpath}.function")
        if "weight" not in choice:
            raise ConfigError("missing; a whole number such as 80", field=f"{cpath}.weight")
        weight = _int(choice["weight"], f"{cpath}.weight", 0, MAX_WEIGHT)
        if "function" in choice:
            choices.append(
                FunctionChoice(_str(choice["function"], f"{cpath}.function", required=True), None, weight)
            )
        else:
            fname = _check_function_name(
                _str(choice["function_name"], f"{cpath}.function_name", required=True),
                f"{cpath}.function_name",
            )
            choices.append(FunctionChoice("", fname, weight))
    if not any(c.weight for c in choices):
        raise ConfigError("at least one weight must be more than 0", field=f"{dpath}.functions")
    return Destination(up_name, up_ns, functions=tuple(choices))


MOCK_OPTIONS = ("rate_limit", "cors")
# Headers a route may not set: Envoy refuses the whole route configuration, or replaces them itself.
MOCK_FORBIDDEN_HEADERS = ("host", "content-length", "transfer-encoding", "connection")


def _parse_mock(raw: Any, path: str) -> MockResponse:
    mock = _mapping(raw, path, required=True)
    _no_unknown(mock, ("status", "headers", "body"), path)
    status = _int(mock.get("status", 200), f"{path}.status", 200, 599)
    if status in RESERVED_MOCK_STATUSES:
        raise ConfigError(
            "429 is the rate limit's answer: Envoy would replace this mock's body with its JSON",
            field=f"{path}.status",
        )
    headers = list(_header_map(mock.get("headers"), f"{path}.headers"))
    body = mock.get("body", "")
    if isinstance(body, (dict, list)):
        # A mapping is sent as JSON, like API Gateway's mock integration templates usually are.
        body = json.dumps(body, separators=(",", ":"), sort_keys=True)
        if not any(k == "content-type" for k, _ in headers):
            headers.append(("content-type", "application/json"))
    elif not isinstance(body, str):
        raise ConfigError(f"must be a string or a mapping, got {_typename(body)}", field=f"{path}.body")
    if len(body.encode()) > MAX_MOCK_BODY:
        raise ConfigError("at most 64 KiB", field=f"{path}.body")
    return MockResponse(status, tuple(headers), body)


def _parse_matcher(raw: Any, path: str) -> Matcher:
    m = _mapping(raw, path, required=True)
    _no_unknown(m, ("path", "prefix", "regex", "methods"), path)
    kinds = [k for k in ("path", "prefix", "regex") if k in m]
    if len(kinds) != 1:
        raise ConfigError(
            "needs exactly one of path, prefix or regex" + (f", got {', '.join(kinds)}" if kinds else ""),
            field=path,
        )
    kind = kinds[0]
    value = _str(m[kind], f"{path}.{kind}", required=True)
    if kind != "regex" and not value.startswith("/"):
        raise ConfigError(f"{value!r} must start with '/'", field=f"{path}.{kind}")
    if kind != "regex" and any(c in value for c in "?#"):
        raise ConfigError(f"{value!r} must not contain a query or fragment", field=f"{path}.{kind}")
    template_regex: str | None = None
    params: tuple[str, ...] = ()
    if kind == "path":
        try:
            template_regex, params = template_to_regex(value)
        except ValueError as err:
            raise ConfigError(f"bad path template {value!r}: {err}", field=f"{path}.path") from None
        if template_regex is not None:
            _check_envoy_regex(template_regex, f"{path}.path", what=f"path template {value!r}")
    elif kind == "regex":
        # Python accepts these, RE2 does not: Envoy would refuse the whole route table, not just this route.
        if any(c in value for c in RE2_UNSUPPORTED) or re.search(r"\\[1-9]", value):
            raise ConfigError(
                "lookarounds, backreferences, atomic groups and conditionals are not supported by Envoy's RE2",
                field=f"{path}.regex",
            )
        try:
            compiled = re.compile(value)
        except re.error as err:
            raise ConfigError(f"bad regex {value!r}: {err}", field=f"{path}.regex") from None
        _check_envoy_regex(value, f"{path}.regex", what=f"regex {value!r}")
        # Named groups become pathParameters, as template parameters do.
        params = tuple(compiled.groupindex)
    elif "{" in value:
        raise ConfigError("a prefix cannot hold {parameters}; use path", field=f"{path}.prefix")
    raw_methods = m.get("methods") or []
    if not isinstance(raw_methods, list):
        raise ConfigError(
            f"must be a list such as [GET, POST], got {_typename(raw_methods)}", field=f"{path}.methods"
        )
    methods: list[str] = []
    for i, meth in enumerate(raw_methods):
        meth = _str(meth, f"{path}.methods[{i}]", required=True).upper()
        if meth not in HTTP_METHODS:
            raise ConfigError(
                f"{meth!r} is not an HTTP method ({', '.join(HTTP_METHODS)})", field=f"{path}.methods[{i}]"
            )
        if meth not in methods:
            methods.append(meth)
    return Matcher(kind, value, tuple(methods), template_regex, params)


RE2_UNSUPPORTED = ("(?=", "(?!", "(?<=", "(?<!", "(?P=", "(?>", "(?(")
# Envoy refuses a regex whose RE2 program is too large (measured with Envoy 1.40: python-re2's programsize
# 166 passes, 168 fails); stay below with a margin.
RE2_MAX_PROGRAM_SIZE = 150


def _check_envoy_regex(pattern: str, field: str, *, what: str) -> None:
    """Compile with RE2 itself, as Envoy will: a regex only Python accepts would get the route table NACKed."""
    import re2

    options = re2.Options()
    options.log_errors = False  # the ConfigError says it; RE2's own stderr line would only repeat it
    try:
        program = re2.compile(pattern, options)
    except re2.error as err:
        detail = err.args[0].decode() if err.args and isinstance(err.args[0], bytes) else str(err)
        raise ConfigError(f"{what} is not valid RE2, Envoy's regex engine: {detail}", field=field) from None
    if program.programsize > RE2_MAX_PROGRAM_SIZE:
        raise ConfigError(
            f"{what} is too complex for Envoy's RE2 (program size {program.programsize}, "
            f"limit {RE2_MAX_PROGRAM_SIZE}); simplify it or split the route",
            field=field,
        )


def _no_unknown(obj: dict[str, Any], allowed: tuple[str, ...], path: str) -> None:
    for key in obj:
        if key not in allowed:
            raise ConfigError(
                f"unknown field {key!r}; valid fields are {', '.join(allowed)}", field=f"{path}.{key}"
            )


def _mapping(value: Any, path: str, *, required: bool = False) -> dict[str, Any]:
    if value is None:
        if required:
            raise ConfigError("missing", field=path)
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"must be a mapping, got {_typename(value)}", field=path)
    return value


def _str(value: Any, path: str, *, required: bool = False) -> str:
    if value is None or value == "":
        if required:
            raise ConfigError("missing", field=path)
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"must be a string, got {_typename(value)}", field=path)
    return value


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )
