"""Turns an OpenAPI 3.x or Swagger 2.0 document into one Upstream and one VirtualService.

Like API Gateway's import: every path and method becomes a route; the function comes from the operation's
`x-amazon-apigateway-integration` (a Lambda invocation URI or function ARN) or else its `operationId`. A `mock`
integration becomes a mock route (its canned response, no function; with only mocks there is no Upstream), and
`x-amazon-apigateway-cors` becomes every route's `options.cors`. The documents built are checked with the model's
own parser and resolver before anything is written, so what is written is exactly what the control plane accepts.
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
from dataclasses import dataclass, field
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
    KIND_UPSTREAM,
    KIND_VIRTUAL_SERVICE,
    LATEST,
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
    target: _Target | None  # None: a mock route
    options: dict[str, str]
    mock: dict[str, Any] | None = None  # the route's `mock` (status, headers, body)
    # A field of the route document (`mock.status`) -> where in the document it comes from, for errors.
    fields: dict[str, str] = field(default_factory=dict)


@dataclass
class _Path:
    index: int  # document order
    location: str  # paths./pets
    matcher_path: str  # with the base path
    catch_all: bool  # HTTP APIs' $default: a prefix route, last
    routes: list[_Route] = field(default_factory=list)


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
    items = _collect(doc, base, options, warnings)
    cors, cors_fields = _cors(doc, warnings)
    ordered = _specific_first(items)
    notes = _reorder_notes(items, ordered)
    warnings.extend(_unreachable_warnings(ordered))

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
    all_routes = [r for p in items for r in p.routes]
    # Mock routes answer by themselves: with no function at all, there is no Upstream to write.
    needs_upstream = any(r.target is not None for r in all_routes)
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
    region = _region(all_routes, options) if needs_upstream else ""

    # One spec.functions entry per distinct function, in the document's order.
    logical: dict[tuple[str, str | None], str] = {}
    functions: list[dict[str, Any]] = []
    function_locations: list[str] = []
    for r in all_routes:
        if r.target is None:
            continue
        key = (r.target.function_name, r.target.qualifier)
        if key in logical:
            continue
        logical[key] = _logical_name(r.target.hint, set(logical.values()))
        fspec = {"function_name": r.target.function_name}
        if r.target.qualifier:
            fspec["qualifier"] = r.target.qualifier
        functions.append({"name": logical[key], "spec": fspec})
        function_locations.append(r.target.location)
    up_spec: dict[str, Any] = {"region": region}
    if options.secret_ref:
        up_spec["secret_ref"] = options.secret_ref
    if options.endpoint:
        up_spec["endpoint"] = options.endpoint
    up_spec["functions"] = functions

    route_docs: list[dict[str, Any]] = []
    route_sources: list[tuple[str, dict[str, str]]] = []
    for p in ordered:
        for r in p.routes:
            matcher: dict[str, Any] = {"prefix": p.matcher_path} if p.catch_all else {"path": p.matcher_path}
            if r.method is not None:
                matcher["methods"] = [r.method]
            rdoc: dict[str, Any] = {"matcher": matcher}
            if r.target is None:
                rdoc["mock"] = copy.deepcopy(r.mock)
            else:
                function = logical[(r.target.function_name, r.target.qualifier)]
                rdoc["destination"] = {"upstream": up_name, "function": function}
            route_options: dict[str, Any] = dict(r.options)
            if cors is not None:
                # A copy per route: one shared object would be written as YAML anchors and aliases.
                route_options["cors"] = copy.deepcopy(cors)
            if route_options:
                rdoc["options"] = route_options
            route_docs.append(rdoc)
            route_sources.append((r.location, {**r.fields, **cors_fields}))
    vs_spec: dict[str, Any] = {}
    if options.domains:
        vs_spec["domains"] = list(options.domains)
    if options.stage_variables:
        vs_spec["stage_variables"] = dict(sorted(options.stage_variables))
    vs_spec["routes"] = route_docs

    upstream = _document(KIND_UPSTREAM, up_name, options.namespace, up_spec) if needs_upstream else None
    virtual_service = _document(KIND_VIRTUAL_SERVICE, vs_name, options.namespace, vs_spec)
    _check(upstream, virtual_service, options, route_sources, function_locations)
    return ImportResult(upstream, virtual_service, version, warnings, notes)


def _collect(doc: dict[str, Any], base: str, options: ImportOptions, warnings: list[str]) -> list[_Path]:
    """The document's paths with the routes of their operations, in document order."""
    paths = doc.get("paths")
    if paths is None:
        raise OpenApiError("missing: the document has no operations to import", location="paths")
    if not isinstance(paths, dict):
        raise OpenApiError(
            f"must be a mapping of paths to operations, got {_typename(paths)}", location="paths"
        )
    stage_variables = dict(options.stage_variables)
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
        for key in item:
            if key not in OPERATION_KEYS and key not in PATH_ITEM_FIELDS and not str(key).startswith("x-"):
                warnings.append(f"{ploc}.{key}: not an operation lambdagate imports; ignored")
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
            if _requires_authorization(op, doc):
                secured.append(oloc)
            entry.routes.append(route)
        if entry.routes:
            items.append(entry)

    if secured:
        verb = "requires" if len(secured) == 1 else "require"
        warnings.append(
            f"{_count(len(secured), 'operation')} {verb} authorization (security or x-amazon-apigateway-auth), "
            f"first {secured[0]}; lambdagate has no authorizers yet, so these routes are open to anyone who "
            "can reach the gateway"
        )
    if not items:
        raise OpenApiError(
            "no operation to import: every operation was skipped", location="paths", warnings=warnings
        )
    return items


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
            mock, fields = _mock(integration, iloc, doc, warnings)
            return _Route(oloc, method, None, {}, mock, fields)
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
        target = _target_from_uri(integration.get("uri"), f"{iloc}.uri", stage_variables)
        if itype == "aws":
            raise _Unsupported(
                "a non-proxy Lambda integration (type aws) needs mapping templates, which lambdagate does not "
                "have; use type aws_proxy"
            )
        for name in IGNORED_INTEGRATION_FIELDS:
            if integration.get(name):
                warnings.append(f"{iloc}.{name}: not applied by lambdagate; ignored")
        return _Route(oloc, method, target, _route_options(integration, iloc))
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
        name = target[len(RESPONSE_HEADER) :]
        headers[name] = value[1:-1]
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


