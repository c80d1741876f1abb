"""`lambdagate export-openapi`: an OpenAPI 3.0 document per VirtualService, in API Gateway's dialect.

Paths, methods and parameters from the matchers, an `x-amazon-apigateway-integration` per operation, security schemes
for the authorizers and API keys; what API Gateway cannot say goes into `x-lambdagate-*` extensions, which
`lambdagate import-openapi` reads back, so that an export imports as the same routes.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from controlplane.model.errors import ConfigError
from controlplane.model.parse import parse_document
from controlplane.model.resources import (
    API_GROUP,
    DEFAULT_NAMESPACE,
    FUNCTION_NAME_RE,
    KIND_VIRTUAL_SERVICE,
    PARAM_RE,
    Config,
    CorsPolicy,
    Destination,
    Integration,
    MockResponse,
    RateLimit,
    Route,
    RouteAuth,
    RouteOptions,
    Upstream,
    VirtualService,
    template_to_regex,
)
from controlplane.openapi import importer as imp
from controlplane.openapi.importer import (
    ANY_METHOD,
    API_KEY_HEADER,
    AUTHORIZER,
    AUTHTYPE,
    CORS,
    INTEGRATION,
    RESPONSE_HEADER,
    X_API_KEYS,
    X_AUTH,
    X_AUTHORIZER,
    X_DESTINATION,
    X_DOMAINS,
    X_FUNCTIONS,
    X_INTEGRATION,
    X_METHODS,
    X_MOCK,
    X_OPTIONS,
    X_PATHS,
    X_PREFIX,
    X_REGION,
    X_ROUTE,
    X_STAGE,
    X_TEMPLATES,
    X_VIRTUAL_SERVICE,
)

OPENAPI_VERSION = "3.0.3"
# OpenAPI's operations, in the order an export writes a route's methods. CONNECT has none.
METHOD_KEYS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
PAYLOAD_VERSIONS = {"apigateway-v1": "1.0", "apigateway-v2": "2.0"}
# A mock integration's request template: it selects the `default` response.
MOCK_REQUEST = '{"statusCode": 200}'
# JWK members that are private keys (RFC 7518 section 6): never exported. An `oct` key is a shared secret.
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
DEFAULT_JWKS_TIMEOUT_S, DEFAULT_JWKS_CACHE_S = 5.0, 300.0
ACCOUNT_RE = re.compile(r"[0-9]{12}")

_Requirement = tuple[str | None, tuple[str, ...], bool]


class ExportError(Exception):
    """A selection that names no VirtualService of the configuration."""


@dataclass(frozen=True)
class ExportOptions:
    # The AWS account of functions named without one (a name, or name:qualifier): with it, integration URIs hold
    # full ARNs, as API Gateway needs; without it, the name as lambdagate invokes it.
    account_id: str | None = None


def export(
    config: Config,
    virtual_services: Sequence[str] | None = None,
    options: ExportOptions | None = None,
    warnings: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """One OpenAPI document per VirtualService (all, or those named NAMESPACE/NAME or NAME), by NAMESPACE/NAME.

    What cannot be exported as it is (a regex matcher written as an extension, private JWKS keys left out...) is
    said in `warnings`."""
    options = options or ExportOptions()
    found: list[str] = [] if warnings is None else warnings
    return {
        f"{vs.namespace}/{vs.name}": _Exporter(config, vs, options, found).document()
        for vs in select(config, virtual_services)
    }


def select(config: Config, names: Sequence[str] | None) -> list[VirtualService]:
    """The VirtualServices named (NAMESPACE/NAME, or NAME in the default namespace); all of them for None."""
    if names is None:
        return list(config.virtual_services)
    chosen: list[VirtualService] = []
    for text in names:
        namespace, _, name = text.rpartition("/")
        namespace = namespace or DEFAULT_NAMESPACE
        vs = next((v for v in config.virtual_services if (v.namespace, v.name) == (namespace, name)), None)
        if vs is None:
            have = ", ".join(f"{v.namespace}/{v.name}" for v in config.virtual_services) or "none"
            raise ExportError(f"no VirtualService {namespace}/{name} (there are: {have})")
        chosen.append(vs)
    return chosen


class _Exporter:
    """One VirtualService's document."""

    def __init__(
        self, config: Config, vs: VirtualService, options: ExportOptions, warnings: list[str]
    ) -> None:
        self.config = config
        self.vs = vs
        self.options = options
        self.warnings = warnings
        self.where = f"VirtualService {vs.namespace}/{vs.name}"
        self.functions: dict[str, dict[str, Any]] = {}  # x-lambdagate-functions
        # A logical name -> (its Upstream's turn, its place in that Upstream's names).
        self.order: dict[str, tuple[int, int]] = {}
        self.positions: dict[tuple[str, str], dict[str, int]] = {}  # an Upstream -> its names' places
        self.regions: dict[str, str] = {}  # the Upstreams' regions -> an Upstream in it
        self.without_account: list[str] = []
        self.operation_ids: set[str] = set()
        self.templates = False
        taken = {a.name for a in vs.authorizers}
        self.api_key_scheme = next(
            n for n in ("api_key", "lambdagate_api_key", "lambdagate-api-key") if n not in taken
        )

    def warn(self, text: str, route: int | None = None) -> None:
        where = self.where if route is None else f"{self.where}: spec.routes[{route}]"
        self.warnings.append(f"{where}: {text}")

    # --- the document ----------------------------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        vs = self.vs
        schemes = self._security_schemes()
        cors = self._common_cors()
        paths, extra = self._paths(inline_cors=cors is None)
        base = self._requirement(vs.auth)

        doc: dict[str, Any] = {
            "openapi": OPENAPI_VERSION,
            "info": {
                "title": vs.name,
                "version": "1.0",
                "description": f"Exported by lambdagate from VirtualService {vs.namespace}/{vs.name}.",
            },
        }
        servers = [{"url": f"https://{domain}"} for domain in vs.domains if "*" not in domain]
        if servers:
            doc["servers"] = servers
        if base != (None, (), False):
            doc["security"] = self._security(base)
        if _route_auth(imp._base_auth_doc(base)) != vs.auth:
            doc[X_AUTH] = _auth_doc(vs.auth)
        doc["paths"] = paths
        if schemes:
            doc["components"] = {"securitySchemes": schemes}
        if cors is not None:
            doc[CORS] = _aws_cors(cors)
        doc[X_VIRTUAL_SERVICE] = {"name": vs.name, "namespace": vs.namespace}
        if vs.domains != ("*",):
            doc[X_DOMAINS] = list(vs.domains)
        stage: dict[str, Any] = {}
        if vs.stage != "$default":
            stage["name"] = vs.stage
        if vs.stage_variables:
            stage["variables"] = dict(vs.stage_variables)
        if stage:
            doc[X_STAGE] = stage
        if len(self.regions) == 1:
            doc[X_REGION] = next(iter(self.regions))
        elif len(self.regions) > 1:
            listed = ", ".join(f"{region} (Upstream {up})" for region, up in self.regions.items())
            self.warn(
                f"the functions are in several regions: {listed}; `lambdagate import-openapi` builds one Upstream, "
                "in one region, so it cannot import this document back as it is"
            )
        if self.functions:
            # In the Upstreams' own order, so that an import writes spec.functions in that order too.
            doc[X_FUNCTIONS] = {
                name: self.functions[name] for name in sorted(self.functions, key=lambda n: self.order[n])
            }
        if self.templates:
            doc[X_TEMPLATES] = "jinja2"
        if extra:
            doc[X_PATHS] = extra
        if self.without_account:
            names = ", ".join(sorted(set(self.without_account)))
            self.warn(
                f"functions named without an AWS account ({names}): their integration uri holds the name, not "
                "the function ARN API Gateway needs; give --account-id"
            )
        return doc

    # --- paths -----------------------------------------------------------------------------------------------

    def _paths(self, *, inline_cors: bool) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        paths: dict[str, dict[str, Any]] = {}
        shapes: dict[str, str] = {}  # a path with its parameters unnamed -> the path that has it
        extra: list[dict[str, Any]] = []
        for i, route in enumerate(self.vs.routes):
            m = route.matcher
            keys = _method_keys(m.methods)
            item: dict[str, Any]
            prefix = None
            if m.kind == "regex":
                self.warn(
                    f"a regex matcher ({m.value}) is no OpenAPI path: written under {X_PATHS}, which other "
                    "tools ignore",
                    i,
                )
                item = {"regex": m.value}
                extra.append(item)
                path = f"/route{i}"
            else:
                path = m.value if m.kind == "path" else m.resource
                existing = paths.get(path)
                clash = [k for k in keys if existing is not None and k in existing]
                # OpenAPI takes /pets/{id} and /pets/{petId} for one path, which only one key may name.
                twin = shapes.setdefault(PARAM_RE.sub("{}", path), path)
                problem = None
                if twin != path:
                    problem = f"OpenAPI takes it for {twin}"
                elif not _is_template(path):
                    problem = "it is no OpenAPI path"
                elif existing is not None and clash:
                    problem = f"its {clash[0]} operation is route {existing[clash[0]][X_ROUTE]}'s"
                if problem is not None:
                    self.warn(f"{path}: {problem}; written under {X_PATHS}, which other tools ignore", i)
                    item = {m.kind: m.value}
                    extra.append(item)
                else:
                    item = paths.setdefault(path, {})
                    prefix = m.value if m.kind == "prefix" else None
                params = [p.group(1) for p in PARAM_RE.finditer(path)] if _is_template(path) else []
                if params and "parameters" not in item:
                    item["parameters"] = [
                        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                        for name in params
                    ]
            operation = self._operation(i, route, inline_cors=inline_cors)
            derived = [] if ANY_METHOD in keys else [k.upper() for k in keys]
            if derived != list(m.methods):
                operation[X_METHODS] = list(m.methods)
            if prefix is not None:
                operation[X_PREFIX] = prefix
            for key in keys:
                item[key] = {"operationId": self._operation_id(key, path), **copy.deepcopy(operation)}
        return paths, extra

    def _operation_id(self, key: str, path: str) -> str:
        words = re.findall(r"[A-Za-z0-9]+", path)
        stem = ("any" if key == ANY_METHOD else key) + (
            "".join(w[:1].upper() + w[1:] for w in words) or "Root"
        )
        candidate, n = stem, 1
        while candidate in self.operation_ids:
            n += 1
            candidate = f"{stem}{n}"
        self.operation_ids.add(candidate)
        return candidate

    def _operation(self, i: int, route: Route, *, inline_cors: bool) -> dict[str, Any]:
        op: dict[str, Any] = {}
        effective = self._requirement(route.auth.over(self.vs.auth))
        base = self._requirement(self.vs.auth)
        if effective != base:
            op["security"] = self._security(effective)
        if _route_auth(imp._route_auth_doc(effective, base)) != route.auth:
            op[X_AUTH] = _auth_doc(route.auth)
        extensions: dict[str, Any] = {}
        if route.mock is not None:
            options = route.options
            op["responses"] = _method_responses(
                [(route.mock.status, route.mock.headers)], "The mock's answer"
            )
            op[INTEGRATION] = _mock_integration(route.mock)
            if _parsed_mock(op[INTEGRATION]) != route.mock:
                extensions[X_MOCK] = _mock_doc(route.mock)
        else:
            assert route.destination is not None
            up = self.config.upstream(route.destination.upstream_namespace, route.destination.upstream)
            options = route.options.over(up.options) if up is not None else route.options
            uri, destination = self._destination(route.destination, up, i)
            integration: dict[str, Any] = {
                "type": "aws" if route.integration is not None else "aws_proxy",
                "httpMethod": "POST",
            }
            if uri is not None:
                integration["uri"] = uri
            if route.integration is None:
                version = PAYLOAD_VERSIONS.get(options.payload_format or "apigateway-v1")
                if version is not None:
                    integration["payloadFormatVersion"] = version
                op["responses"] = {"default": {"description": "The function's answer"}}
            else:
                self.templates = True
                statuses = [(r.status, r.headers) for r in route.integration.responses]
                op["responses"] = _method_responses(statuses or [(200, ())], "Mapped by the integration")
                integration.update(_mapping_integration(route.integration))
                if _parsed_integration(integration) != route.integration:
                    extensions[X_INTEGRATION] = _integration_doc(route.integration)
            timeout = options.timeout_s
            if timeout is not None and _millis(timeout) is not None:
                integration["timeoutInMillis"] = _millis(timeout)
            op[INTEGRATION] = integration
            extensions[X_DESTINATION] = destination
        route_options = _options_doc(options, route, inline_cors=inline_cors)
        if route_options:
            extensions[X_OPTIONS] = route_options
        return {**op, X_ROUTE: i, **extensions}

    def _common_cors(self) -> CorsPolicy | None:
        """The CORS policy every route has (then x-amazon-apigateway-cors), else None."""
        policies = {self._effective_options(r).cors for r in self.vs.routes}
        return next(iter(policies)) if len(policies) == 1 else None

    def _effective_options(self, route: Route) -> RouteOptions:
        if route.destination is None:
            return route.options
        up = self.config.upstream(route.destination.upstream_namespace, route.destination.upstream)
        return route.options.over(up.options) if up is not None else route.options

    # --- functions -------------------------------------------------------------------------------------------

    def _destination(
        self, dest: Destination, up: Upstream | None, route: int | None
    ) -> tuple[str | None, dict[str, Any]]:
        """The integration uri (None: no one function), and x-lambdagate-destination."""
        if up is None:
            self.warn(f"Upstream {dest.upstream_namespace}/{dest.upstream} does not exist", route)
            return None, _destination_doc(dest)
        self.regions.setdefault(up.region, f"{up.namespace}/{up.name}")
        if dest.functions:
            choices: list[dict[str, Any]] = []
            for c in dest.functions:
                if c.function_name is not None:
                    choices.append({"function_name": c.function_name, "weight": c.weight})
                else:
                    self._register(up, c.function, route)
                    choices.append({"function": c.function, "weight": c.weight})
            # The heaviest choice is what API Gateway, which has no weights, would invoke.
            heaviest = max(dest.functions, key=lambda c: c.weight)
            return self._choice_uri(up, heaviest.function, heaviest.function_name), {"functions": choices}
        if dest.function_param is not None:
            for name in up.function_names():
                self._register(up, name, route)
            self.warn(
                f"function_param {dest.function_param!r}: API Gateway has no function chosen per request; the "
                "integration has no uri",
                route,
            )
            return None, {"function_param": dest.function_param}
        if dest.function_name is not None:
            return self._uri(up, dest.function_name, None), {"function_name": dest.function_name}
        fn = up.function(dest.function)
        if fn is None:
            return None, {"function": dest.function}
        if not self._register(up, dest.function, route):
            full = f"{fn.function_name}:{fn.qualifier}" if fn.qualifier else fn.function_name
            return self._uri(up, fn.function_name, fn.qualifier), {"function_name": full}
        return self._uri(up, fn.function_name, fn.qualifier), {"function": dest.function}

    def _choice_uri(self, up: Upstream, function: str, function_name: str | None) -> str | None:
        if function_name is not None:
            return self._uri(up, function_name, None)
        fn = up.function(function)
        return self._uri(up, fn.function_name, fn.qualifier) if fn is not None else None

    def _register(self, up: Upstream, name: str, route: int | None) -> bool:
        """Put a logical name into x-lambdagate-functions; False when it already names another function."""
        fn = up.function(name)
        if fn is None:
            return False
        spec: dict[str, Any] = {"function_name": fn.function_name}
        if fn.qualifier:
            spec["qualifier"] = fn.qualifier
        known = self.functions.setdefault(name, spec)
        if name not in self.order:
            key = (up.namespace, up.name)
            if key not in self.positions:
                self.positions[key] = {n: i for i, n in enumerate(up.function_names())}
            self.order[name] = (list(self.positions).index(key), self.positions[key][name])
        if known != spec:
            self.warn(
                f"function {name!r} of Upstream {up.namespace}/{up.name} is another function than the {name!r} "
                "of another Upstream; it is exported by its Lambda name",
                route,
            )
            return False
        return True

    def _uri(self, up: Upstream, function_name: str, qualifier: str | None) -> str:
        """API Gateway's Lambda invocation URI: arn:aws:apigateway:REGION:lambda:path/.../FUNCTION_ARN/invocations."""
        m = FUNCTION_NAME_RE.fullmatch(function_name)
        assert m is not None, function_name  # the parser checked it
        partition = m.group(2) or "aws"
        region = (m.group(3) or "").rstrip(":") or up.region
        account = (m.group(5) or "").rstrip(":") or self.options.account_id
        qualifier = m.group(9) or qualifier
        suffix = f":{qualifier}" if qualifier else ""
        if account:
            arn = f"arn:{partition}:lambda:{region}:{account}:function:{m.group(7)}{suffix}"
        else:
            arn = f"{m.group(7)}{suffix}"
            self.without_account.append(m.group(7))
        return f"arn:{partition}:apigateway:{region}:lambda:path/2015-03-31/functions/{arn}/invocations"

    # --- security --------------------------------------------------------------------------------------------

    def _requirement(self, auth: RouteAuth) -> _Requirement:
        """(authorizer, scopes, API key required), as import-openapi reads it from a security requirement."""
        name = auth.effective_authorizer
        authorizer = self.vs.authorizer(name) if name is not None else None
        scopes = tuple(auth.scopes or ()) if authorizer is not None and authorizer.jwt is not None else ()
        return name, scopes, bool(auth.api_key_required)

    def _security(self, req: _Requirement) -> list[dict[str, list[str]]]:
        requirement: dict[str, list[str]] = {}
        if req[0] is not None:
            requirement[req[0]] = list(req[1])
        if req[2]:
            requirement[self.api_key_scheme] = []
        return [requirement] if requirement else []

    def _security_schemes(self) -> dict[str, Any]:
        vs = self.vs
        schemes: dict[str, Any] = {}
        for a in vs.authorizers:
            if a.jwt is not None:
                jwt = a.jwt
                lambdagate: dict[str, Any] = {}
                jwks = self._jwks(a.name)
                if jwks is not None:
                    lambdagate["jwks"] = jwks
                if jwt.query:
                    lambdagate["query"] = jwt.query
                schemes[a.name] = {
                    "type": "oauth2",
                    "flows": {},
                    AUTHORIZER: {
                        "type": "jwt",
                        "identitySource": f"$request.header.{_header_name(jwt.header)}",
                        "jwtConfiguration": {"issuer": jwt.issuer, "audience": list(jwt.audiences)},
                    },
                    X_AUTHORIZER: lambdagate,
                }
            elif a.function is not None:
                f = a.function
                up = self.config.upstream(f.destination.upstream_namespace, f.destination.upstream)
                uri, destination = self._destination(f.destination, up, None)
                kind, first = f.identity_sources[0]
                aws: dict[str, Any] = {"type": "request"}
                if uri is not None:
                    aws["authorizerUri"] = uri
                aws["identitySource"] = ", ".join(
                    f"method.request.header.{_header_name(n)}"
                    if k == "header"
                    else f"method.request.querystring.{n}"
                    for k, n in f.identity_sources
                )
                aws["authorizerResultTtlInSeconds"] = round(f.ttl_s)
                lambdagate = dict(destination)
                if round(f.ttl_s) != f.ttl_s:
                    lambdagate["ttl"] = _duration(f.ttl_s)
                schemes[a.name] = {
                    "type": "apiKey",
                    "name": _header_name(first) if kind == "header" else first,
                    "in": kind,
                    AUTHTYPE: "custom",
                    AUTHORIZER: aws,
                    X_AUTHORIZER: lambdagate,
                }
        wants_keys = vs.auth.api_key_required or any(r.auth.api_key_required for r in vs.routes)
        if vs.api_keys is not None or wants_keys:
            scheme: dict[str, Any] = {"type": "apiKey", "name": API_KEY_HEADER, "in": "header"}
            if vs.api_keys is not None:
                keys: dict[str, Any] = {"secret_ref": vs.api_keys.secret_ref}
                if vs.api_keys.rate_limit is not None:
                    keys["rate_limit"] = _rate_limit_doc(vs.api_keys.rate_limit)
                if vs.api_keys.limits:
                    keys["limits"] = {name: _rate_limit_doc(limit) for name, limit in vs.api_keys.limits}
                scheme[X_API_KEYS] = keys
            schemes[self.api_key_scheme] = scheme
        return schemes

    def _jwks(self, name: str) -> dict[str, Any] | None:
        """Where a JWT authorizer's keys come from; an inline JWKS without its private members, if it has any."""
        authorizer = self.vs.authorizer(name)
        assert authorizer is not None and authorizer.jwt is not None
        jwks = authorizer.jwt.jwks
        out: dict[str, Any] = {}
        if jwks.uri:
            out["uri"] = jwks.uri
        elif jwks.file:
            out["file"] = jwks.file
        elif jwks.inline:
            public = _public_jwks(jwks.inline)
            if public is None:
                self.warn(
                    f"authorizer {name}: its inline JWKS holds only secret keys, which are never exported; "
                    "import reads the keys from the issuer's /.well-known/jwks.json unless jwks is added"
                )
                return None
            if public != jwks.inline:
                self.warn(
                    f"authorizer {name}: private and shared-secret keys of its inline JWKS are left out"
                )
            out["inline"] = public
        if jwks.timeout_s != DEFAULT_JWKS_TIMEOUT_S:
            out["timeout"] = _duration(jwks.timeout_s)
        if jwks.cache_s != DEFAULT_JWKS_CACHE_S:
            out["cache_duration"] = _duration(jwks.cache_s)
        return out


