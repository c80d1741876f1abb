"""Turns an OpenAPI 3.x or Swagger 2.0 document into one Upstream and one VirtualService.

Like API Gateway's import: every path and method becomes a route; the function comes from the operation's
`x-amazon-apigateway-integration` (a Lambda invocation URI or function ARN) or else its `operationId`. A `mock`
integration becomes a mock route (its canned response, no function; with only mocks there is no Upstream), and
`x-amazon-apigateway-cors` becomes every route's `options.cors`. The documents built are checked with the model's
own parser and resolver before anything is written, so what is written is exactly what the control plane accepts.
Security schemes with an `x-amazon-apigateway-authorizer` (JWT, Lambda REQUEST/TOKEN, Cognito) become
`spec.authorizers`, an `x-api-key` scheme `spec.api_keys`, security requirements `spec.auth` and `routes[].auth`, and
a non-proxy (`type: aws`) integration `routes[].integration`. The `x-lambdagate-*` extensions that
`lambdagate export-openapi` writes are read back, so that an export imports as the same routes.
Every problem is an OpenApiError naming where it is in the document
(`paths./pets/{id}.get.x-amazon-apigateway-integration.uri`) or which option to change.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import yaml

from controlplane.model.errors import ConfigError
from controlplane.model.parse import LOGICAL_NAME_RE, parse_document
from controlplane.model.resolve import resolve
from controlplane.model.resources import (
    API_GROUP,
    DEFAULT_NAMESPACE,
    DNS_LABEL_RE,
    FUNCTION_NAME_RE,
    KIND_UPSTREAM,
    KIND_VIRTUAL_SERVICE,
    LATEST,
    NO_AUTHORIZER,
    PARAM_RE,
    Endpoint,
)

INTEGRATION = "x-amazon-apigateway-integration"
ANY_METHOD = "x-amazon-apigateway-any-method"
# The order of a path's routes. HEAD before GET: a GET route also admits HEAD, so a HEAD operation of its own
# must come first to be reached. The any-method route last, so that an operation for one method wins over it,
# as in API Gateway.
OPERATION_KEYS = ("head", "get", "post", "put", "patch", "delete", "options", "trace", ANY_METHOD)
# Path item fields that are not operations (and `x-` extensions, ignored too).
PATH_ITEM_FIELDS = ("summary", "description", "parameters", "servers")
# HTTP APIs' catch-all route key.
DEFAULT_ROUTE = "$default"
# Lambda integration fields API Gateway applies and lambdagate does not.
IGNORED_INTEGRATION_FIELDS = ("credentials", "requestParameters", "responseParameters")
CORS = "x-amazon-apigateway-cors"
# HTTP APIs' CORS settings and the route option fields they become (names matched case-insensitively).
CORS_FIELDS = {
    "allowOrigins": "allow_origins",
    "allowMethods": "allow_methods",
    "allowHeaders": "allow_headers",
    "exposeHeaders": "expose_headers",
    "maxAge": "max_age",
    "allowCredentials": "allow_credentials",
}
# A mock integration's response header mapping: `method.response.header.NAME: "'literal'"`.
RESPONSE_HEADER = "method.response.header."
# What Velocity would evaluate in a mapping template: references ($name, ${name}, $!name) and directives (#set,
# #if..., ## and #* comments).
VELOCITY_RE = re.compile(
    r"\$!?\{?[A-Za-z_]|#\{?(?:set|if|elseif|else|end|foreach|break|stop|macro|parse|include|evaluate|define)\b"
    r"|##|#\*"
)

LAMBDA_ARN_RE = re.compile(
    r"arn:(?P<partition>aws[a-zA-Z-]*):lambda:(?P<region>[a-z0-9-]+):(?P<account>[0-9]{12}):function:"
    r"(?P<name>[A-Za-z0-9_-]{1,64})(?::(?P<qualifier>\$LATEST|[A-Za-z0-9_-]{1,128}))?"
)
# The uri of a REST API's Lambda integration; HTTP APIs also take the function ARN itself.
INVOKE_URI_RE = re.compile(
    r"arn:aws[a-zA-Z-]*:apigateway:[a-z0-9-]+:lambda:path/2015-03-31/functions/(?P<arn>.+)/invocations/?"
)
STAGE_VARIABLE_RE = re.compile(r"\$\{stageVariables\.([A-Za-z0-9_]+)\}")
SUBSTITUTION_RE = re.compile(r"\$\{[^}]*\}")
# What Lambda accepts as a function name: an operationId outside this cannot name a function.
FUNCTION_BASE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_TIMEOUT_MS = 900_000

# Security schemes (API Gateway's authorizers).
AUTHORIZER = "x-amazon-apigateway-authorizer"
AUTHTYPE = "x-amazon-apigateway-authtype"
API_KEY_HEADER = "x-api-key"
IDENTITY_RE = re.compile(r"(?:method\.request|\$request)\.(header|querystring)\.(.+)")
COGNITO_POOL_RE = re.compile(
    r"arn:aws[a-zA-Z-]*:cognito-idp:(?P<region>[a-z0-9-]+):[0-9]{12}:userpool/(?P<pool>.+)"
)
AUTHORIZER_NAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_-]{0,62}[A-Za-z0-9])?")
MAX_AUTHORIZER_TTL_S = 3600
# What `lambdagate export-openapi` writes for what API Gateway's dialect cannot say; read back here so that an
# export imports as the same routes. Where one is present it wins over the standard fields it refines.
X_VIRTUAL_SERVICE = "x-lambdagate-virtual-service"  # {name, namespace}
X_DOMAINS = "x-lambdagate-domains"
X_STAGE = "x-lambdagate-stage"  # {name, variables}
X_REGION = "x-lambdagate-region"
X_FUNCTIONS = "x-lambdagate-functions"  # logical name -> {function_name, qualifier}
X_PATHS = "x-lambdagate-paths"  # routes OpenAPI paths cannot hold: [{path|prefix|regex: ..., get: ...}]
X_TEMPLATES = "x-lambdagate-templates"  # jinja2: the mapping templates are lambdagate's, not Velocity
X_AUTH = "x-lambdagate-auth"  # spec.auth or routes[].auth as written, where security alone would differ
X_ROUTE = "x-lambdagate-route"  # the route's index in spec.routes: order, and methods of one route
X_METHODS = "x-lambdagate-methods"
X_PREFIX = "x-lambdagate-prefix"
X_DESTINATION = "x-lambdagate-destination"  # function, function_name, function_param or functions
X_OPTIONS = "x-lambdagate-options"  # route options API Gateway has no field for
X_MOCK = "x-lambdagate-mock"
X_INTEGRATION = "x-lambdagate-integration"
X_AUTHORIZER = "x-lambdagate-authorizer"  # jwks, query, function, ttl
X_API_KEYS = "x-lambdagate-api-keys"  # spec.api_keys: secret_ref, rate_limit, limits
MATCHER_KINDS = ("path", "prefix", "regex")

# Segment kinds, most specific first: literal, literal with a parameter inside, parameter, greedy parameter.
_LITERAL, _MIXED, _PARAM, _GREEDY = 0, 1, 2, 3


class OpenApiError(Exception):
    """A document (or an option) that cannot be imported; `location` names where, dotted from the root."""

    def __init__(self, message: str, *, location: str = "", warnings: list[str] | None = None) -> None:
        self.message = message
        self.location = location
        # What was noticed before the error (such as the operations skipped before none was left).
        self.warnings = warnings or []
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class _Unsupported(Exception):
    """An operation lambdagate cannot serve; an error, or a warning with --skip-unsupported."""


@dataclass(frozen=True)
class ImportOptions:
    name: str | None = None  # the VirtualService; default: from info.title
    upstream: str | None = None  # default: <name>-lambdas
    namespace: str | None = None  # default: none written (a folder reads it as `default`)
    region: str | None = None  # default: the functions' ARNs
    endpoint: str | None = None  # `local` or scheme://host[:port]
    secret_ref: str | None = None
    base_path: str | None = None  # None: the document's (basePath, servers[0]); "" or "/": none
    domains: tuple[str, ...] = ()
    stage_variables: tuple[tuple[str, str], ...] = ()
    skip_unnamed: bool = False
    skip_unsupported: bool = False


@dataclass
class ImportResult:
    upstream: dict[str, Any] | None  # None when every route is a mock: no function, no Upstream
    virtual_service: dict[str, Any]
    version: str  # "OpenAPI 3.0.1" or "Swagger 2.0"
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def documents(self) -> list[dict[str, Any]]:
        return [d for d in (self.upstream, self.virtual_service) if d is not None]

    @property
    def function_count(self) -> int:
        return len(self.upstream["spec"]["functions"]) if self.upstream is not None else 0

    def to_yaml(self, *, source: str | None = None) -> str:
        functions = self.function_count
        routes = len(self.virtual_service["spec"]["routes"])
        header = (
            f"# Generated by `lambdagate import-openapi` from {source or 'an OpenAPI document'} "
            f"({self.version}): {_count(functions, 'function')}, {_count(routes, 'route')}.\n"
        )
        body = yaml.safe_dump_all(
            self.documents, sort_keys=False, default_flow_style=None, width=110, allow_unicode=True
        )
        return header + body


@dataclass
class _Target:
    """The function an operation invokes."""

    function_name: str  # a name or an ARN, without qualifier
    qualifier: str | None
    region: str | None  # from the ARN
    hint: str  # what its logical name is made from
    location: str  # where it was named, for errors


@dataclass
class _Route:
    location: str  # paths./pets.get
    method: str | None  # None: any method
    target: _Target | None  # None: a mock route (or a lambdagate destination with no uri)
    options: dict[str, Any]
    mock: dict[str, Any] | None = None  # the route's `mock` (status, headers, body)
    # A field of the route document (`mock.status`) -> where in the document it comes from, for errors.
    fields: dict[str, str] = field(default_factory=dict)
    # What lambdagate's own extensions (written by `lambdagate export-openapi`) add; see _route_extensions.
    index: int | None = None  # x-lambdagate-route: the route's place in spec.routes
    position: int = 0  # the operation's place in its path item
    methods: list[str] | None = None  # x-lambdagate-methods
    prefix: str | None = None  # x-lambdagate-prefix
    destination: dict[str, Any] | None = None  # x-lambdagate-destination (without upstream)
    auth: dict[str, Any] = field(default_factory=dict)  # routes[].auth
    integration: dict[str, Any] | None = None  # routes[].integration (type aws)
    merged: list[str | None] = field(default_factory=list)  # the methods of the operations merged into it

    @property
    def is_mock(self) -> bool:
        return self.mock is not None


@dataclass
class _Path:
    index: int  # document order
    location: str  # paths./pets
    matcher_path: str  # with the base path
    catch_all: bool  # HTTP APIs' $default: a prefix route, last
    routes: list[_Route] = field(default_factory=list)
    kind: str = "path"  # an entry of x-lambdagate-paths may be a prefix or a regex


# --- reading -------------------------------------------------------------------------------------------------


def load_spec(text: str, *, json_first: bool = False) -> Any:
    """Parse a document that is JSON or YAML; an OpenApiError (one line) when it is neither."""
    if json_first or text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            if json_first:
                raise OpenApiError(
                    f"line {err.lineno}, column {err.colno}: invalid JSON: {err.msg}"
                ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise OpenApiError(f"{where}invalid YAML: {problem}") from None


def read_spec(spec: str) -> Any:
    """Read SPEC (a file, or `-` for standard input) and parse it."""
    try:
        if spec == "-":
            text = sys.stdin.read()
        else:
            text = Path(spec).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise OpenApiError("is not UTF-8 text") from None
    except OSError as err:
        raise OpenApiError(f"cannot be read: {err.strerror or err}") from None
    return load_spec(text, json_first=spec.lower().endswith(".json"))


# --- the import ----------------------------------------------------------------------------------------------


def import_openapi(doc: Any, options: ImportOptions | None = None) -> ImportResult:
    """The Upstream and VirtualService documents for an OpenAPI document, checked as the control plane will."""
    options = options or ImportOptions()
    if not isinstance(doc, dict):
        raise OpenApiError(f"the document must be a mapping (an OpenAPI object), got {_typename(doc)}")
    version, is_swagger = _version(doc)
    if options.base_path is not None:
        base = _normalize_base(options.base_path, "--base-path")
    else:
        raw_base, where = _document_base_path(doc, is_swagger)
        base = _normalize_base(raw_base, where)
    warnings: list[str] = []
    ext = _document_extensions(doc)
    options = _with_document_defaults(options, ext)
    security = _security(doc, is_swagger, dict(options.stage_variables), warnings)
    items = _collect(doc, base, options, warnings, security)
    cors, cors_fields = _cors(doc, warnings)
    placed = _by_index(items, warnings)
    notes: list[str] = []
    if placed is None:
        ordered = _specific_first(items)
        notes = _reorder_notes(items, ordered)
        warnings.extend(_unreachable_warnings(ordered))
        placed = [(p, r) for p in ordered for r in p.routes]

    title = doc.get("info", {}).get("title") if isinstance(doc.get("info"), dict) else None
    vs_name = options.name or _slug(title if isinstance(title, str) else "") or "openapi"
    up_name = options.upstream or f"{vs_name}-lambdas"
    for name, option in ((vs_name, "--name"), (up_name, "--upstream")):
        if not DNS_LABEL_RE.fullmatch(name) or len(name) > 253:
            raise OpenApiError(
                f"{name!r} is not a valid name: lowercase letters, digits, '-' and '.'", location=option
            )
    if options.secret_ref is not None and not DNS_LABEL_RE.fullmatch(options.secret_ref):
        raise OpenApiError(f"{options.secret_ref!r} is not a Secret name", location="--secret-ref")
    all_routes = [r for _, r in placed]
    for r in all_routes:
        if r.destination is not None and not _destination_agrees(r, ext.functions):
            warnings.append(
                f"{r.location}: {X_DESTINATION} names another function than the integration's uri; "
                "the uri is used"
            )
            r.destination = None
    lambda_schemes = [s for s in security.schemes.values() if s.kind == "lambda"]
    # Mock routes answer by themselves: with no function at all, there is no Upstream to write.
    needs_upstream = any(not r.is_mock for r in all_routes) or bool(lambda_schemes)
    if not needs_upstream:
        unused = [
            flag
            for flag, value in (
                ("--upstream", options.upstream),
                ("--region", options.region),
                ("--endpoint", options.endpoint),
                ("--secret-ref", options.secret_ref),
            )
            if value is not None
        ]
        if unused:
            warnings.append(
                f"{', '.join(unused)}: not used: every route is a mock, so no Upstream is written"
            )
    targets = [r.target for r in all_routes if r.target is not None]
    targets += [s.target for s in lambda_schemes if s.target is not None]
    region = _region(targets, options, ext.region) if needs_upstream else ""

    # One spec.functions entry per distinct function: those the document names in x-lambdagate-functions, then
    # the others in the document's order.
    logical: dict[tuple[str, str | None], str] = {}
    functions: list[dict[str, Any]] = []
    function_locations: list[str] = []
    for fname, fspec in ext.functions.items():
        logical.setdefault((fspec["function_name"], fspec.get("qualifier")), fname)
        functions.append({"name": fname, "spec": copy.deepcopy(fspec)})
        function_locations.append(f"{X_FUNCTIONS}.{fname}")
    taken = {f["name"] for f in functions}
    # In the document's order (not the routes'), as the paths list them.
    named = [r.target for p in items for r in p.routes if r.target is not None and r.destination is None]
    named += [s.target for s in lambda_schemes if s.target is not None and s.destination is None]
    for target in named:
        key = (target.function_name, target.qualifier)
        if key in logical:
            continue
        logical[key] = _logical_name(target.hint, taken)
        taken.add(logical[key])
        fspec = {"function_name": target.function_name}
        if target.qualifier:
            fspec["qualifier"] = target.qualifier
        functions.append({"name": logical[key], "spec": fspec})
        function_locations.append(target.location)
    up_spec: dict[str, Any] = {"region": region}
    if options.secret_ref:
        up_spec["secret_ref"] = options.secret_ref
    if options.endpoint:
        up_spec["endpoint"] = options.endpoint
    up_spec["functions"] = functions

    route_docs: list[dict[str, Any]] = []
    route_sources: list[tuple[str, dict[str, str]]] = []
    for p, r in placed:
        kind = "prefix" if p.catch_all else p.kind
        matcher: dict[str, Any] = {kind: p.matcher_path}
        if r.prefix is not None:
            matcher = {"prefix": _join(base, r.prefix)}
        methods = r.methods if r.methods is not None else _group_methods(r)
        if methods:
            matcher["methods"] = list(methods)
        rdoc: dict[str, Any] = {"matcher": matcher}
        if r.is_mock:
            rdoc["mock"] = copy.deepcopy(r.mock)
        elif r.destination is not None:
            rdoc["destination"] = {"upstream": up_name, **copy.deepcopy(r.destination)}
        else:
            assert r.target is not None
            function = logical[(r.target.function_name, r.target.qualifier)]
            rdoc["destination"] = {"upstream": up_name, "function": function}
        route_options: dict[str, Any] = copy.deepcopy(r.options)
        if cors is not None and "cors" not in route_options:
            # A copy per route: one shared object would be written as YAML anchors and aliases.
            route_options["cors"] = copy.deepcopy(cors)
        if route_options:
            rdoc["options"] = route_options
        if r.auth:
            rdoc["auth"] = copy.deepcopy(r.auth)
        if r.integration is not None:
            rdoc["integration"] = copy.deepcopy(r.integration)
        route_docs.append(rdoc)
        route_sources.append((r.location, {**r.fields, **cors_fields}))
    vs_spec: dict[str, Any] = {}
    if options.domains:
        vs_spec["domains"] = list(options.domains)
    if ext.stage is not None:
        vs_spec["stage"] = ext.stage
    if options.stage_variables:
        vs_spec["stage_variables"] = dict(sorted(options.stage_variables))
    authorizers = _authorizer_docs(security, up_name, logical)
    if authorizers:
        vs_spec["authorizers"] = authorizers
    if security.auth:
        vs_spec["auth"] = copy.deepcopy(security.auth)
    api_keys = security.api_keys
    wants_keys = security.base[2] or any(r.auth.get("api_key_required") for r in all_routes)
    if api_keys is None and wants_keys:
        api_keys = {"secret_ref": f"{vs_name}-api-keys"}
        warnings.append(
            f"the API key scheme names no Secret ({X_API_KEYS}.secret_ref): spec.api_keys.secret_ref is "
            f"{vs_name}-api-keys; create that Secret with one entry per key (name: key)"
        )
    if api_keys is not None:
        vs_spec["api_keys"] = copy.deepcopy(api_keys)
    vs_spec["routes"] = route_docs

    upstream = _document(KIND_UPSTREAM, up_name, options.namespace, up_spec) if needs_upstream else None
    virtual_service = _document(KIND_VIRTUAL_SERVICE, vs_name, options.namespace, vs_spec)
    _check(upstream, virtual_service, options, route_sources, function_locations, security)
    return ImportResult(upstream, virtual_service, version, warnings, notes)


def _collect(
    doc: dict[str, Any], base: str, options: ImportOptions, warnings: list[str], security: _Security
) -> list[_Path]:
    """The document's paths with the routes of their operations, in document order; then the routes of
    x-lambdagate-paths (those an export could not write as OpenAPI paths)."""
    paths = doc.get("paths")
    if paths is None:
        raise OpenApiError("missing: the document has no operations to import", location="paths")
    if not isinstance(paths, dict):
        raise OpenApiError(
            f"must be a mapping of paths to operations, got {_typename(paths)}", location="paths"
        )
    secured: list[str] = []
    items: list[_Path] = []
    for index, (raw_path, item) in enumerate(paths.items()):
        ploc = f"paths.{raw_path}"
        if not isinstance(raw_path, str):
            raise OpenApiError(f"a path must be a string, got {_typename(raw_path)}", location=ploc)
        if not isinstance(item, dict):
            raise OpenApiError(
                f"must be a mapping of methods to operations, got {_typename(item)}", location=ploc
            )
        if "$ref" in item:
            raise OpenApiError(
                "a $ref path item is not supported: bundle the document first (all path items inline)",
                location=f"{ploc}.$ref",
            )
        if raw_path == DEFAULT_ROUTE:
            entry = _Path(index, ploc, base or "/", catch_all=True)
        elif raw_path.startswith("/"):
            entry = _Path(index, ploc, _join(base, raw_path), catch_all=False)
        else:
            raise OpenApiError("a path must start with '/'", location=ploc)
        _path_routes(entry, item, doc, options, warnings, security, secured)
        if entry.routes:
            items.append(entry)
    extra = doc.get(X_PATHS) or []
    if not isinstance(extra, list):
        raise OpenApiError(f"must be a list of path items, got {_typename(extra)}", location=X_PATHS)
    for n, item in enumerate(extra):
        ploc = f"{X_PATHS}[{n}]"
        if not isinstance(item, dict):
            raise OpenApiError(f"must be a mapping, got {_typename(item)}", location=ploc)
        kinds = [k for k in MATCHER_KINDS if k in item]
        value = item.get(kinds[0]) if len(kinds) == 1 else None
        if not isinstance(value, str) or not value:
            raise OpenApiError("needs exactly one of path, prefix or regex (a string)", location=ploc)
        if kinds[0] != "regex":
            value = _join(base, value)
        entry = _Path(len(paths) + n, ploc, value, catch_all=False, kind=kinds[0])
        item = {k: v for k, v in item.items() if k not in MATCHER_KINDS}
        _path_routes(entry, item, doc, options, warnings, security, secured)
        if entry.routes:
            items.append(entry)
    if secured:
        verb = "requires" if len(secured) == 1 else "require"
        warnings.append(
            f"{_count(len(secured), 'operation')} {verb} authorization (security or x-amazon-apigateway-auth) "
            f"by schemes lambdagate does not import, first {secured[0]}; lambdagate does not enforce it, so "
            "these routes are open to anyone who can reach the gateway"
        )
    if not items:
        raise OpenApiError(
            "no operation to import: every operation was skipped", location="paths", warnings=warnings
        )
    return items


def _path_routes(
    entry: _Path,
    item: dict[str, Any],
    doc: dict[str, Any],
    options: ImportOptions,
    warnings: list[str],
    security: _Security,
    secured: list[str],
) -> None:
    """Add a path item's operations to entry as routes."""
    ploc = entry.location
    stage_variables = dict(options.stage_variables)
    for key in item:
        if key not in OPERATION_KEYS and key not in PATH_ITEM_FIELDS and not str(key).startswith("x-"):
            warnings.append(f"{ploc}.{key}: not an operation lambdagate imports; ignored")
    positions = {key: n for n, key in enumerate(item)}
    for key in (k for k in OPERATION_KEYS if k in item):
        oloc = f"{ploc}.{key}"
        op = item[key]
        if not isinstance(op, dict):
            raise OpenApiError(f"an operation must be a mapping, got {_typename(op)}", location=oloc)
        try:
            route = _route(op, oloc, key, doc, stage_variables, options, warnings)
        except _Unsupported as why:
            if not options.skip_unsupported:
                raise OpenApiError(
                    f"{why} (--skip-unsupported skips such operations)", location=oloc
                ) from None
            warnings.append(f"{oloc}: skipped: {why}")
            continue
        if route is None:
            continue
        route.position = positions[key]
        route.auth, unsupported = _operation_auth(op, oloc, security, route, warnings)
        if unsupported:
            secured.append(oloc)
        entry.routes.append(route)


