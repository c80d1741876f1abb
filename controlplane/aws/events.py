"""Builds the API Gateway proxy events from an HTTP request: REST (payload format 1.0) and HTTP API (2.0).

The event must work unchanged with Lambda web frameworks (Mangum, Powertools), so it follows API Gateway's shape.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, unquote

# Headers Envoy adds for its own use; API Gateway would not show them to a function.
HIDDEN_HEADER_PREFIXES = ("x-envoy-",)
TEXT_TYPES = (
    "application/json",
    "application/xml",
    "application/javascript",
    "application/x-www-form-urlencoded",
    "application/graphql",
    "application/x-yaml",
    "application/yaml",
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True)
class RouteInfo:
    """What the matched route tells the event: the template and how to read parameters from the path."""

    resource: str
    stage: str
    param_regex: re.Pattern[str] | None
    prefix: str | None = None
    stage_variables: dict[str, str] | None = None
    route_key: str = "$default"


@dataclass
class Identity:
    """Who the request's caller is, as established before the function runs (issue 7)."""

    claims: dict[str, Any] | None = None  # a JWT's verified claims (Envoy's jwt_authn)
    scopes: list[str] | None = None  # the JWT's scope/scp claim, split
    principal_id: str | None = None  # a Lambda authorizer's principalId
    context: dict[str, Any] | None = None  # a Lambda authorizer's context
    api_key: str | None = None  # the x-api-key that was accepted
    api_key_id: str | None = None  # its name in the Secret


@dataclass
class HttpRequest:
    method: str
    path: str  # as sent, query string included
    headers: list[tuple[str, str]]  # lowercase names, in order, repeats kept
    body: bytes
    source_ip: str
    protocol: str
    request_id: str
    authority: str
    identity: Identity | None = None


def is_text(content_type: str | None) -> bool:
    if not content_type:
        return False
    ct = content_type.split(";", 1)[0].strip().lower()
    return ct.startswith("text/") or ct in TEXT_TYPES or ct.endswith("+json") or ct.endswith("+xml")


def encode_body(body: bytes, content_type: str | None) -> tuple[str | None, bool]:
    """The event's body and isBase64Encoded: text stays text, everything else is base64."""
    if not body:
        return None, False
    if is_text(content_type):
        try:
            return body.decode("utf-8"), False
        except UnicodeDecodeError:
            pass
    return base64.b64encode(body).decode("ascii"), True


def request_time(epoch: float) -> str:
    t = time.gmtime(epoch)
    return f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"


def path_parameters(route: RouteInfo, path: str) -> dict[str, str] | None:
    if route.param_regex is not None:
        # Envoy matched the whole path; so must this, or a shorter alternative of a regex would win.
        m = route.param_regex.fullmatch(path)
        if m is None:
            return None
        params = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
        return params or None
    if route.prefix is not None:
        rest = path[len(route.prefix) :].lstrip("/") if path.startswith(route.prefix) else ""
        return {"proxy": unquote(rest)} if rest else None
    return None


def build_v1_event(req: HttpRequest, route: RouteInfo, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    raw_path, _, query = req.path.partition("?")
    raw_path = raw_path.split("#", 1)[0]

    headers: dict[str, str] = {}
    multi_headers: dict[str, list[str]] = {}
    content_type = None
    for name, value in req.headers:
        if name.startswith(HIDDEN_HEADER_PREFIXES):
            continue
        if name == "content-type":
            content_type = value
        headers[name] = value
        multi_headers.setdefault(name, []).append(value)
    if "host" not in headers and req.authority:
        headers["host"] = req.authority
        multi_headers["host"] = [req.authority]

    qs: dict[str, str] = {}
    multi_qs: dict[str, list[str]] = {}
    if query:
        for k, v in parse_qsl(query, keep_blank_values=True):
            qs[k] = v
            multi_qs.setdefault(k, []).append(v)

    body, is_b64 = encode_body(req.body, content_type)
    resource = route.resource
    domain = (
        req.authority.rsplit(":", 1)[0]
        if req.authority and not req.authority.endswith("]")
        else req.authority
    )
    event: dict[str, Any] = {
        "resource": resource,
        "path": raw_path,
        "httpMethod": req.method,
        "headers": headers or None,
        "multiValueHeaders": multi_headers or None,
        "queryStringParameters": qs or None,
        "multiValueQueryStringParameters": multi_qs or None,
        "pathParameters": path_parameters(route, raw_path),
        "stageVariables": dict(route.stage_variables) if route.stage_variables else None,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "lambdagate",
            "resourceId": resource,
            "resourcePath": resource,
            "httpMethod": req.method,
            "path": raw_path,
            "stage": route.stage,
            "requestId": req.request_id,
            "extendedRequestId": req.request_id,
            "requestTime": request_time(now),
            "requestTimeEpoch": int(now * 1000),
            "domainName": domain,
            "domainPrefix": domain.split(".", 1)[0],
            "protocol": req.protocol,
            "identity": {
                "sourceIp": req.source_ip,
                "userAgent": headers.get("user-agent"),
                "accessKey": None,
                "accountId": None,
                "apiKey": None,
                "apiKeyId": None,
                "caller": None,
                "cognitoAuthenticationProvider": None,
                "cognitoAuthenticationType": None,
                "cognitoIdentityId": None,
                "cognitoIdentityPoolId": None,
                "principalOrgId": None,
                "user": None,
                "userArn": None,
                "clientCert": None,
            },
        },
        "body": body,
        "isBase64Encoded": is_b64,
    }
    if req.identity is not None:
        _v1_identity(event, req.identity)
    return event