# --- pieces ----------------------------------------------------------------------------------------------------


def _method_keys(methods: tuple[str, ...]) -> list[str]:
    """A route's operations: one per method (GET admits HEAD, so HEAD with GET is no operation of its own); the
    any-method operation for none, or for methods OpenAPI has no operation for (CONNECT)."""
    if not methods:
        return [ANY_METHOD]
    keys = [m.lower() for m in methods if m.lower() in METHOD_KEYS and not (m == "HEAD" and "GET" in methods)]
    return keys or [ANY_METHOD]


def _is_template(path: str) -> bool:
    try:
        template_to_regex(path)
    except ValueError:
        return False
    return path.startswith("/")


def _header_name(name: str) -> str:
    """`authorization` as `Authorization`: how API Gateway's documents spell headers (they match in any case)."""
    return "-".join(part[:1].upper() + part[1:] for part in name.split("-"))


def _millis(seconds: float) -> int | None:
    """timeoutInMillis for a timeout, when whole milliseconds say it exactly."""
    ms = round(seconds * 1000)
    return ms if 1 <= ms <= imp.MAX_TIMEOUT_MS and ms * 0.001 == seconds else None


def _duration(seconds: float) -> str:
    """A duration the model reads back as exactly `seconds`."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    text = repr(float(seconds))
    return f"{text}s" if "e" not in text else f"{seconds:.20f}".rstrip("0") + "s"


def _rate_limit_doc(limit: RateLimit) -> dict[str, Any]:
    return {"requests": limit.requests, "per": _duration(limit.per_s), "burst": limit.burst}


def _cors_doc(cors: CorsPolicy) -> dict[str, Any]:
    """A route's options.cors."""
    out: dict[str, Any] = {"allow_origins": list(cors.allow_origins)}
    for name in ("allow_methods", "allow_headers", "expose_headers"):
        if getattr(cors, name):
            out[name] = list(getattr(cors, name))
    if cors.max_age_s is not None:
        out["max_age"] = cors.max_age_s
    if cors.allow_credentials:
        out["allow_credentials"] = True
    return out