def _document(kind: str, name: str, namespace: str | None, spec: dict[str, Any]) -> dict[str, Any]:
    meta: dict[str, str] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {"apiVersion": f"{API_GROUP}/v1", "kind": kind, "metadata": meta, "spec": spec}


def _version(doc: dict[str, Any]) -> tuple[str, bool]:
    """("OpenAPI 3.0.1", False) or ("Swagger 2.0", True)."""
    if "openapi" in doc:
        text = _version_text(doc["openapi"])
        if not re.fullmatch(r"3\.[0-9]+(\.[0-9]+)?(-[0-9A-Za-z.-]+)?", text):
            raise OpenApiError(
                f"unsupported version {text!r}: lambdagate imports OpenAPI 3.x and Swagger 2.0",
                location="openapi",
            )
        return f"OpenAPI {text}", False
    if "swagger" in doc:
        text = _version_text(doc["swagger"])
        if text != "2.0":
            raise OpenApiError(
                f"unsupported version {text!r}: lambdagate imports OpenAPI 3.x and Swagger 2.0",
                location="swagger",
            )
        return "Swagger 2.0", True
    raise OpenApiError('not an OpenAPI document: it has neither `openapi: 3.x` nor `swagger: "2.0"`')


def _version_text(value: Any) -> str:
    # YAML reads an unquoted 2.0 or 3.0 as a number.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value if isinstance(value, str) else repr(value)