def _requires_authorization(op: dict[str, Any], doc: dict[str, Any]) -> bool:
    if op.get("x-amazon-apigateway-auth"):
        auth = op["x-amazon-apigateway-auth"]
        if not (isinstance(auth, dict) and str(auth.get("type", "")).upper() == "NONE"):
            return True
    security = op["security"] if "security" in op else doc.get("security")
    if not isinstance(security, list) or not security:
        return False
    # An empty requirement ({}) in the list makes authorization optional.
    return all(isinstance(req, dict) and req for req in security)


# --- region and names ----------------------------------------------------------------------------------------


def _region(routes: list[_Route], options: ImportOptions) -> str:
    seen: dict[str, str] = {}  # region -> where first named
    for r in routes:
        if r.target is not None and r.target.region is not None:
            seen.setdefault(r.target.region, r.target.location)
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
    plain = [p for p in items if not p.catch_all]
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
    return order + [p for p in items if p.catch_all]


def _reorder_notes(items: list[_Path], ordered: list[_Path]) -> list[str]:
    notes: list[str] = []
    position = {id(p): n for n, p in enumerate(ordered)}
    for p in ordered:
        if p.catch_all:
            continue
        segs = _segments(p.matcher_path)
        passed = [
            q
            for q in items
            if q.index < p.index
            and position[id(q)] > position[id(p)]
            and not q.catch_all
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
        shape = "prefix:" + p.matcher_path if p.catch_all else PARAM_RE.sub(_shape_param, p.matcher_path)
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
    }
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