def _aws_cors(cors: CorsPolicy) -> dict[str, Any]:
    """x-amazon-apigateway-cors (HTTP APIs)."""
    fields = {option: name for name, option in imp.CORS_FIELDS.items()}
    return {fields[k]: v for k, v in _cors_doc(cors).items()}


def _options_doc(options: RouteOptions, route: Route, *, inline_cors: bool) -> dict[str, Any]:
    """x-lambdagate-options: the route's (effective) options that the integration has no field for."""
    out: dict[str, Any] = {}
    if route.mock is None:
        if options.payload_format == "raw" and route.integration is None:
            out["payload_format"] = "raw"
        if options.invocation_type is not None:
            out["invocation_type"] = options.invocation_type
        if options.timeout_s is not None and _millis(options.timeout_s) is None:
            out["timeout"] = _duration(options.timeout_s)
        if options.max_retries is not None:
            out["max_retries"] = options.max_retries
        if options.errors is not None:
            out["errors"] = dict(options.errors)
        if options.log_tail is not None:
            out["log_tail"] = options.log_tail
    if options.rate_limit is not None:
        out["rate_limit"] = _rate_limit_doc(options.rate_limit)
    if inline_cors and options.cors is not None:
        out["cors"] = _cors_doc(options.cors)
    return out


