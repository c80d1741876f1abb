"""Frozen dataclasses for the resources users write: Secret, Upstream (type aws) and VirtualService.

Instances are always valid on their own; references between objects are checked by `resolve`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field, fields
from typing import NamedTuple

KIND_SECRET = "Secret"
KIND_UPSTREAM = "Upstream"
KIND_VIRTUAL_SERVICE = "VirtualService"
API_GROUP = "lambdagate.io"

DEFAULT_NAMESPACE = "default"
LATEST = "$LATEST"
# Endpoint value that stands for the local Lambda endpoint that `lambdagate up` starts.
LOCAL_ENDPOINT = "local"


class ObjectKey(NamedTuple):
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class AwsCredentials:
    access_key: str
    secret_key: str
    session_token: str | None = None

    def __repr__(self) -> str:
        # Never let a secret reach a log line through a repr.
        return f"AwsCredentials(access_key={mask(self.access_key)}, secret_key=***)"


def mask(value: str) -> str:
    return value[:4] + "***" if len(value) > 8 else "***"


@dataclass(frozen=True)
class Secret:
    name: str
    namespace: str
    credentials: AwsCredentials | None
    # Keys present, for status messages; values stay in `credentials`.
    keys: tuple[str, ...] = ()
    # Every entry (name, value): API keys live here. Never in a repr, a log line or a dump.
    data: tuple[tuple[str, str], ...] = field(default=(), repr=False)

    @functools.cached_property  # looked up many times per load
    def key(self) -> ObjectKey:
        return ObjectKey(KIND_SECRET, self.namespace, self.name)


@dataclass(frozen=True)
class KeepWarm:
    """API Gateway-era keep-warm: every `interval_s`, `concurrency` parallel invokes with a warm-up event."""

    interval_s: float
    concurrency: int = 1


@dataclass(frozen=True)
class Function:
    """A logical function name mapped to a Lambda function and qualifier."""

    name: str
    function_name: str
    qualifier: str | None = None
    keep_warm: KeepWarm | None = None

    @property
    def effective_qualifier(self) -> str:
        return self.qualifier or LATEST


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def authority(self) -> str:
        default = 443 if self.tls else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


PAYLOAD_FORMATS = ("apigateway-v1", "apigateway-v2", "raw")
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")
MAX_TIMEOUT_S = 900.0  # Lambda's own limit on a function's run
MAX_RETRIES = 5
# The failures whose HTTP status `options.errors` may change, with their defaults.
ERROR_KINDS = {
    "function_error": 502,  # the function raised (X-Amz-Function-Error)
    "function_timeout": 504,  # the function ran past its own timeout (Sandbox.Timedout)
    "throttled": 429,  # Lambda's TooManyRequestsException (concurrency or rate limits)
    "malformed_response": 502,  # a proxy answer that is not what the payload format allows
}


@dataclass(frozen=True)
class RateLimit:
    """Envoy's local rate limit (a token bucket per Envoy): `requests` per `per_s`, bursting to `burst`."""

    requests: int
    per_s: float
    burst: int


@dataclass(frozen=True)
class CorsPolicy:
    """Browser CORS, answered by Envoy's CORS filter: preflights never reach a function."""

    allow_origins: tuple[str, ...]  # exact origins, or "*"
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age_s: int | None = None
    allow_credentials: bool = False


@dataclass(frozen=True)
class RouteOptions:
    """How a route invokes its function. None: inherit (route -> Upstream `spec.options` -> the default)."""

    payload_format: str | None = (
        None  # apigateway-v1 (REST 1.0), apigateway-v2 (HTTP API 2.0) or raw (KrakenD)
    )
    invocation_type: str | None = None  # RequestResponse, Event (202, no answer) or DryRun (204)
    timeout_s: float | None = None  # Envoy's route timeout: the longest the client waits for the function
    max_retries: int | None = None  # retries on throttling and Invoke 5xx, each attempt signed again
    # (kind, status) pairs over ERROR_KINDS; merged kind by kind with the layers below.
    errors: tuple[tuple[str, int], ...] | None = None
    log_tail: bool | None = (
        None  # ask Lambda for the log tail; it goes to the gateway's log, never the client
    )
    rate_limit: RateLimit | None = None
    cors: CorsPolicy | None = None

    def over(self, base: RouteOptions) -> RouteOptions:
        """These options, with `base` filling what they leave unset."""
        merged = {
            f.name: getattr(self, f.name) if getattr(self, f.name) is not None else getattr(base, f.name)
            for f in fields(self)
        }
        if self.errors is not None and base.errors is not None:
            merged["errors"] = tuple(sorted({**dict(base.errors), **dict(self.errors)}.items()))
        return RouteOptions(**merged)

    def error_status(self, kind: str) -> int:
        """The HTTP status for one of ERROR_KINDS, configured or the default."""
        for k, status in self.errors or ():
            if k == kind:
                return status
        return ERROR_KINDS[kind]