# --- base path -----------------------------------------------------------------------------------------------


def _document_base_path(doc: dict[str, Any], is_swagger: bool) -> tuple[str, str]:
    """The document's base path and where it comes from.

    Swagger 2: `basePath`. OpenAPI 3, as API Gateway's import does: a `basePath` server variable's default if
    servers[0] has one, else the path part of servers[0].url with its variables replaced by their defaults.
    """
    if is_swagger:
        raw = doc.get("basePath")
        if raw is None:
            return "", "basePath"
        if not isinstance(raw, str):
            raise OpenApiError(f"must be a string, got {_typename(raw)}", location="basePath")
        return raw, "basePath"
    servers = doc.get("servers")
    if servers is None or servers == []:
        return "", "servers"
    if not isinstance(servers, list):
        raise OpenApiError(f"must be a list, got {_typename(servers)}", location="servers")
    server = servers[0]
    if not isinstance(server, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(server)}", location="servers[0]")
    variables = server.get("variables") or {}
    if not isinstance(variables, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(variables)}", location="servers[0].variables")

    def default(name: str) -> str:
        where = f"servers[0].variables.{name}"
        var = variables.get(name)
        if not isinstance(var, dict) or "default" not in var:
            raise OpenApiError(f"servers[0].url uses {{{name}}}, which has no default", location=where)
        value = var["default"]
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise OpenApiError(f"must be a string, got {_typename(value)}", location=f"{where}.default")
        return str(value)

    if "basePath" in variables:
        return "/" + default("basePath").lstrip("/"), "servers[0].variables.basePath.default"
    url = server.get("url")
    if not isinstance(url, str):
        raise OpenApiError(f"must be a string, got {_typename(url)}", location="servers[0].url")
    url = re.sub(r"\{([^{}]*)\}", lambda m: default(m.group(1)), url)
    try:
        path = urlsplit(url).path
    except ValueError:
        raise OpenApiError(f"{url!r} is not a URL", location="servers[0].url") from None
    if "://" not in url and not url.startswith("/"):
        # A relative URL such as `v1`: relative to where the document is served, which says nothing here.
        return "", "servers[0].url"
    return path, "servers[0].url"


def _normalize_base(raw: str, location: str) -> str:
    """ "" for no base path, else `/a/b` (leading slash, no trailing one)."""
    base = raw.strip()
    if base in ("", "/"):
        return ""
    if not base.startswith("/"):
        base = "/" + base
    base = base.rstrip("/")
    if any(c in base for c in "{}?#"):
        raise OpenApiError(
            f"{raw!r} is not a plain path such as /v1 (no parameters, query or fragment)", location=location
        )
    return base


def _join(base: str, path: str) -> str:
    if not base:
        return path
    return base if path == "/" else base + path


# --- one operation -------------------------------------------------------------------------------------------


def _route(
    op: dict[str, Any],
    oloc: str,
    key: str,
    doc: dict[str, Any],
    stage_variables: dict[str, str],
    options: ImportOptions,
    warnings: list[str],
) -> _Route | None:
    method = None if key == ANY_METHOD else key.upper()
    ext = _route_extensions(op, oloc)
    route = _operation_route(op, oloc, method, doc, stage_variables, options, warnings, ext)
    if route is None:
        return None
    route.index = ext.get(X_ROUTE)
    route.methods = ext.get(X_METHODS)
    route.prefix = ext.get(X_PREFIX)
    for name, value in ext.get(X_OPTIONS, {}).items():
        route.options[name] = copy.deepcopy(value)
        route.fields[f"options.{name}"] = f"{oloc}.{X_OPTIONS}.{name}"
    for name in route.destination or {}:
        route.fields[f"destination.{name}"] = f"{oloc}.{X_DESTINATION}.{name}"
    return route


def _operation_route(
    op: dict[str, Any],
    oloc: str,
    method: str | None,
    doc: dict[str, Any],
    stage_variables: dict[str, str],
    options: ImportOptions,
    warnings: list[str],
    ext: dict[str, Any],
) -> _Route | None:
    destination = ext.get(X_DESTINATION)
    if INTEGRATION in op:
        iloc = f"{oloc}.{INTEGRATION}"
        integration = _deref(op[INTEGRATION], doc, iloc)
        if not isinstance(integration, dict):
            raise OpenApiError(f"must be a mapping, got {_typename(integration)}", location=iloc)
        itype = integration.get("type")
        if itype is not None and not isinstance(itype, str):
            raise OpenApiError(f"must be a string, got {_typename(itype)}", location=f"{iloc}.type")
        itype = (itype or "").lower()
        if itype == "mock":
            if X_MOCK in ext:
                return _Route(
                    oloc, method, None, {}, copy.deepcopy(ext[X_MOCK]), {"mock": f"{oloc}.{X_MOCK}"}
                )
            mock, mock_fields = _mock(integration, iloc, doc, warnings)
            return _Route(oloc, method, None, {}, mock, mock_fields)
        if itype in ("http", "http_proxy"):
            raise _Unsupported(
                f"an {itype} integration does not invoke Lambda; lambdagate routes to Lambda only"
            )
        if itype not in ("", "aws", "aws_proxy"):
            raise OpenApiError(
                f"unknown integration type {itype!r} (aws_proxy, aws, http, http_proxy or mock)",
                location=f"{iloc}.type",
            )
        if integration.get("integrationSubtype"):
            raise _Unsupported(
                f"an {integration['integrationSubtype']} integration does not invoke Lambda; "
                "lambdagate routes to Lambda only"
            )
        if destination is not None:
            # lambdagate's own destination says which function; the uri (if any) only where, for the region.
            target = _soft_target(integration.get("uri"), f"{iloc}.uri", stage_variables)
        else:
            target = _target_from_uri(integration.get("uri"), f"{iloc}.uri", stage_variables)
        mapping: dict[str, Any] | None = None
        fields: dict[str, str] = {}
        if itype == "aws":
            if X_INTEGRATION in ext:
                mapping = copy.deepcopy(ext[X_INTEGRATION])
                fields["integration"] = f"{oloc}.{X_INTEGRATION}"
            elif not any(k in integration for k in ("requestTemplates", "responses", "passthroughBehavior")):
                raise _Unsupported(
                    "a non-proxy Lambda integration (type aws) needs mapping templates (requestTemplates or "
                    "responses); give them, or use type aws_proxy"
                )
            else:
                mapping = _aws_integration(
                    integration, iloc, doc, warnings, jinja=doc.get(X_TEMPLATES) == "jinja2"
                )
                fields["integration"] = iloc
        for name in IGNORED_INTEGRATION_FIELDS:
            if integration.get(name):
                warnings.append(f"{iloc}.{name}: not applied by lambdagate; ignored")
        opts: dict[str, Any] = dict(_route_options(integration, iloc))
        if mapping is not None and opts.pop("payload_format", None) is not None:
            warnings.append(
                f"{iloc}.payloadFormatVersion: a non-proxy integration builds its own payload; ignored"
            )
        return _Route(oloc, method, target, opts, fields=fields, destination=destination, integration=mapping)
    if destination is not None:
        return _Route(oloc, method, None, {}, destination=destination)
    op_id = op.get("operationId")
    if op_id is not None:
        where = f"{oloc}.operationId"
        if not isinstance(op_id, str) or not FUNCTION_BASE_NAME_RE.fullmatch(op_id):
            raise OpenApiError(
                f"{op_id!r} cannot name a Lambda function (letters, digits, '-' and '_', at most 64); "
                f"give the operation an {INTEGRATION} with the function's ARN",
                location=where,
            )
        return _Route(oloc, method, _Target(op_id, None, None, op_id, where), {})
    if options.skip_unnamed:
        warnings.append(f"{oloc}: skipped: names no function (no {INTEGRATION}, no operationId)")
        return None
    raise OpenApiError(
        f"names no function: give it an {INTEGRATION} with a Lambda uri, or an operationId "
        "(--skip-unnamed skips such operations)",
        location=oloc,
    )