def _destination_doc(dest: Destination) -> dict[str, Any]:
    if dest.function_name is not None:
        return {"function_name": dest.function_name}
    return {"function": dest.function}


def _route_auth(doc: dict[str, Any]) -> RouteAuth:
    scopes = doc.get("scopes")
    return RouteAuth(
        doc.get("authorizer"), tuple(scopes) if scopes is not None else None, doc.get("api_key_required")
    )


def _auth_doc(auth: RouteAuth) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if auth.authorizer is not None:
        out["authorizer"] = auth.authorizer
    if auth.scopes is not None:
        out["scopes"] = list(auth.scopes)
    if auth.api_key_required is not None:
        out["api_key_required"] = auth.api_key_required
    return out


def _method_responses(
    statuses: list[tuple[int, tuple[tuple[str, str], ...]]], description: str
) -> dict[str, Any]:
    """The operation's `responses`, with the headers its integration responses set (API Gateway wants them
    declared)."""
    out: dict[str, Any] = {}
    for status, headers in statuses:
        response = out.setdefault(str(status), {"description": description})
        for name, _ in headers:
            response.setdefault("headers", {})[name] = {"schema": {"type": "string"}}
    return out


def _response_parameters(headers: tuple[tuple[str, str], ...]) -> dict[str, str]:
    return {f"{RESPONSE_HEADER}{name}": f"'{value}'" for name, value in headers}