DEFAULT_OPTIONS = RouteOptions("apigateway-v1", "RequestResponse", None, 0, None, False)


@dataclass(frozen=True)
class DiscoverySettings:
    """`spec.discovery`: whether the discovery worker lists this Upstream's account, and which functions."""

    enabled: bool = True
    name_prefix: str | None = None
    # Every tag given must be on the function with that value.
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Upstream:
    name: str
    namespace: str
    region: str
    secret_ref: str | None
    # None: the public regional endpoint. LOCAL_ENDPOINT: the endpoint `lambdagate up` runs.
    endpoint: Endpoint | str | None
    # The user's own entries (spec.functions). They win over discovered ones of the same name.
    functions: tuple[Function, ...]
    generation: int = 0
    # An IAM role assumed (STS AssumeRole) with the Secret's or the default chain's credentials.
    role_arn: str | None = None
    discovery: DiscoverySettings = DiscoverySettings()
    # What the discovery worker found (from status or the state file), as logical names fn, fn:3, fn:alias.
    discovered: tuple[Function, ...] = ()
    # Defaults for the routes to this Upstream (`spec.options`); a route's own options win field by field.
    options: RouteOptions = RouteOptions()

    @functools.cached_property  # looked up many times per load
    def key(self) -> ObjectKey:
        return ObjectKey(KIND_UPSTREAM, self.namespace, self.name)

    def function(self, name: str) -> Function | None:
        for fn in self.functions:
            if fn.name == name:
                return fn
        return self._discovered_by_name.get(name) if self.discovered else None

    @functools.cached_property
    def _discovered_by_name(self) -> dict[str, Function]:
        # Tens of thousands of discovered names: index them once per Upstream object.
        return {fn.name: fn for fn in self.discovered}

    def function_names(self) -> list[str]:
        """Every logical name a route may use: the spec's, then the discovered ones it does not shadow."""
        own = [fn.name for fn in self.functions]
        taken = set(own)
        return own + [fn.name for fn in self.discovered if fn.name not in taken]

    def default_endpoint(self) -> Endpoint:
        return Endpoint("https", f"lambda.{self.region}.amazonaws.com", 443)


@dataclass(frozen=True)
class Matcher:
    """How a request is matched. `kind` is path (exact or template), prefix or regex."""

    kind: str
    value: str
    methods: tuple[str, ...] = ()
    # For path templates: a regex with one named group per {param}; None for a literal path.
    template_regex: str | None = None
    params: tuple[str, ...] = ()

    @property
    def is_template(self) -> bool:
        return self.template_regex is not None

    @property
    def resource(self) -> str:
        """API Gateway's `resource`: the template the request matched."""
        if self.kind == "prefix":
            return self.value.rstrip("/") + "/{proxy+}"
        return self.value


@dataclass(frozen=True)
class FunctionChoice:
    """One weighted target of a destination: a logical name of the Upstream, or a Lambda name or ARN."""

    function: str = ""
    function_name: str | None = (
        None  # name, name:qualifier, full or partial ARN; invoked in the Upstream's region
    )
    weight: int = 1


@dataclass(frozen=True)
class Destination:
    """Where a route goes: exactly one of `function`, `function_name`, `function_param` or `functions`."""

    upstream: str
    upstream_namespace: str
    function: str = ""  # a logical name of the Upstream (spec or discovered)
    function_name: str | None = None  # a Lambda name or ARN used as is
    # The path parameter that names the function per request; only the Upstream's own names are accepted.
    function_param: str | None = None
    # Weighted choices (canary, A/B): each request picks one at random by weight.
    functions: tuple[FunctionChoice, ...] = ()

    def choices(self) -> tuple[FunctionChoice, ...]:
        """The fixed targets of this destination (none for `function_param`)."""
        if self.functions:
            return self.functions
        if self.function_param is not None:
            return ()
        return (FunctionChoice(self.function, self.function_name, 1),)