def _mock(
    integration: dict[str, Any], iloc: str, doc: dict[str, Any], warnings: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """A mock integration's route `mock` (status, headers, body), and where each of its fields comes from.

    The integration response is API Gateway's choice for a mock: the one whose selection pattern matches the
    status code the request template sets, else `default`, else the only one. Its `statusCode` is the status,
    its quoted-literal `method.response.header.*` parameters the headers, and its `application/json` template
    (else the first) the body, as written: templates are not evaluated.
    """
    rloc = f"{iloc}.responses"
    responses = _deref(integration.get("responses"), doc, rloc)
    if responses is None:
        return {"status": 200}, {}
    if not isinstance(responses, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(responses)}", location=rloc)
    key = _mock_response_key(integration, responses, iloc, warnings)
    if key is None:
        return {"status": 200}, {}
    rloc = f"{rloc}.{key}"
    response = _deref(responses[key], doc, rloc)
    if response is None:
        response = {}
    if not isinstance(response, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(response)}", location=rloc)
    fields: dict[str, str] = {}

    status: Any = response.get("statusCode", 200)
    if isinstance(status, str) and status.strip().isdigit():
        status = int(status.strip())
    if isinstance(status, bool) or not isinstance(status, int):
        raise OpenApiError(
            f"must be an HTTP status code such as 200, got {status!r}", location=f"{rloc}.statusCode"
        )
    fields["mock.status"] = f"{rloc}.statusCode"

    headers: dict[str, str] = {}
    for name, value, where in _response_headers(response, rloc, warnings):
        headers[name] = value
        fields[f"mock.headers.{name}"] = where

    templates = response.get("responseTemplates") or {}
    tloc = f"{rloc}.responseTemplates"
    if not isinstance(templates, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(templates)}", location=tloc)
    if templates:
        content_type = "application/json" if "application/json" in templates else next(iter(templates))
        tloc = f"{tloc}.{content_type}"
        body = templates[content_type]
        if body is None:
            body = ""
        if not isinstance(body, str):
            raise OpenApiError(f"must be a string (a mapping template), got {_typename(body)}", location=tloc)
        if VELOCITY_RE.search(body):
            warnings.append(
                f"{tloc}: a Velocity template ($ references or # directives); lambdagate does not evaluate "
                "templates, so the mock answers it as written"
            )
        if not any(name.lower() == "content-type" for name in headers):
            headers["content-type"] = str(content_type)
    else:
        body = ""
    mock: dict[str, Any] = {"status": status}
    if headers:
        mock["headers"] = headers
    if body:
        mock["body"] = body
        fields["mock.body"] = tloc
    return mock, fields


def _response_headers(response: dict[str, Any], rloc: str, warnings: list[str]) -> list[tuple[str, str, str]]:
    """An integration response's headers: its quoted-literal `method.response.header.*` parameters, as
    (name, value, where)."""
    out: list[tuple[str, str, str]] = []
    ploc = f"{rloc}.responseParameters"
    parameters = response.get("responseParameters") or {}
    if not isinstance(parameters, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(parameters)}", location=ploc)
    for target, value in parameters.items():
        where = f"{ploc}.{target}"
        if not isinstance(target, str) or not target.startswith(RESPONSE_HEADER):
            warnings.append(f"{where}: not a response header (method.response.header.NAME); ignored")
            continue
        if not (isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == "'"):
            warnings.append(
                f"{where}: {value!r} is not a quoted literal such as \"'value'\"; lambdagate maps no "
                "integration, context or stage variable values; ignored"
            )
            continue
        out.append((target[len(RESPONSE_HEADER) :], value[1:-1], where))
    return out


def _mock_response_key(
    integration: dict[str, Any], responses: dict[Any, Any], iloc: str, warnings: list[str]
) -> Any:
    """Which of a mock integration's responses API Gateway answers with: its key (None: it has none)."""
    if not responses:
        return None
    status = _mock_request_status(integration)
    if status is not None:
        for key in responses:
            if key == "default":
                continue
            # The key is a selection pattern (a regular expression) matched against the status code; YAML reads
            # an unquoted 200 as a number.
            with contextlib.suppress(re.error):
                if re.fullmatch(str(key), status):
                    return key
    if "default" in responses:
        return "default"
    first = next(iter(responses))
    if len(responses) > 1:
        warnings.append(
            f"{iloc}.responses: none is `default` or matches the request template's statusCode; "
            f"the first, {first}, is used"
        )
    return first


def _mock_request_status(integration: dict[str, Any]) -> str | None:
    """The status code a mock's request template sets (`{"statusCode": 200}`), when it says one plainly."""
    templates = integration.get("requestTemplates")
    if not isinstance(templates, dict) or not templates:
        return None
    template = templates.get("application/json", next(iter(templates.values())))
    if not isinstance(template, str):
        return None
    m = re.search(r'"statusCode"\s*:\s*"?([0-9]{3})\b', template)
    return m.group(1) if m else None


def _cors(doc: dict[str, Any], warnings: list[str]) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """`x-amazon-apigateway-cors` (HTTP APIs) as a route's `options.cors`, and where each field comes from."""
    if CORS not in doc:
        return None, {}
    raw = _deref(doc[CORS], doc, CORS)
    if not isinstance(raw, dict):
        raise OpenApiError(f"must be a mapping of CORS settings, got {_typename(raw)}", location=CORS)
    by_lower = {name.lower(): name for name in CORS_FIELDS}
    cors: dict[str, Any] = {}
    # Where a field's error points: the setting as the document spells it, else (a missing one) as AWS does.
    fields = {"options.cors": CORS, **{f"options.cors.{o}": f"{CORS}.{n}" for n, o in CORS_FIELDS.items()}}
    for key, value in raw.items():
        where = f"{CORS}.{key}"
        name = by_lower.get(str(key).lower())
        if name is None:
            warnings.append(f"{where}: not a CORS setting ({', '.join(CORS_FIELDS)}); ignored")
            continue
        option = CORS_FIELDS[name]
        if (
            option == "max_age"
            and isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value <= 0
        ):
            # API Gateway takes -1 for no caching; a browser's own default (5 seconds) is the nearest.
            warnings.append(f"{where}: {value} is not written: browsers then use their default (5 seconds)")
            continue
        cors[option] = value
        fields[f"options.cors.{option}"] = where
    return cors, fields


def _deref(value: Any, doc: dict[str, Any], location: str) -> Any:
    """Follow a local `$ref` (`#/components/x-amazon-apigateway-integrations/name`, as HTTP APIs use)."""
    seen: set[str] = set()
    while isinstance(value, dict) and "$ref" in value:
        ref = value["$ref"]
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise OpenApiError(
                f"only local references (#/...) are supported, got {ref!r}", location=f"{location}.$ref"
            )
        if ref in seen:
            raise OpenApiError(f"{ref!r} refers to itself", location=f"{location}.$ref")
        seen.add(ref)
        node: Any = doc
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise OpenApiError(f"{ref!r} points at nothing in the document", location=f"{location}.$ref")
        value = node
    return value


def _target_from_uri(uri: Any, location: str, stage_variables: dict[str, str]) -> _Target:
    if isinstance(uri, dict):
        raise OpenApiError(
            f"is a CloudFormation expression ({', '.join(map(str, uri))}); give the resolved ARN as a string",
            location=location,
        )
    if not isinstance(uri, str) or not uri.strip():
        raise OpenApiError(
            "missing: a Lambda integration needs the function's invocation URI", location=location
        )
    text = uri.strip()

    def stage_variable(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in stage_variables:
            raise OpenApiError(
                f"uses ${{stageVariables.{name}}}, which API Gateway resolves per stage at request time; "
                f"give its value with --stage-variable {name}=VALUE",
                location=location,
            )
        return stage_variables[name]

    text = STAGE_VARIABLE_RE.sub(stage_variable, text)
    unresolved = SUBSTITUTION_RE.search(text)
    if unresolved:
        raise OpenApiError(
            f"holds {unresolved.group(0)}, which lambdagate cannot resolve (a CloudFormation Fn::Sub?); "
            "give the resolved Lambda ARN",
            location=location,
        )
    invoke = INVOKE_URI_RE.fullmatch(text)
    arn = invoke.group("arn") if invoke else text
    m = LAMBDA_ARN_RE.fullmatch(arn)
    if m is None:
        if invoke or ":lambda:" in text:
            raise OpenApiError(
                f"{uri!r} is not a Lambda invocation URI "
                "(arn:aws:apigateway:REGION:lambda:path/2015-03-31/functions/FUNCTION_ARN/invocations) "
                "or a function ARN (arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER])",
                location=location,
            )
        raise _Unsupported(f"the integration uri {uri!r} does not invoke a Lambda function")
    function_name = f"arn:{m['partition']}:lambda:{m['region']}:{m['account']}:function:{m['name']}"
    qualifier = m["qualifier"]
    if qualifier == LATEST:
        qualifier = None  # the same function as no qualifier at all
    hint = f"{m['name']}:{qualifier}" if qualifier else m["name"]
    return _Target(function_name, qualifier, m["region"], hint, location)


def _route_options(integration: dict[str, Any], iloc: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    if integration.get("payloadFormatVersion") is not None:
        raw = integration["payloadFormatVersion"]
        version = _version_text(raw)
        if version == "2.0":
            opts["payload_format"] = "apigateway-v2"
        elif version != "1.0":
            raise OpenApiError(f"must be 1.0 or 2.0, got {raw!r}", location=f"{iloc}.payloadFormatVersion")
    if integration.get("timeoutInMillis") is not None:
        raw = integration["timeoutInMillis"]
        where = f"{iloc}.timeoutInMillis"
        if isinstance(raw, str) and raw.strip().isdigit():
            raw = int(raw.strip())
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise OpenApiError(f"must be a whole number of milliseconds, got {raw!r}", location=where)
        if not 0 < raw <= MAX_TIMEOUT_MS:
            raise OpenApiError(
                f"must be 1 to {MAX_TIMEOUT_MS} (Lambda's 15 minutes), got {raw}", location=where
            )
        opts["timeout"] = f"{raw}ms"
    return opts


# --- lambdagate's own extensions -----------------------------------------------------------------------------


@dataclass
class _DocumentExtensions:
    """What `lambdagate export-openapi` wrote at the top of the document."""

    name: str | None = None
    namespace: str | None = None
    domains: list[str] | None = None
    stage: str | None = None
    stage_variables: dict[str, str] = field(default_factory=dict)
    region: str | None = None
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)


def _ext_mapping(container: dict[str, Any], key: str, location: str | None = None) -> dict[str, Any]:
    value = container.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(value)}", location=location or key)
    return value


def _ext_str(value: Any, location: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise OpenApiError(f"must be a string, got {_typename(value)}", location=location)
    return value


def _document_extensions(doc: dict[str, Any]) -> _DocumentExtensions:
    ext = _DocumentExtensions()
    vs = _ext_mapping(doc, X_VIRTUAL_SERVICE)
    ext.name = _ext_str(vs.get("name"), f"{X_VIRTUAL_SERVICE}.name")
    ext.namespace = _ext_str(vs.get("namespace"), f"{X_VIRTUAL_SERVICE}.namespace")
    if X_DOMAINS in doc:
        domains = doc[X_DOMAINS]
        if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains):
            raise OpenApiError("must be a list of host names", location=X_DOMAINS)
        ext.domains = list(domains)
    stage = _ext_mapping(doc, X_STAGE)
    ext.stage = _ext_str(stage.get("name"), f"{X_STAGE}.name")
    for key, value in _ext_mapping(stage, "variables", f"{X_STAGE}.variables").items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise OpenApiError(
                f"must be a string, got {_typename(value)}", location=f"{X_STAGE}.variables.{key}"
            )
        ext.stage_variables[str(key)] = str(value)
    ext.region = _ext_str(doc.get(X_REGION), X_REGION)
    for name, spec in _ext_mapping(doc, X_FUNCTIONS).items():
        if not isinstance(spec, dict) or not isinstance(spec.get("function_name"), str):
            raise OpenApiError(
                "must be a mapping {function_name, qualifier} (the function this logical name invokes)",
                location=f"{X_FUNCTIONS}.{name}",
            )
        ext.functions[str(name)] = spec
    return ext


def _with_document_defaults(options: ImportOptions, ext: _DocumentExtensions) -> ImportOptions:
    """The options, with what the document's extensions say where no flag does."""
    variables = {**ext.stage_variables, **dict(options.stage_variables)}
    namespace = options.namespace
    if namespace is None and ext.namespace and ext.namespace != DEFAULT_NAMESPACE:
        namespace = ext.namespace
    return replace(
        options,
        name=options.name or ext.name,
        namespace=namespace,
        domains=options.domains or tuple(ext.domains or ()),
        stage_variables=tuple(sorted(variables.items())),
    )


def _route_extensions(op: dict[str, Any], oloc: str) -> dict[str, Any]:
    """An operation's x-lambdagate-* extensions, checked for their shape (the model's parser checks the rest)."""
    out: dict[str, Any] = {}
    for key in (X_ROUTE, X_METHODS, X_PREFIX, X_DESTINATION, X_OPTIONS, X_MOCK, X_INTEGRATION):
        if key not in op:
            continue
        value, where = op[key], f"{oloc}.{key}"
        if key == X_ROUTE:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise OpenApiError(f"must be a route's index (0, 1, ...), got {value!r}", location=where)
        elif key == X_METHODS:
            if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
                raise OpenApiError("must be a list of HTTP methods", location=where)
        elif key == X_PREFIX:
            if not isinstance(value, str) or not value.startswith("/"):
                raise OpenApiError(f"must be a path prefix such as /api, got {value!r}", location=where)
        elif not isinstance(value, dict):
            raise OpenApiError(f"must be a mapping, got {_typename(value)}", location=where)
        out[key] = copy.deepcopy(value)
    return out


def _by_index(items: list[_Path], warnings: list[str]) -> list[tuple[_Path, _Route]] | None:
    """The routes in the order of their x-lambdagate-route, the operations of one route merged back into it;
    None when the operations do not all have one (then API Gateway's order applies)."""
    placed = [(p, r) for p in items for r in p.routes]
    indexed = [r.index is not None for _, r in placed]
    if not any(indexed):
        return None
    if not all(indexed):
        warnings.append(
            f"{X_ROUTE} is on some operations only: routes are ordered as API Gateway would (most specific first)"
        )
        return None
    groups: dict[int, list[tuple[_Path, _Route]]] = {}
    for p, r in placed:
        assert r.index is not None
        groups.setdefault(r.index, []).append((p, r))
    out: list[tuple[_Path, _Route]] = []
    for index in sorted(groups):
        group = groups[index]
        first_path, first = group[0]
        if len(group) == 1:
            out.append(group[0])
        elif all(p is first_path and _route_key(r) == _route_key(first) for p, r in group[1:]):
            first.merged = [r.method for r in sorted((r for _, r in group), key=lambda r: r.position)]
            out.append(group[0])
        else:
            warnings.append(
                f"{first.location} and {group[1][1].location}: the same {X_ROUTE} ({index}) on operations that "
                "differ; imported as separate routes"
            )
            out.extend(group)
    return out


def _route_key(r: _Route) -> str:
    """What must be the same for operations to be one route (everything but the method)."""
    target = (r.target.function_name, r.target.qualifier) if r.target is not None else None
    parts = [target, r.options, r.mock, r.destination, r.auth, r.integration, r.prefix, r.methods]
    return json.dumps(parts, sort_keys=True, default=str)


def _group_methods(r: _Route) -> list[str]:
    methods = r.merged or [r.method]
    return [] if None in methods else [m for m in methods if m is not None]


def _soft_target(uri: Any, where: str, stage_variables: dict[str, str]) -> _Target | None:
    """The uri's function when it names one; else (a plain function name, as an export without --account-id
    writes) only its region."""
    if uri is None:
        return None
    try:
        return _target_from_uri(uri, where, stage_variables)
    except (OpenApiError, _Unsupported):
        m = (
            re.match(r"arn:aws[a-zA-Z-]*:apigateway:([a-z0-9-]+):lambda:", uri)
            if isinstance(uri, str)
            else None
        )
        return _Target("", None, m.group(1) if m else None, "", where)


def _destination_agrees(r: _Route, functions: dict[str, dict[str, Any]]) -> bool:
    """Whether x-lambdagate-destination names the function the uri does (someone may have edited the uri)."""
    dest, target = r.destination, r.target
    if dest is None or target is None or not target.function_name:
        return True
    if "function" in dest:
        spec = functions.get(str(dest["function"]))
        if spec is None:
            return True  # the check reports the unknown name
        return _same_function(target, spec.get("function_name"), spec.get("qualifier"))
    if "function_name" in dest:
        return _same_function(target, dest["function_name"], None)
    return True


def _same_function(target: _Target, function_name: Any, qualifier: Any) -> bool:
    if not isinstance(function_name, str):
        return True
    m = FUNCTION_NAME_RE.fullmatch(function_name)
    arn = LAMBDA_ARN_RE.fullmatch(target.function_name)
    if m is None or arn is None:
        return True
    q = m.group(9) or qualifier
    if q == LATEST:
        q = None
    if m.group(7) != arn["name"] or q != target.qualifier:
        return False
    region, account = (m.group(3) or "").rstrip(":"), (m.group(5) or "").rstrip(":")
    return (not region or region == arn["region"]) and (not account or account == arn["account"])


def _status(raw: Any, where: str) -> int:
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise OpenApiError(f"must be an HTTP status code such as 200, got {raw!r}", location=where)
    return raw


def _chosen_template(templates: Any, tloc: str, warnings: list[str], what: str) -> tuple[str, Any] | None:
    """(content type, template) of a template mapping: application/json's, else the first."""
    if not templates:
        return None
    if not isinstance(templates, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(templates)}", location=tloc)
    content_type = "application/json" if "application/json" in templates else next(iter(templates))
    if len(templates) > 1:
        warnings.append(f"{tloc}: lambdagate has one {what} template; {content_type}'s is used")
    body = templates[content_type]
    if body is not None and not isinstance(body, str):
        raise OpenApiError(
            f"must be a string (a mapping template), got {_typename(body)}", location=f"{tloc}.{content_type}"
        )
    return str(content_type), body


def _aws_integration(
    integration: dict[str, Any], iloc: str, doc: dict[str, Any], warnings: list[str], *, jinja: bool
) -> dict[str, Any]:
    """A non-proxy (type aws) integration as the route's `integration`: the request template, and the responses
    keyed by selection pattern (`default`: the successful call's). lambdagate's templates are Jinja2: one that
    Velocity would evaluate ($input..., #set...) is unsupported, unless the document says its templates are
    lambdagate's (x-lambdagate-templates: jinja2, as an export does)."""

    def velocity(text: str, where: str) -> None:
        if not jinja and VELOCITY_RE.search(text):
            raise _Unsupported(
                f"{where} is a Velocity template; lambdagate's mapping templates are Jinja2, so rewrite it"
            )

    out: dict[str, Any] = {}
    tloc = f"{iloc}.requestTemplates"
    chosen = _chosen_template(
        _deref(integration.get("requestTemplates"), doc, tloc), tloc, warnings, "request"
    )
    if chosen is not None and chosen[1] is not None:
        out["request_template"] = chosen[1]
        velocity(chosen[1], f"{tloc}.{chosen[0]}")
    rloc = f"{iloc}.responses"
    responses = _deref(integration.get("responses"), doc, rloc) or {}
    if not isinstance(responses, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(responses)}", location=rloc)
    items: list[dict[str, Any]] = []
    for key, raw in responses.items():
        where = f"{rloc}.{key}"
        response = _deref(raw, doc, where) or {}
        if not isinstance(response, dict):
            raise OpenApiError(f"must be a mapping, got {_typename(response)}", location=where)
        item: dict[str, Any] = {"status": _status(response.get("statusCode", 200), f"{where}.statusCode")}
        if key != "default":
            item["pattern"] = str(key)
        tloc = f"{where}.responseTemplates"
        chosen = _chosen_template(response.get("responseTemplates"), tloc, warnings, "response")
        if chosen is not None:
            if chosen[1] is not None:
                item["template"] = chosen[1]
                velocity(chosen[1], f"{tloc}.{chosen[0]}")
            if chosen[0] != "application/json":
                item["content_type"] = chosen[0]
        headers = {name: value for name, value, _ in _response_headers(response, where, warnings)}
        if headers:
            item["headers"] = headers
        items.append(item)
    if items:
        out["responses"] = items
    return out


# --- security: API Gateway's authorizers and API keys ----------------------------------------------------------

_Requirement = tuple[str | None, tuple[str, ...], bool]  # authorizer, scopes, API key required
_OPEN: _Requirement = (None, (), False)


@dataclass
class _Scheme:
    """A security scheme, as lambdagate reads it."""

    kind: str  # jwt, lambda, api_key or unsupported
    location: str
    authorizer: str = ""  # its name in spec.authorizers
    spec: dict[str, Any] = field(default_factory=dict)  # its spec.authorizers entry (lambda: no function yet)
    target: _Target | None = None  # lambda: the function authorizerUri names
    destination: dict[str, Any] | None = None  # lambda: x-lambdagate-authorizer's function or function_name
    why: str = ""  # unsupported: why


@dataclass
class _Security:
    schemes: dict[str, _Scheme] = field(default_factory=dict)  # by the document's name
    api_keys: dict[str, Any] | None = None  # spec.api_keys
    base: _Requirement = _OPEN  # the document's `security`: every route's default
    base_unsupported: bool = False
    auth: dict[str, Any] = field(default_factory=dict)  # spec.auth


def _security(
    doc: dict[str, Any], is_swagger: bool, stage_variables: dict[str, str], warnings: list[str]
) -> _Security:
    """components.securitySchemes (securityDefinitions) as authorizers and API keys, and the document's own
    security requirement as spec.auth."""
    security = _Security()
    if is_swagger:
        where, raw = "securityDefinitions", doc.get("securityDefinitions")
    else:
        components = doc.get("components")
        where = "components.securitySchemes"
        raw = components.get("securitySchemes") if isinstance(components, dict) else None
    raw = _deref(raw, doc, where) or {}
    if not isinstance(raw, dict):
        raise OpenApiError(f"must be a mapping, got {_typename(raw)}", location=where)
    taken: set[str] = set()
    for name, item in raw.items():
        loc = f"{where}.{name}"
        scheme = _deref(item, doc, loc)
        if not isinstance(scheme, dict):
            raise OpenApiError(f"must be a mapping, got {_typename(scheme)}", location=loc)
        s = _scheme(scheme, loc, stage_variables, warnings)
        if s.kind in ("jwt", "lambda"):
            s.authorizer = _authorizer_name(str(name), taken)
            taken.add(s.authorizer)
        elif s.kind == "api_key" and X_API_KEYS in scheme:
            security.api_keys = copy.deepcopy(_ext_mapping(scheme, X_API_KEYS, f"{loc}.{X_API_KEYS}"))
        security.schemes[str(name)] = s
    if doc.get("security") is not None:
        security.base, security.base_unsupported = _requirement(
            doc["security"], "security", security, warnings
        )
    security.auth = _base_auth_doc(security.base)
    if X_AUTH in doc:
        ext = _ext_mapping(doc, X_AUTH)
        if _effective_auth(ext, _OPEN) == security.base:
            security.auth = copy.deepcopy(ext)
        else:
            warnings.append(f"{X_AUTH}: says other than `security`; `security` is used")
    return security


def _authorizer_name(name: str, taken: set[str]) -> str:
    """A name spec.authorizers accepts, made from a scheme's name."""
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-_")[:64].rstrip("-_") or "authorizer"
    if base == NO_AUTHORIZER:
        base = "none-authorizer"
    candidate, n = base, 1
    while candidate in taken:
        n += 1
        candidate = f"{base[:60].rstrip('-_')}-{n}"
    assert AUTHORIZER_NAME_RE.fullmatch(candidate), candidate
    return candidate


def _scheme(
    scheme: dict[str, Any], loc: str, stage_variables: dict[str, str], warnings: list[str]
) -> _Scheme:
    stype = str(scheme.get("type", "")).lower()
    authtype = str(scheme.get(AUTHTYPE, "")).lower()
    ext = _ext_mapping(scheme, X_AUTHORIZER, f"{loc}.{X_AUTHORIZER}")
    if AUTHORIZER in scheme:
        aloc = f"{loc}.{AUTHORIZER}"
        aws = _ext_mapping(scheme, AUTHORIZER, aloc)
        atype = str(aws.get("type", "")).lower()
        if atype == "jwt":
            return _jwt_scheme(aws, aloc, loc, ext, warnings)
        if atype in ("request", "token"):
            return _lambda_scheme(scheme, aws, atype, aloc, loc, ext, stage_variables, warnings)
        if atype == "cognito_user_pools":
            return _cognito_scheme(aws, aloc, loc, ext, warnings)
        return _Scheme("unsupported", loc, why=f"an authorizer of type {atype or 'none'}")
    if (
        stype == "apikey"
        and authtype not in ("custom", "awssigv4")
        and str(scheme.get("in", "")).lower() == "header"
        and str(scheme.get("name", "")).lower() == API_KEY_HEADER
    ):
        return _Scheme("api_key", loc)
    url = scheme.get("openIdConnectUrl")
    suffix = "/.well-known/openid-configuration"
    if stype == "openidconnect" and isinstance(url, str) and url.endswith(suffix):
        warnings.append(f"{loc}: an OpenID Connect scheme becomes a JWT authorizer with no audience check")
        return _jwt_scheme_of(url[: -len(suffix)], [], "authorization", None, ext, loc, warnings)
    why = "IAM (SigV4) authorization" if authtype == "awssigv4" else f"a {stype or 'typeless'} scheme"
    return _Scheme("unsupported", loc, why=why)


def _identity_sources(raw: Any, where: str, warnings: list[str]) -> list[tuple[str, str]]:
    """`method.request.header.Authorization, $request.querystring.token` as [(header, Authorization), ...]."""
    if raw is None:
        return []
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list):
        raise OpenApiError(f"must be a string or a list, got {_typename(raw)}", location=where)
    out: list[tuple[str, str]] = []
    for item in items:
        text = str(item).strip()
        m = IDENTITY_RE.fullmatch(text)
        if m is None:
            warnings.append(f"{where}: {text!r} is not a header or query string parameter; ignored")
            continue
        out.append(("header" if m.group(1) == "header" else "query", m.group(2)))
    return out