def _mock_integration(mock: MockResponse) -> dict[str, Any]:
    response: dict[str, Any] = {"statusCode": str(mock.status)}
    if mock.headers:
        response["responseParameters"] = _response_parameters(mock.headers)
    if mock.body:
        content_type = dict(mock.headers).get("content-type", "application/json")
        response["responseTemplates"] = {content_type: mock.body}
    return {
        "type": "mock",
        "requestTemplates": {"application/json": MOCK_REQUEST},
        "responses": {"default": response},
    }


def _mock_doc(mock: MockResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"status": mock.status}
    if mock.headers:
        out["headers"] = dict(mock.headers)
    if mock.body:
        out["body"] = mock.body
    return out


def _mapping_integration(integration: Integration) -> dict[str, Any]:
    """A non-proxy integration's templates and responses, as API Gateway writes them (keyed by selection pattern;
    a second response with the same pattern has no place: x-lambdagate-integration then says it)."""
    out: dict[str, Any] = {"passthroughBehavior": "when_no_match"}
    if integration.request_template is not None:
        out["requestTemplates"] = {"application/json": integration.request_template}
    responses: dict[str, Any] = {}
    for r in integration.responses:
        key = r.pattern if r.pattern is not None else "default"
        if key in responses:
            continue
        response: dict[str, Any] = {"statusCode": str(r.status)}
        if r.headers:
            response["responseParameters"] = _response_parameters(r.headers)
        if r.template is not None:
            response["responseTemplates"] = {r.content_type: r.template}
        responses[key] = response
    if responses:
        out["responses"] = responses
    return out