MAX_MOCK_BODY = 64 * 1024
# Mock statuses Envoy's local-reply mapping would rewrite (its 429 is the rate limit's JSON answer).
RESERVED_MOCK_STATUSES = (429,)


@dataclass(frozen=True)
class MockResponse:
    """API Gateway's mock integration: a canned answer, no function."""

    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: str = ""


@dataclass(frozen=True)
class Jwks:
    """Where a JWT authorizer's signing keys come from: exactly one of inline JSON, a file, or a URI."""

    inline: str | None = None  # a JWKS document (JSON); a `file` is read into here by the source
    file: str | None = None
    uri: str | None = None  # fetched and cached by Envoy
    timeout_s: float = 5.0
    cache_s: float = 300.0


@dataclass(frozen=True)
class JwtAuthorizer:
    """API Gateway's JWT authorizer (Cognito user pools, any OIDC issuer), enforced by Envoy's jwt_authn."""

    issuer: str
    audiences: tuple[str, ...]
    jwks: Jwks
    header: str = "authorization"  # where the token is; a "Bearer " prefix is taken off
    query: str | None = None  # or this query parameter


IDENTITY_KINDS = ("header", "query")


@dataclass(frozen=True)
class LambdaAuthorizer:
    """API Gateway's REQUEST authorizer: a function that answers an IAM policy and a context."""

    destination: Destination  # the authorizer function (function or function_name of an Upstream)
    identity_sources: tuple[tuple[str, str], ...]  # (header|query, name); all must be present, else 401
    ttl_s: float = 300.0  # results cached per identity; 0: every request asks the function


@dataclass(frozen=True)
class Authorizer:
    name: str
    jwt: JwtAuthorizer | None = None
    function: LambdaAuthorizer | None = None

    @property
    def kind(self) -> str:
        return "jwt" if self.jwt is not None else "lambda"


NO_AUTHORIZER = "none"


@dataclass(frozen=True)
class RouteAuth:
    """Who may call a route. Set on the VirtualService (every route) and per route; None inherits."""

    authorizer: str | None = None  # a name in spec.authorizers, or "none" to drop an inherited one
    scopes: tuple[str, ...] | None = None  # JWT: the token needs one of these (scope or scp claim)
    api_key_required: bool | None = None

    def over(self, base: RouteAuth) -> RouteAuth:
        return RouteAuth(
            self.authorizer if self.authorizer is not None else base.authorizer,
            self.scopes if self.scopes is not None else base.scopes,
            self.api_key_required if self.api_key_required is not None else base.api_key_required,
        )

    @property
    def effective_authorizer(self) -> str | None:
        return None if self.authorizer in (None, NO_AUTHORIZER) else self.authorizer


@dataclass(frozen=True)
class ApiKeys:
    """API Gateway's API keys and usage plans, kept light: keys in a Secret, a rate limit per key."""

    secret_ref: str  # a Secret in the VirtualService's namespace: each entry is one key (name: value)
    rate_limit: RateLimit | None = None  # per key, unless `limits` names the key
    limits: tuple[tuple[str, RateLimit], ...] = ()  # per key name


@dataclass(frozen=True)
class IntegrationResponse:
    """One of a non-proxy integration's responses: chosen by `pattern` on a function error's errorMessage
    (None: the response for a successful call), then built by `template` (None: the output as is)."""

    status: int
    pattern: str | None = None
    template: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


@dataclass(frozen=True)
class Integration:
    """API Gateway's non-proxy (mapping template) integration, instead of the proxy event and response."""

    request_template: str | None = None  # Jinja2 (sandboxed); None: the request body as is (JSON)
    responses: tuple[IntegrationResponse, ...] = ()


@dataclass(frozen=True)
class Route:
    matcher: Matcher
    destination: Destination | None
    options: RouteOptions = RouteOptions()
    mock: MockResponse | None = None
    auth: RouteAuth = RouteAuth()
    integration: Integration | None = None


@dataclass(frozen=True)
class VirtualService:
    name: str
    namespace: str
    domains: tuple[str, ...]
    routes: tuple[Route, ...]
    stage: str = "$default"
    generation: int = 0
    # API Gateway's stage variables: passed to every function of this service in the event.
    stage_variables: tuple[tuple[str, str], ...] = ()
    authorizers: tuple[Authorizer, ...] = ()
    auth: RouteAuth = RouteAuth()  # every route's default
    api_keys: ApiKeys | None = None

    def authorizer(self, name: str) -> Authorizer | None:
        return next((a for a in self.authorizers if a.name == name), None)

    @functools.cached_property  # looked up many times per load
    def key(self) -> ObjectKey:
        return ObjectKey(KIND_VIRTUAL_SERVICE, self.namespace, self.name)


