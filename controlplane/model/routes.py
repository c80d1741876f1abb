"""The route table entry that ext_proc serves: one per Envoy route, everything the request path needs.

Produced by translate (pure), consumed by extproc; kept in the model so neither depends on the other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from controlplane.model.resources import AwsCredentials, Integration, Matcher, RateLimit


def invoke_path(function_name: str, qualifier: str | None) -> str:
    # boto3 percent-encodes the whole name (':' of ARNs included); Lambda's signature check expects the same.
    path = f"/2015-03-31/functions/{quote(function_name, safe='')}/invocations"
    if qualifier:
        path += f"?Qualifier={quote(qualifier, safe='')}"
    return path


@dataclass(frozen=True)
class Invocable:
    """One function a route may invoke, ready to sign: the Invoke path is precomputed."""

    function: str  # the logical name, or the function_name as the route gave it
    function_name: str
    qualifier: str | None
    invoke_path: str
    weight: int = 1


@dataclass(frozen=True)
class AuthorizerTarget:
    """A Lambda (REQUEST) authorizer, ready to invoke: the same signing inputs as a route's function."""

    name: str  # namespace/virtualservice/authorizer: the cache of results is per authorizer
    invocable: Invocable
    scheme: str
    authority: str
    region: str
    credentials: AwsCredentials | None
    role_arn: str | None
    identity_sources: tuple[tuple[str, str], ...]  # (header|query, name)
    ttl_s: float
    timeout_s: float = 10.0


@dataclass(frozen=True)
class ApiKeyTable:
    """A VirtualService's API keys: SHA-256 digests (hex) of the keys to their names; never the keys."""

    name: str  # namespace/virtualservice: rate-limit buckets are per key within it
    digests: tuple[tuple[str, str], ...]
    rate_limit: RateLimit | None = None
    limits: tuple[tuple[str, RateLimit], ...] = ()


@dataclass(frozen=True)
class RouteTarget:
    """Everything ext_proc needs for one route, precomputed so the request path does no lookups."""

    route_name: str
    virtual_service: str
    upstream: str
    function: str
    function_name: str
    qualifier: str | None
    invoke_path: str
    scheme: str
    authority: str
    region: str
    # None: botocore's default credential chain.
    credentials: AwsCredentials | None
    matcher: Matcher
    resource: str
    stage: str
    # Assumed (STS AssumeRole) with `credentials` or the default chain before signing; None: sign as is.
    role_arn: str | None = None
    payload_format: str = "apigateway-v1"
    invocation_type: str = "RequestResponse"
    stage_variables: tuple[tuple[str, str], ...] = ()
    # API Gateway's routeKey: "GET /pets/{petId}", "ANY /pets/{proxy+}".
    route_key: str = "$default"
    # Weighted choices (two or more); empty: always `function`/`invoke_path` above.
    choices: tuple[Invocable, ...] = ()
    # The path parameter naming the function per request, and the names it may take (the Upstream's).
    function_param: str | None = None
    param_functions: Mapping[str, Invocable] | None = field(default=None, compare=False, repr=False)
    max_retries: int = 0
    # (kind, status) overrides of the default error statuses (RouteOptions.errors).
    errors: tuple[tuple[str, int], ...] = ()
    log_tail: bool = False
    # Who may call (issue 7). JWTs are verified by Envoy's jwt_authn; ext_proc only reads the claims it passes.
    jwt: bool = False
    authorizer: AuthorizerTarget | None = None
    api_keys: ApiKeyTable | None = None
    # API Gateway's methodArn without the method and path: arn:aws:execute-api:REGION:ACCOUNT:API/STAGE
    method_arn_prefix: str = ""
    # Non-proxy integration: templates build the payload and the response (payload_format does not apply).
    integration: Integration | None = None
