"""Turns one plain document (a dict from YAML or the Kubernetes API) into a model object.

Every rejection is a ConfigError naming the object and the dotted field path, and saying what would be valid.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any
from urllib.parse import urlsplit

from controlplane.model.errors import ConfigError
from controlplane.model.resources import (
    API_GROUP,
    DEFAULT_NAMESPACE,
    DNS_LABEL_RE,
    FUNCTION_NAME_RE,
    HTTP_METHODS,
    INVOCATION_TYPES,
    KIND_SECRET,
    KIND_UPSTREAM,
    KIND_VIRTUAL_SERVICE,
    LOCAL_ENDPOINT,
    MAX_TIMEOUT_S,
    PAYLOAD_FORMATS,
    QUALIFIER_RE,
    REGION_RE,
    AwsCredentials,
    Destination,
    DiscoverySettings,
    Endpoint,
    Function,
    Matcher,
    ObjectKey,
    Route,
    RouteOptions,
    Secret,
    Upstream,
    VirtualService,
    split_function_name,
    template_to_regex,
)

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
    return Secret(name, namespace, creds, tuple(sorted(values)))


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
OPTION_FIELDS = ("payload_format", "invocation_type", "timeout")
STAGE_VARIABLE_NAME_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
# API Gateway's rule for stage variable values.
STAGE_VARIABLE_VALUE_RE = re.compile(r"^[A-Za-z0-9\-._~:/?#&=,]{0,512}$")
_DURATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m)?$")
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
    return RouteOptions(fmt, itype, timeout)


def _duration(raw: Any, path: str) -> float:
    """`29s`, `500ms`, `2m` or a number of seconds; more than 0 and at most Lambda's 900 s."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"must be a duration such as 10s or 500ms, got {_typename(raw)}", field=path)
    if isinstance(raw, str):
        m = _DURATION_RE.fullmatch(raw.strip())
        if m is None:
            raise ConfigError(f"{raw!r} is not a duration such as 10s, 500ms or 2m", field=path)
        value = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    else:
        value = float(raw)
    if not 0 < value <= MAX_TIMEOUT_S:
        raise ConfigError(f"must be more than 0 and at most {MAX_TIMEOUT_S:g}s (Lambda's limit)", field=path)
    return value


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
    _no_unknown(fn, ("name", "spec"), path)
    name = _str(fn.get("name"), f"{path}.name", required=True)
    if not LOGICAL_NAME_RE.fullmatch(name):
        raise ConfigError(f"{name!r} is not a valid function name", field=f"{path}.name")
    spec = _mapping(fn.get("spec"), f"{path}.spec", required=True)
    _no_unknown(spec, ("function_name", "qualifier"), f"{path}.spec")
    function_name = _str(spec.get("function_name"), f"{path}.spec.function_name", required=True)
    if not FUNCTION_NAME_RE.fullmatch(function_name) or len(function_name) > 170:
        raise ConfigError(
            f"{function_name!r} is not a Lambda function name: use a name, name:qualifier, "
            "a full ARN or a partial ARN (123456789012:function:name)",
            field=f"{path}.spec.function_name",
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
    return Function(name, function_name, qualifier)


VS_FIELDS = ("domains", "routes", "stage", "stage_variables")


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
    return VirtualService(
        name, namespace, tuple(domains), routes, stage, generation, stage_variables=tuple(sorted(variables))
    )


def _parse_route(raw: Any, path: str, namespace: str) -> Route:
    route = _mapping(raw, path, required=True)
    _no_unknown(route, ("matcher", "destination", "options"), path)
    matcher = _parse_matcher(route.get("matcher"), f"{path}.matcher")
    dest = _mapping(route.get("destination"), f"{path}.destination", required=True)
    _no_unknown(dest, ("upstream", "function"), f"{path}.destination")
    up = dest.get("upstream")
    if isinstance(up, dict):
        # Gloo's form: {name, namespace}.
        _no_unknown(up, ("name", "namespace"), f"{path}.destination.upstream")
        up_name = _str(up.get("name"), f"{path}.destination.upstream.name", required=True)
        up_ns = _str(up.get("namespace"), f"{path}.destination.upstream.namespace") or namespace
    else:
        up_name = _str(up, f"{path}.destination.upstream", required=True)
        up_ns = namespace
    function = _str(dest.get("function"), f"{path}.destination.function", required=True)
    return Route(
        matcher,
        Destination(up_name, up_ns, function),
        _parse_options(route.get("options"), f"{path}.options"),
    )


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