@dataclass(frozen=True)
class Config:
    """A consistent set of resources: every reference resolves."""

    upstreams: tuple[Upstream, ...] = ()
    virtual_services: tuple[VirtualService, ...] = ()
    secrets: tuple[Secret, ...] = ()
    # Where the local Lambda endpoint runs, if it does; resolves `endpoint: local`.
    local_endpoint: Endpoint | None = field(default=None, compare=True)

    def upstream(self, namespace: str, name: str) -> Upstream | None:
        return self._upstream_index.get((namespace, name))

    def secret(self, namespace: str, name: str) -> Secret | None:
        return self._secret_index.get((namespace, name))

    # Indexes built once per Config (translate looks an Upstream up for each of tens of thousands of routes). The
    # first of two objects with the same name wins, as a scan in order would find it.
    @functools.cached_property
    def _upstream_index(self) -> dict[tuple[str, str], Upstream]:
        index: dict[tuple[str, str], Upstream] = {}
        for up in self.upstreams:
            index.setdefault((up.namespace, up.name), up)
        return index

    @functools.cached_property
    def _secret_index(self) -> dict[tuple[str, str], Secret]:
        index: dict[tuple[str, str], Secret] = {}
        for sec in self.secrets:
            index.setdefault((sec.namespace, sec.name), sec)
        return index


# Lambda's own pattern for FunctionName in Invoke (name, name:qualifier, full or partial ARN).
FUNCTION_NAME_RE = re.compile(
    r"^(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-[0-9]{1}:)?([0-9]{12}:)?(function:)?"
    r"([a-zA-Z0-9_.-]+)(:(\$LATEST|[a-zA-Z0-9_-]+))?$"
)
QUALIFIER_RE = re.compile(r"^(\$LATEST|[a-zA-Z0-9_-]{1,128})$")
REGION_RE = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[0-9]{1}$")
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(\+?)\}")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")


def arn_region(function_name: str) -> str | None:
    """The region a full ARN names (arn:aws:lambda:REGION:...), None for names and partial ARNs."""
    m = FUNCTION_NAME_RE.fullmatch(function_name)
    if m is None or m.group(3) is None:
        return None
    return m.group(3).rstrip(":")


def split_function_name(function_name: str) -> tuple[str, str | None]:
    """Split `name:qualifier` or an ARN into (function name or ARN without qualifier, qualifier)."""
    m = FUNCTION_NAME_RE.fullmatch(function_name)
    if m is None:
        raise ValueError(function_name)
    qualifier = m.group(9)
    if qualifier is None:
        return function_name, None
    return function_name[: -(len(qualifier) + 1)], qualifier


def template_to_regex(template: str) -> tuple[str | None, tuple[str, ...]]:
    """Turn `/pets/{petId}` into an RE2/Python regex with named groups; None if there is no parameter.

    `{name}` matches one path segment, `{name+}` (API Gateway's greedy form) one or more.
    """
    params: list[str] = []
    parts: list[str] = []
    pos = 0
    for m in PARAM_RE.finditer(template):
        parts.append(re.escape(template[pos : m.start()]))
        name, greedy = m.group(1), m.group(2)
        if name in params:
            raise ValueError(f"parameter {{{name}}} appears twice")
        params.append(name)
        parts.append(f"(?P<{name}>.+)" if greedy else f"(?P<{name}>[^/]+)")
        pos = m.end()
    if not params:
        if "{" in template or "}" in template:
            # `/pets/{pet-id}` is not a parameter; as a literal path it would silently never match.
            raise ValueError("braces must enclose a parameter name such as {petId}")
        return None, ()
    rest = template[pos:]
    if "{" in rest or "}" in rest or any("{" in p or "}" in p for p in parts if not p.startswith("(?P")):
        raise ValueError("braces must enclose a parameter name such as {petId}")
    parts.append(re.escape(rest))
    # re.escape escapes '/', which RE2 accepts but is noise in config dumps.
    return "^" + "".join(parts).replace("\\/", "/") + "$", tuple(params)