def _jwt_scheme(
    aws: dict[str, Any], aloc: str, loc: str, ext: dict[str, Any], warnings: list[str]
) -> _Scheme:
    config = _ext_mapping(aws, "jwtConfiguration", f"{aloc}.jwtConfiguration")
    issuer = config.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        raise OpenApiError("missing: the JWT issuer", location=f"{aloc}.jwtConfiguration.issuer")
    audience = config.get("audience") or []
    if isinstance(audience, str):
        audience = [audience]
    if not isinstance(audience, list):
        raise OpenApiError("must be a list", location=f"{aloc}.jwtConfiguration.audience")
    sources = _identity_sources(aws.get("identitySource"), f"{aloc}.identitySource", warnings)
    headers = [name for kind, name in sources if kind == "header"]
    queries = [name for kind, name in sources if kind == "query"]
    if len(headers) > 1 or len(queries) > 1:
        warnings.append(
            f"{aloc}.identitySource: lambdagate reads the token from the first header (or query) only"
        )
    header = headers[0] if headers else "authorization"
    return _jwt_scheme_of(issuer, audience, header, queries[0] if queries else None, ext, loc, warnings)


def _jwt_scheme_of(
    issuer: str,
    audiences: list[Any],
    header: str,
    query: str | None,
    ext: dict[str, Any],
    loc: str,
    warnings: list[str],
    *,
    jwks: dict[str, Any] | None = None,
) -> _Scheme:
    spec: dict[str, Any] = {"type": "jwt", "issuer": issuer, "audiences": list(audiences)}
    if "jwks" in ext:
        jwks = ext["jwks"]
    elif jwks is None:
        jwks = {"uri": issuer.rstrip("/") + "/.well-known/jwks.json"}
        warnings.append(
            f"{loc}: no JWKS ({X_AUTHORIZER}.jwks): the keys are fetched from {jwks['uri']}, where Cognito "
            "and many issuers publish them; check it"
        )
    spec["jwks"] = copy.deepcopy(jwks)
    if header.lower() != "authorization":
        spec["header"] = header
    query = ext.get("query", query)
    if query:
        spec["query"] = query
    return _Scheme("jwt", loc, spec=spec)