def _integration_doc(integration: Integration) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if integration.request_template is not None:
        out["request_template"] = integration.request_template
    responses = []
    for r in integration.responses:
        item: dict[str, Any] = {"status": r.status}
        if r.pattern is not None:
            item["pattern"] = r.pattern
        if r.template is not None:
            item["template"] = r.template
        if r.headers:
            item["headers"] = dict(r.headers)
        if r.content_type != "application/json":
            item["content_type"] = r.content_type
        responses.append(item)
    if responses:
        out["responses"] = responses
    return out


def _parsed_route(route: dict[str, Any]) -> Route | None:
    """A route document as the model reads it (None: it does not parse)."""
    doc = {
        "apiVersion": f"{API_GROUP}/v1",
        "kind": KIND_VIRTUAL_SERVICE,
        "metadata": {"name": "export-check"},
        "spec": {"routes": [route]},
    }
    try:
        vs = parse_document(doc)
    except ConfigError:
        return None
    return vs.routes[0] if isinstance(vs, VirtualService) else None


def _parsed_mock(integration: dict[str, Any]) -> MockResponse | None:
    """What import-openapi makes of a mock integration."""
    try:
        mock, _ = imp._mock(integration, INTEGRATION, {}, [])
    except imp.OpenApiError:
        return None
    route = _parsed_route({"matcher": {"path": "/"}, "mock": mock})
    return route.mock if route is not None else None


