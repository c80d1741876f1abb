"""API Gateway's non-proxy integration at request time: a mapping template builds the Lambda payload from the
request, and the integration's responses (chosen by patterns on a function error's message) build the answer.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

from controlplane.aws.events import HIDDEN_HEADER_PREFIXES, HttpRequest, RouteInfo, path_parameters
from controlplane.aws.responses import HttpResponse, json_error
from controlplane.model.resources import Integration, IntegrationResponse
from controlplane.model.templates import REQUEST_NAMES, TemplateFailed, render, template_names

REQUEST_NOT_MAPPED = "The request could not be mapped"
BODY_NOT_JSON = "The request body must be JSON"


class MappingFailed(ValueError):
    """The request cannot become a payload: `public` is for the client (a 400), the error text for the log."""

    def __init__(self, public: str, detail: str) -> None:
        super().__init__(detail)
        self.public = public


@functools.lru_cache(maxsize=1024)
def _uses(integration: Integration) -> tuple[frozenset[str], bool]:
    """(names any of its templates reads, whether a response template reads a request-side name)."""
    request = template_names(integration.request_template) if integration.request_template else frozenset()
    response: frozenset[str] = frozenset()
    for r in integration.responses:
        if r.template is not None:
            response |= template_names(r.template)
    return request | response, bool(response & set(REQUEST_NAMES))


@functools.lru_cache(maxsize=1024)
def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def request_context(req: HttpRequest, route: RouteInfo, parse_json: bool = True) -> dict[str, Any]:
    """The request-side template context (README, "Mapping templates"); `json` is None unless `parse_json`."""
    raw_path, _, query = req.path.partition("?")
    raw_path = raw_path.split("#", 1)[0]
    headers: dict[str, str] = {}
    for name, value in req.headers:
        if name.startswith(HIDDEN_HEADER_PREFIXES):
            continue
        headers[name] = f"{headers[name]},{value}" if name in headers else value
    if "host" not in headers and req.authority:
        headers["host"] = req.authority
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for key, value in parse_qsl(query.split("#", 1)[0], keep_blank_values=True):
        single[key] = value
        multi.setdefault(key, []).append(value)
    parsed = None
    if parse_json and req.body.strip():
        try:
            parsed = json.loads(req.body)
        except ValueError:  # UnicodeDecodeError included
            parsed = None
    identity = req.identity
    return {
        "method": req.method,
        "path": raw_path,
        "resource": route.resource,
        "path_params": path_parameters(route, raw_path) or {},
        "query": single,
        "multi_query": multi,
        "headers": headers,
        "body": req.body.decode("utf-8", "replace"),
        "json": parsed,
        "stage": route.stage,
        "stage_variables": dict(route.stage_variables or {}),
        "request_id": req.request_id,
        "source_ip": req.source_ip,
        "authorizer": {
            "claims": (identity.claims if identity else None) or {},
            "scopes": (identity.scopes if identity else None) or [],
            "principal_id": (identity.principal_id if identity else None) or "",
            "context": (identity.context if identity else None) or {},
        },
        "api_key_id": identity.api_key_id if identity else None,
    }


def build_payload(
    integration: Integration, req: HttpRequest, route: RouteInfo
) -> tuple[bytes, dict[str, Any]]:
    """The Invoke payload, and the request context the response templates need (empty when they need none).

    Raises MappingFailed: nothing is invoked with a half-built or non-JSON payload.
    """
    names, keep = _uses(integration)
    context = request_context(req, route, parse_json="json" in names) if names else {}
    source = integration.request_template
    if source is None:
        # No template: the body is the payload, as API Gateway passes it through; Invoke requires JSON.
        payload = req.body if req.body.strip() else b"{}"
        _check_json(payload, BODY_NOT_JSON, "the body")
    else:
        try:
            payload = render(source, context).encode("utf-8")
        except TemplateFailed as err:
            raise MappingFailed(REQUEST_NOT_MAPPED, f"request template: {err}") from None
        _check_json(payload, REQUEST_NOT_MAPPED, "the request template's output")
    return payload, context if keep else {}


def _check_json(payload: bytes, public: str, what: str) -> None:
    try:
        # Strict, as Lambda is: UTF-8 only, and no NaN or Infinity (which Python would accept).
        json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except ValueError as err:
        # The error's position only: a payload can carry what the client sent (tokens), never logged.
        raise MappingFailed(public, f"{what} is not JSON ({err})") from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def select_response(integration: Integration, error_message: str | None) -> IntegrationResponse | None:
    """The response for a function error's message (the first pattern found in it, re.search), or for a success
    (None: the response without a pattern). None: no configured response applies."""
    if error_message is None:
        return next((r for r in integration.responses if r.pattern is None), None)
    for r in integration.responses:
        if r.pattern is not None and _pattern(r.pattern).search(error_message):
            return r
    return None


def build_response(
    integration: Integration,
    payload: bytes,
    function_error: str | None,
    context: Mapping[str, Any],
    request_id: str,
) -> HttpResponse | None:
    """The HTTP response for a function's answer (`function_error`: its X-Amz-Function-Error, if it raised).

    None: a function error no pattern matches, which the gateway's usual error mapping answers.
    """
    result: Any
    try:
        result = json.loads(payload)
    except ValueError:  # UnicodeDecodeError included
        result = payload.decode("utf-8", "replace")
    error = None
    if function_error is not None:
        error = _error_of(result, function_error)
        chosen = select_response(integration, error["errorMessage"])
        if chosen is None:
            return None
    else:
        chosen = select_response(integration, None)
        if chosen is None:
            return HttpResponse(200, [("content-type", "application/json")], payload)
    headers = list(chosen.headers)
    if not any(name == "content-type" for name, _ in headers):
        headers.insert(0, ("content-type", chosen.content_type))
    if chosen.template is None:
        if error is not None:
            # The error as the client sees it: never the function's stack trace.
            shown = {"errorMessage": error["errorMessage"], "errorType": error["errorType"]}
            return HttpResponse(chosen.status, headers, json.dumps(shown, separators=(",", ":")).encode())
        return HttpResponse(chosen.status, headers, payload)
    try:
        body = render(
            chosen.template, {**context, "result": result, "error": error, "status": chosen.status}
        ).encode("utf-8")
    except TemplateFailed as err:
        out = json_error(
            502,
            "Internal server error",
            request_id,
            log_reason="response mapping failed",
            log_detail=f"response template for status {chosen.status}: {err}",
        )
        # The function's answer could not become a response: the route's errors option maps it like one.
        out.kind = "malformed_response"
        return out
    return HttpResponse(chosen.status, headers, body)


def _error_of(result: Any, function_error: str) -> dict[str, Any]:
    """{errorMessage, errorType, stackTrace} of a function error, whatever shape the runtime reported it in."""
    if isinstance(result, dict):
        message = result.get("errorMessage")
        return {
            "errorMessage": message
            if isinstance(message, str)
            else ""
            if message is None
            else json.dumps(message),
            "errorType": result.get("errorType") or function_error,
            "stackTrace": result.get("stackTrace") or [],
        }
    text = result if isinstance(result, str) else json.dumps(result)
    return {"errorMessage": text, "errorType": function_error, "stackTrace": []}