def _cognito_scheme(
    aws: dict[str, Any], aloc: str, loc: str, ext: dict[str, Any], warnings: list[str]
) -> _Scheme:
    arns = aws.get("providerARNs")
    first = arns[0] if isinstance(arns, list) and arns else None
    m = COGNITO_POOL_RE.fullmatch(first) if isinstance(first, str) else None
    if m is None:
        return _Scheme("unsupported", loc, why="a Cognito authorizer with no user pool ARN")
    if isinstance(arns, list) and len(arns) > 1:
        warnings.append(f"{aloc}.providerARNs: lambdagate trusts the first user pool only")
    issuer = f"https://cognito-idp.{m['region']}.amazonaws.com/{m['pool']}"
    warnings.append(
        f"{aloc}: a Cognito user pool authorizer becomes a JWT authorizer for {issuer} (no audience check)"
    )
    sources = _identity_sources(aws.get("identitySource"), f"{aloc}.identitySource", warnings)
    header = next((name for kind, name in sources if kind == "header"), "authorization")
    jwks = {"uri": f"{issuer}/.well-known/jwks.json"}
    return _jwt_scheme_of(issuer, [], header, None, ext, loc, warnings, jwks=jwks)


def _lambda_scheme(
    scheme: dict[str, Any],
    aws: dict[str, Any],
    atype: str,
    aloc: str,
    loc: str,
    ext: dict[str, Any],
    stage_variables: dict[str, str],
    warnings: list[str],
) -> _Scheme:
    destination: dict[str, Any] | None = {
        k: ext[k] for k in ("function", "function_name") if k in ext
    } or None
    where = f"{aloc}.authorizerUri"
    if destination is not None:
        target = _soft_target(aws.get("authorizerUri"), where, stage_variables)
    else:
        try:
            target = _target_from_uri(aws.get("authorizerUri"), where, stage_variables)
        except _Unsupported as why:
            raise OpenApiError(str(why), location=where) from None
    sources = _identity_sources(aws.get("identitySource"), f"{aloc}.identitySource", warnings)
    if not sources:
        name, place = scheme.get("name"), str(scheme.get("in", "")).lower()
        if not isinstance(name, str) or place not in ("header", "query"):
            raise OpenApiError(
                "names no identity source (method.request.header.NAME)", location=f"{aloc}.identitySource"
            )
        sources = [(place, name)]
    spec: dict[str, Any] = {"type": "lambda", "identity_sources": [f"{k}:{n}" for k, n in sources]}
    if aws.get("authorizerResultTtlInSeconds") is not None:
        ttl = aws["authorizerResultTtlInSeconds"]
        if isinstance(ttl, str) and ttl.strip().isdigit():
            ttl = int(ttl)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= MAX_AUTHORIZER_TTL_S:
            raise OpenApiError(
                f"must be 0 to {MAX_AUTHORIZER_TTL_S} seconds, got {ttl!r}",
                location=f"{aloc}.authorizerResultTtlInSeconds",
            )
        spec["ttl"] = f"{ttl}s" if ttl else 0
    if "ttl" in ext:
        spec["ttl"] = ext["ttl"]
    if atype == "token":
        warnings.append(
            f"{aloc}.type: a TOKEN authorizer; lambdagate calls it with a REQUEST authorizer's event (headers, "
            "query string, methodArn), so check that the function reads its token from there"
        )
    return _Scheme("lambda", loc, spec=spec, target=target, destination=destination)


