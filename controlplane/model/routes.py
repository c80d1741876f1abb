"""The route table entry that ext_proc serves: one per Envoy route, everything the request path needs.

Produced by translate (pure), consumed by extproc; kept in the model so neither depends on the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.model.resources import AwsCredentials, Matcher


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