def claim_text(value: Any) -> str:
    """API Gateway passes claims as strings: a list as "[a b]", an object as JSON, true as "true"."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(claim_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _v1_identity(event: dict[str, Any], who: Identity) -> None:
    ctx = event["requestContext"]
    if who.api_key is not None:
        ctx["identity"]["apiKey"] = who.api_key
        ctx["identity"]["apiKeyId"] = who.api_key_id
    authorizer: dict[str, Any] = {}
    if who.claims is not None:
        # The REST API's Cognito authorizer: requestContext.authorizer.claims, every value a string.
        authorizer["claims"] = {k: claim_text(v) for k, v in who.claims.items()}
        if who.scopes is not None:
            authorizer["scopes"] = who.scopes
    if who.principal_id is not None:
        authorizer["principalId"] = who.principal_id
        authorizer.update(who.context or {})
    if authorizer:
        ctx["authorizer"] = authorizer


def _v2_identity(event: dict[str, Any], who: Identity) -> None:
    authorizer: dict[str, Any] = {}
    if who.claims is not None:
        authorizer["jwt"] = {
            "claims": {k: claim_text(v) for k, v in who.claims.items()},
            "scopes": who.scopes,
        }
    if who.principal_id is not None:
        authorizer["lambda"] = {"principalId": who.principal_id, **(who.context or {})}
    if authorizer:
        event["requestContext"]["authorizer"] = authorizer
    if who.api_key is not None:
        event["requestContext"]["identity"] = {"apiKey": who.api_key, "apiKeyId": who.api_key_id}


def build_v2_event(req: HttpRequest, route: RouteInfo, now: float | None = None) -> dict[str, Any]:
    """The HTTP API event (payload format 2.0): rawPath, rawQueryString, cookies, comma-joined headers."""
    now = time.time() if now is None else now
    raw_path, _, query = req.path.partition("?")
    raw_path = raw_path.split("#", 1)[0]
    query = query.split("#", 1)[0]

    headers: dict[str, str] = {}
    cookies: list[str] = []
    content_type = None
    for name, value in req.headers:
        if name.startswith(HIDDEN_HEADER_PREFIXES):
            continue
        if name == "cookie":
            # HTTP API moves cookies out of the headers, one entry per cookie.
            cookies.extend(c.strip() for c in value.split(";") if c.strip())
            continue
        if name == "content-type":
            content_type = value
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    if "host" not in headers and req.authority:
        headers["host"] = req.authority

    qs: dict[str, str] = {}
    for k, v in parse_qsl(query, keep_blank_values=True):
        qs[k] = f"{qs[k]},{v}" if k in qs else v

    body, is_b64 = encode_body(req.body, content_type)
    domain = (
        req.authority.rsplit(":", 1)[0]
        if req.authority and not req.authority.endswith("]")
        else req.authority
    )
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route.route_key,
        "rawPath": raw_path,
        "rawQueryString": query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if qs:
        event["queryStringParameters"] = qs
    event["requestContext"] = {
        "accountId": "000000000000",
        "apiId": "lambdagate",
        "domainName": domain,
        "domainPrefix": domain.split(".", 1)[0],
        "http": {
            "method": req.method,
            "path": unquote(raw_path),
            "protocol": req.protocol,
            "sourceIp": req.source_ip,
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": req.request_id,
        "routeKey": route.route_key,
        "stage": route.stage,
        "time": request_time(now),
        "timeEpoch": int(now * 1000),
    }
    params = path_parameters(route, raw_path)
    if params:
        event["pathParameters"] = params
    if route.stage_variables:
        event["stageVariables"] = dict(route.stage_variables)
    if body is not None:
        event["body"] = body
    event["isBase64Encoded"] = is_b64
    if req.identity is not None:
        _v2_identity(event, req.identity)
    return event