def _requirement(raw: Any, loc: str, security: _Security, warnings: list[str]) -> tuple[_Requirement, bool]:
    """A security requirement list as (authorizer, scopes, API key), and whether it names a scheme lambdagate
    does not import (which is then not enforced)."""
    if not isinstance(raw, list):
        raise OpenApiError(f"must be a list of security requirements, got {_typename(raw)}", location=loc)
    for n, alternative in enumerate(raw):
        if not isinstance(alternative, dict):
            raise OpenApiError("must be a mapping of scheme names to scopes", location=f"{loc}[{n}]")
    # None, or an empty requirement ({}) among them, makes authorization optional.
    if not raw or any(not alternative for alternative in raw):
        return _OPEN, False
    if len(raw) > 1:
        warnings.append(f"{loc}: {len(raw)} alternative requirements; lambdagate enforces the first only")
    authorizer: str | None = None
    scopes: tuple[str, ...] = ()
    api_key = False
    unsupported: list[str] = []
    for name, granted in raw[0].items():
        where = f"{loc}[0].{name}"
        s = security.schemes.get(str(name))
        if s is None or s.kind == "unsupported":
            unsupported.append(f"{name} ({s.why if s is not None else 'no such security scheme'})")
        elif s.kind == "api_key":
            api_key = True
        elif authorizer is not None:
            warnings.append(f"{where}: a route has one authorizer; {name} is not enforced")
        else:
            authorizer = s.authorizer
            if granted is not None and not (
                isinstance(granted, list) and all(isinstance(g, str) for g in granted)
            ):
                raise OpenApiError("must be a list of scopes", location=where)
            if granted and s.kind == "jwt":
                scopes = tuple(granted)
            elif granted:
                warnings.append(f"{where}: scopes are checked for JWT authorizers only; ignored")
    if unsupported and (authorizer is not None or api_key):
        warnings.append(f"{loc}[0]: not imported, so not enforced: {', '.join(unsupported)}")
        return (authorizer, scopes, api_key), False
    return (authorizer, scopes, api_key), bool(unsupported)


def _base_auth_doc(req: _Requirement) -> dict[str, Any]:
    """spec.auth for the document's security requirement."""
    out: dict[str, Any] = {}
    if req[0] is not None:
        out["authorizer"] = req[0]
    if req[1]:
        out["scopes"] = list(req[1])
    if req[2]:
        out["api_key_required"] = True
    return out


def _route_auth_doc(effective: _Requirement, base: _Requirement) -> dict[str, Any]:
    """routes[].auth: what differs from spec.auth (`base`), so that the route's requirement is `effective`."""
    out: dict[str, Any] = {}
    if effective[0] != base[0]:
        out["authorizer"] = effective[0] or NO_AUTHORIZER
    if effective[1] != base[1]:
        out["scopes"] = list(effective[1])
    if effective[2] != base[2]:
        out["api_key_required"] = effective[2]
    return out


def _effective_auth(auth: dict[str, Any], base: _Requirement) -> _Requirement:
    """The requirement an auth document (spec.auth or routes[].auth) makes over `base`."""
    authorizer = auth.get("authorizer", base[0])
    authorizer = None if authorizer in (None, NO_AUTHORIZER) else str(authorizer)
    scopes = auth.get("scopes")
    api_key = auth.get("api_key_required", base[2])
    # Scopes without an authorizer ask nothing (the model refuses them on a route).
    scopes = (tuple(scopes) if isinstance(scopes, list) else base[1]) if authorizer is not None else ()
    return authorizer, scopes, api_key is True


def _operation_auth(
    op: dict[str, Any], oloc: str, security: _Security, route: _Route, warnings: list[str]
) -> tuple[dict[str, Any], bool]:
    """The route's `auth`, and whether the operation asks for authorization lambdagate does not enforce."""
    unsupported = False
    raw = op.get("x-amazon-apigateway-auth")
    if raw and not (isinstance(raw, dict) and str(raw.get("type", "")).upper() == "NONE"):
        unsupported = True
    if op.get("security") is not None:
        effective, named = _requirement(op["security"], f"{oloc}.security", security, warnings)
    else:
        effective, named = security.base, security.base_unsupported
    unsupported = unsupported or named
    if route.is_mock:
        lambda_authorizer = any(
            s.kind == "lambda" and s.authorizer == effective[0] for s in security.schemes.values()
        )
        if lambda_authorizer or effective[2]:
            what = "its Lambda authorizer" if lambda_authorizer else "its API key requirement"
            warnings.append(f"{oloc}: a mock route is answered by Envoy itself: {what} does not apply to it")
            effective = (None, (), False) if lambda_authorizer else (effective[0], effective[1], False)
    auth = _route_auth_doc(effective, security.base)
    if X_AUTH in op:
        ext = _ext_mapping(op, X_AUTH, f"{oloc}.{X_AUTH}")
        if _effective_auth(ext, security.base) == effective:
            auth = copy.deepcopy(ext)
        else:
            warnings.append(f"{oloc}.{X_AUTH}: says other than the operation's security; security is used")
    if auth:
        route.fields["auth"] = f"{oloc}.security" if op.get("security") is not None else "security"
    return auth, unsupported