def _parsed_integration(integration: dict[str, Any]) -> Integration | None:
    """What import-openapi makes of a non-proxy integration."""
    try:
        mapping = imp._aws_integration(integration, INTEGRATION, {}, [], jinja=True)
    except imp.OpenApiError:
        return None
    route = _parsed_route(
        {"matcher": {"path": "/"}, "destination": {"upstream": "u", "function": "f"}, "integration": mapping}
    )
    return route.integration if route is not None else None


def _public_jwks(text: str) -> str | None:
    """The JWKS without private key members and shared-secret keys; the text itself when it has none, None when
    no key is left."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    keys = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(keys, list):
        return None
    public = []
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") == "oct":
            continue
        public.append({k: v for k, v in key.items() if k not in PRIVATE_JWK_MEMBERS})
    if public == keys:
        return text
    return json.dumps({**doc, "keys": public}) if public else None


# --- the command -----------------------------------------------------------------------------------------------


# libyaml's emitter when PyYAML has it: ten times faster on a VirtualService of thousands of routes.
_BaseDumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_BaseDumper):  # type: ignore[misc]
    """YAML without anchors (each operation is its own copy) and with templates as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _represent_str)


def render(doc: dict[str, Any], fmt: str, key: str) -> str:
    """The document as YAML (with a comment saying where it comes from) or JSON."""
    if fmt == "json":
        return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    header = f"# Generated by `lambdagate export-openapi` from VirtualService {key}.\n"
    return header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