def _authorizer_docs(
    security: _Security, upstream: str, logical: dict[tuple[str, str | None], str]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in security.schemes.values():
        if s.kind == "jwt":
            out[s.authorizer] = copy.deepcopy(s.spec)
        elif s.kind == "lambda":
            spec: dict[str, Any] = {"type": "lambda", "upstream": upstream}
            if s.destination is not None:
                spec.update(copy.deepcopy(s.destination))
            elif s.target is not None:
                spec["function"] = logical[(s.target.function_name, s.target.qualifier)]
            spec.update({k: copy.deepcopy(v) for k, v in s.spec.items() if k != "type"})
            out[s.authorizer] = spec
    return out


# --- region and names ----------------------------------------------------------------------------------------


def _region(targets: list[_Target], options: ImportOptions, document_region: str | None) -> str:
    seen: dict[str, str] = {}  # region -> where first named
    for target in targets:
        if target.region is not None:
            seen.setdefault(target.region, target.location)
    if document_region is not None:
        seen.setdefault(document_region, X_REGION)
    if len(seen) > 1:
        listed = ", ".join(f"{region} ({where})" for region, where in seen.items())
        raise OpenApiError(
            f"the functions are in several regions: {listed}; an Upstream has one region, so import the "
            "operations of each region separately"
        )
    if options.region is not None:
        if seen and options.region not in seen:
            (region, where), *_ = seen.items()
            raise OpenApiError(
                f"{options.region!r} disagrees with the functions' ARNs, which are in {region} ({where})",
                location="--region",
            )
        return options.region
    if not seen:
        raise OpenApiError(
            "no function ARN says which AWS region the functions are in: give --region", location="--region"
        )
    return next(iter(seen))


def _slug(text: str) -> str:
    """A Kubernetes name (lower-case letters, digits and '-') from a title such as 'Swagger Petstore'."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:63].rstrip("-")


def _logical_name(hint: str, taken: set[str]) -> str:
    """A name LOGICAL_NAME_RE accepts, made from hint, not in taken (then `-2`, `-3`...)."""
    base = re.sub(r"[^A-Za-z0-9._:-]+", "-", hint).strip("._:-")[:128].rstrip("._:-") or "function"
    name, n = base, 1
    while name in taken:
        n += 1
        suffix = f"-{n}"
        name = base[: 128 - len(suffix)].rstrip("._:-") + suffix
    assert LOGICAL_NAME_RE.fullmatch(name), name
    return name


# --- route order ---------------------------------------------------------------------------------------------


def _segments(path: str) -> list[tuple[int, str]]:
    out: list[tuple[int, str]] = []
    for seg in path.split("/")[1:]:
        params = list(PARAM_RE.finditer(seg))
        if not params:
            out.append((_LITERAL, seg))
        elif any(p.group(2) for p in params):
            out.append((_GREEDY, seg))
        elif len(params) == 1 and params[0].group(0) == seg:
            out.append((_PARAM, seg))
        else:
            out.append((_MIXED, seg))
    return out


def _may_overlap(a: list[tuple[int, str]], b: list[tuple[int, str]]) -> bool:
    """Whether some request path could match both templates (conservative: True when unsure)."""
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b):
            return False
        (ka, sa), (kb, sb) = a[i], b[i]
        if _GREEDY in (ka, kb):
            return True
        if ka == _LITERAL and kb == _LITERAL and sa != sb:
            return False
    return True


def _specific_first(items: list[_Path]) -> list[_Path]:
    """Document order, except that a path comes before an earlier one that would otherwise shadow it.

    Envoy tries routes in order and the first match wins; API Gateway picks the most specific path. So where two
    paths can match the same request, the one whose segments are more specific from the left (literal, then a
    segment with a parameter inside, then a parameter, then a greedy parameter) goes first: `/pets/mine` before
    `/pets/{id}` before `/pets/{proxy+}`. Paths that cannot match the same request keep document order. The
    catch-all `$default` goes last.
    """
    # The prefix and regex routes of x-lambdagate-paths have no segments to compare: after the others.
    plain = [p for p in items if not p.catch_all and p.kind == "path"]
    others = [p for p in items if not p.catch_all and p.kind != "path"]
    segs = [_segments(p.matcher_path) for p in plain]
    ranks = [tuple(k for k, _ in s) for s in segs]
    preds = [0] * len(plain)
    succs: list[list[int]] = [[] for _ in plain]
    for i in range(len(plain)):
        for j in range(i + 1, len(plain)):
            if ranks[i] == ranks[j] or not _may_overlap(segs[i], segs[j]):
                continue
            first, then = (i, j) if ranks[i] < ranks[j] else (j, i)
            succs[first].append(then)
            preds[then] += 1
    # Kahn's algorithm (the edges only go from a lower rank to a higher one, so there is no cycle). Where there
    # is a choice, a path goes in the place of the earliest path it must precede, directly or not, else in its
    # own: `/pets/mine` takes the place of an earlier `/pets/{id}` instead of waiting behind unrelated paths.
    place: list[int | None] = [None] * len(plain)

    def earliest(i: int) -> int:
        found = place[i]
        if found is None:
            found = min([i, *(earliest(j) for j in succs[i])])
            place[i] = found
        return found

    ready = [(earliest(i), i) for i in range(len(plain)) if preds[i] == 0]
    heapq.heapify(ready)
    order: list[_Path] = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(plain[i])
        for j in succs[i]:
            preds[j] -= 1
            if preds[j] == 0:
                heapq.heappush(ready, (earliest(j), j))
    return order + others + [p for p in items if p.catch_all]


def _reorder_notes(items: list[_Path], ordered: list[_Path]) -> list[str]:
    notes: list[str] = []
    position = {id(p): n for n, p in enumerate(ordered)}
    for p in ordered:
        if p.catch_all or p.kind != "path":
            continue
        segs = _segments(p.matcher_path)
        passed = [
            q
            for q in items
            if q.index < p.index
            and position[id(q)] > position[id(p)]
            and not q.catch_all
            and q.kind == "path"
            and _may_overlap(segs, _segments(q.matcher_path))
        ]
        if passed:
            notes.append(
                f"{p.location} goes before {passed[0].location}, which would otherwise match its requests first"
            )
    return notes


def _unreachable_warnings(ordered: list[_Path]) -> list[str]:
    """Two templates that differ only in parameter names (`/pets/{id}`, `/pets/{petId}`) match the same requests."""
    warnings: list[str] = []
    seen: dict[tuple[str, str | None], str] = {}
    for p in ordered:
        if p.catch_all or p.kind != "path":
            shape = f"{'prefix' if p.catch_all else p.kind}:{p.matcher_path}"
        else:
            shape = PARAM_RE.sub(_shape_param, p.matcher_path)
        for r in p.routes:
            # An any-method route is compared with other any-method routes only: a method's route before it is
            # deliberate (see OPERATION_KEYS).
            earlier = seen.setdefault((shape, r.method), r.location)
            if earlier != r.location:
                warnings.append(f"{r.location}: never reached: {earlier} matches the same requests first")
    return warnings


def _shape_param(m: re.Match[str]) -> str:
    return "{+}" if m.group(2) else "{}"


# --- the check -----------------------------------------------------------------------------------------------


def _check(
    upstream: dict[str, Any] | None,
    virtual_service: dict[str, Any],
    options: ImportOptions,
    route_sources: list[tuple[str, dict[str, str]]],
    function_locations: list[str],
    security: _Security | None = None,
) -> None:
    """Parse and resolve what was built, exactly as the control plane will; errors name the document's place."""
    upstream_fields = {
        "metadata.name": "--upstream",
        "metadata.namespace": "--namespace",
        "spec.region": "--region",
        "spec.endpoint": "--endpoint",
        "spec.secret_ref": "--secret-ref",
    }
    vs_fields = {
        "metadata.name": "--name",
        "metadata.namespace": "--namespace",
        "spec.domains": "--domain",
        "spec.stage_variables": "--stage-variable",
        "spec.stage": X_STAGE,
        "spec.auth": "security",
    }
    for scheme in (security.schemes if security is not None else {}).values():
        if scheme.kind == "api_key":
            vs_fields["spec.api_keys"] = f"{scheme.location}.{X_API_KEYS}"
        elif scheme.kind != "unsupported":
            vs_fields[f"spec.authorizers.{scheme.authorizer}"] = scheme.location
    namespace = options.namespace or DEFAULT_NAMESPACE
    objects: list[Any] = []
    for doc, fields in ((upstream, upstream_fields), (virtual_service, vs_fields)):
        if doc is None:
            continue
        try:
            objects.append(parse_document(doc, default_namespace=namespace))
        except ConfigError as err:
            raise _locate(err, fields, route_sources, function_locations) from None
    if options.secret_ref and upstream is not None:
        # A stand-in for the user's Secret, which is not ours to write: only the references are checked here.
        stand_in = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": options.secret_ref, "namespace": namespace},
            "stringData": {"access_key": "stand-in", "secret_key": "stand-in"},
        }
        objects.append(parse_document(stand_in))
    api_keys = virtual_service["spec"].get("api_keys")
    if (
        isinstance(api_keys, dict)
        and isinstance(api_keys.get("secret_ref"), str)
        and api_keys["secret_ref"] != options.secret_ref
    ):
        # The same for the Secret holding the API keys.
        stand_in = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": api_keys["secret_ref"], "namespace": namespace},
            "stringData": {"stand-in": "stand-in"},
        }
        with contextlib.suppress(ConfigError):
            objects.append(parse_document(stand_in))
    resolved = resolve(objects, local_endpoint=Endpoint("http", "127.0.0.1", 9))
    for problem in resolved.errors.values():
        fields = upstream_fields if (problem.obj or "").startswith(KIND_UPSTREAM) else vs_fields
        raise _locate(problem, fields, route_sources, function_locations)


def _locate(
    err: ConfigError,
    fields: dict[str, str],
    route_sources: list[tuple[str, dict[str, str]]],
    function_locations: list[str],
) -> OpenApiError:
    field_path = err.field or ""
    m = re.match(r"spec\.routes\[([0-9]+)\]\.?(.*)", field_path)
    if m and int(m.group(1)) < len(route_sources):
        # The route's operation, or the document's own place for a field that came from one (mock.status is
        # the integration response's statusCode, options.cors.allow_origins is x-amazon-apigateway-cors's
        # allowOrigins).
        location, sources = route_sources[int(m.group(1))]
        rest = m.group(2)
        for prefix in sorted(sources, key=len, reverse=True):
            if rest == prefix or rest.startswith(prefix + ".") or rest.startswith(prefix + "["):
                return OpenApiError(err.message, location=sources[prefix] + rest[len(prefix) :])
        return OpenApiError(err.message, location=location)
    m = re.match(r"spec\.functions\[([0-9]+)\]", field_path)
    if m and int(m.group(1)) < len(function_locations):
        return OpenApiError(err.message, location=function_locations[int(m.group(1))])
    for prefix, option in fields.items():
        if field_path == prefix or field_path.startswith(prefix + ".") or field_path.startswith(prefix + "["):
            return OpenApiError(err.message, location=option)
    return OpenApiError(str(ConfigError(err.message, field=err.field)))


# --- the command ---------------------------------------------------------------------------------------------


def run(
    spec: str,
    output: str | None,
    options: ImportOptions,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`lambdagate import-openapi`: 0 when written (warnings on stderr), 2 with one line on stderr otherwise."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    source = "<stdin>" if spec == "-" else spec
    try:
        result = import_openapi(read_spec(spec), options)
    except OpenApiError as problem:
        for line in problem.warnings:
            err.write(f"warning: {source}: {line}\n")
        err.write(f"error: {source}: {problem}\n")
        return 2
    except RecursionError:
        err.write(f"error: {source}: the document is nested too deeply\n")
        return 2
    except Exception as bug:  # a bug of ours: still one line, never a traceback
        err.write(
            f"error: {source}: unexpected {type(bug).__name__}: {bug} (a bug in lambdagate; please report it)\n"
        )
        return 2
    for line in result.warnings:
        err.write(f"warning: {source}: {line}\n")
    for line in result.notes:
        err.write(f"note: {source}: {line}\n")
    text = result.to_yaml(source=os.path.basename(source))
    if output is None or output == "-":
        out.write(text)
        return 0
    try:
        _write_atomically(Path(output), text)
    except OSError as problem:
        err.write(f"error: {output}: cannot be written: {problem.strerror or problem}\n")
        return 2
    vs_name = result.virtual_service["metadata"]["name"]
    routes = _count(len(result.virtual_service["spec"]["routes"]), "route")
    if result.upstream is None:
        err.write(f"wrote {output}: VirtualService {vs_name} ({routes}, all mocks; no Upstream)\n")
        return 0
    err.write(
        f"wrote {output}: Upstream {result.upstream['metadata']['name']} "
        f"({_count(result.function_count, 'function')}), VirtualService {vs_name} ({routes})\n"
    )
    return 0


def _write_atomically(path: Path, text: str) -> None:
    """Replace path in one step: a control plane watching the folder never reads half a file. The temporary
    file's name starts with a dot and does not end in .yaml, so the folder's reader skips it."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _typename(value: Any) -> str:
    return {dict: "a mapping", list: "a list", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), "nothing" if value is None else type(value).__name__
    )


__all__ = ["ImportOptions", "ImportResult", "OpenApiError", "import_openapi", "load_spec", "read_spec", "run"]