def run(
    config: Config,
    problems: Sequence[str],
    *,
    source: str,
    selection: str | None = None,
    output: str | None = None,
    fmt: str = "yaml",
    options: ExportOptions | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """`lambdagate export-openapi`: 0 when written (warnings on stderr), 2 with the problems on stderr otherwise.

    With several VirtualServices and no selection, `output` must be a folder (one file each); else it is an
    error that lists them."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    if (
        options is not None
        and options.account_id is not None
        and not ACCOUNT_RE.fullmatch(options.account_id)
    ):
        err.write(f"error: --account-id: {options.account_id!r} is not an AWS account ID (12 digits)\n")
        return 2
    if problems:
        for problem in problems:
            err.write(f"error: {problem}\n")
        err.write(
            f"error: {source}: {imp._count(len(problems), 'problem')}; fix them first, so that the export is what "
            "the control plane serves\n"
        )
        return 2
    if not config.virtual_services:
        err.write(f"error: {source}: no VirtualService to export\n")
        return 2
    to_folder = output not in (None, "-") and (
        Path(str(output)).is_dir() or str(output).endswith(("/", os.sep))
    )
    try:
        chosen = select(config, [selection] if selection else None)
    except ExportError as problem:
        err.write(f"error: {source}: --virtual-service: {problem}\n")
        return 2
    if len(chosen) > 1 and not to_folder:
        names = ", ".join(f"{v.namespace}/{v.name}" for v in chosen)
        err.write(
            f"error: {source}: {len(chosen)} VirtualServices ({names}): pick one with --virtual-service "
            "NAMESPACE/NAME, or give -o a folder to write one file each\n"
        )
        return 2
    warnings: list[str] = []
    try:
        documents = export(config, [f"{v.namespace}/{v.name}" for v in chosen], options, warnings)
    except Exception as bug:  # a bug of ours: still one line, never a traceback
        err.write(
            f"error: {source}: unexpected {type(bug).__name__}: {bug} (a bug in lambdagate; please report it)\n"
        )
        return 2
    for line in warnings:
        err.write(f"warning: {line}\n")
    suffix = "json" if fmt == "json" else "yaml"
    targets: list[tuple[str, Path | None]] = []
    if to_folder:
        folder = Path(str(output))
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as problem:
            err.write(f"error: {folder}: cannot be created: {problem.strerror or problem}\n")
            return 2
        targets = [(key, folder / f"{key.replace('/', '.')}.openapi.{suffix}") for key in documents]
    else:
        targets = [(key, None if output in (None, "-") else Path(str(output))) for key in documents]
    for key, path in targets:
        text = render(documents[key], fmt, key)
        if path is None:
            out.write(text)
            continue
        try:
            imp._write_atomically(path, text)
        except OSError as problem:
            err.write(f"error: {path}: cannot be written: {problem.strerror or problem}\n")
            return 2
        routes = len(next(v for v in chosen if f"{v.namespace}/{v.name}" == key).routes)
        err.write(f"wrote {path}: VirtualService {key} ({imp._count(routes, 'route')})\n")
    return 0


__all__ = ["ExportError", "ExportOptions", "export", "render", "run", "select"]
