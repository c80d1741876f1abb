"""Turns what the Lambda Invoke API answered into the HTTP response the client gets.

Covers the proxy response (statusCode, headers, multiValueHeaders, body, isBase64Encoded), function errors,
and the Invoke API's own errors. Nothing a function or AWS says about internals reaches the client.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

# Headers a function may not set: they describe the connection, which Envoy owns.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "content-length",
        "host",
    }
)


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    # For the gateway's log only; never sent.
    log_reason: str | None = None
    log_detail: str | None = None
    # One of the model's ERROR_KINDS when this is a mappable failure (`options.errors`), else None.
    kind: str | None = None


# RFC 9110: a field name is a token; a value is visible ASCII, spaces and tabs.
HEADER_NAME_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
HEADER_VALUE_RE = re.compile(r"^[\t\x20-\x7e]*$")
MAX_HEADER_VALUE = 16 * 1024
# Envoy's default limit on response headers is 60 KiB; stay under it with room for its own.
MAX_HEADER_BYTES = 48 * 1024


class MalformedResponse(ValueError):
    """The function's answer is not a valid proxy response."""


def json_error(status: int, message: str, request_id: str, **log: str | None) -> HttpResponse:
    body = json.dumps({"message": message, "requestId": request_id}).encode()
    return HttpResponse(status, [("content-type", "application/json")], body, **log)


def _header_value(value: Any, where: str) -> str:
    if isinstance(value, str):
        out = value
    elif isinstance(value, bool):
        out = "true" if value else "false"
    elif isinstance(value, (int, float)):
        out = str(value)
    else:
        raise MalformedResponse(f"{where} must be a string, got {type(value).__name__}")
    if len(out) > MAX_HEADER_VALUE:
        raise MalformedResponse(f"{where} is {len(out)} characters long; the limit is {MAX_HEADER_VALUE}")
    if not HEADER_VALUE_RE.match(out):
        # Envoy refuses such a mutation and answers an empty 500; refuse it here with a reason instead.
        raise MalformedResponse(f"{where} contains a control character or non-ASCII text")
    return out


def _header_name(name: Any) -> str:
    if not isinstance(name, str) or not HEADER_NAME_RE.match(name):
        raise MalformedResponse(f"header name {str(name)[:100]!r} is not an HTTP token (RFC 9110)")
    return name.lower()


def _load(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError) as err:
        raise MalformedResponse(f"the function's result is not JSON ({err})") from None


def unwrap_proxy_response(payload: bytes) -> HttpResponse:
    """Parse a REST (1.0) proxy response; raises MalformedResponse with a reason for the log."""
    doc = _load(payload)
    if not isinstance(doc, dict):
        raise MalformedResponse(
            f"the function returned a JSON {type(doc).__name__}, not an object with statusCode"
        )
    if "statusCode" not in doc:
        raise MalformedResponse("the function's result has no statusCode")
    return _structured(doc, multi_value=True)


def _structured(doc: dict[str, Any], *, multi_value: bool) -> HttpResponse:
    """A response object with statusCode; `multi_value`: honour multiValueHeaders (REST does, HTTP API not)."""
    status = doc["statusCode"]
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
        # 1xx are interim answers a proxy response cannot carry; Envoy would fail on them.
        raise MalformedResponse(f"statusCode {doc['statusCode']!r} is not a final HTTP status (200-599)")

    headers: list[tuple[str, str]] = []
    single = doc.get("headers") or {}
    multi = (doc.get("multiValueHeaders") or {}) if multi_value else {}
    if not isinstance(single, dict):
        raise MalformedResponse("headers must be an object")
    if not isinstance(multi, dict):
        raise MalformedResponse("multiValueHeaders must be an object")
    seen_multi: set[str] = set()
    for name, values in multi.items():
        lname = _header_name(name)
        if not isinstance(values, list):
            raise MalformedResponse(f"multiValueHeaders.{name} must be a list")
        seen_multi.add(lname)
        if lname in HOP_BY_HOP:
            continue
        headers.extend((lname, _header_value(v, f"multiValueHeaders.{name}")) for v in values)
    for name, value in single.items():
        lname = _header_name(name)
        if lname in HOP_BY_HOP:
            continue
        v = _header_value(value, f"headers.{name}")
        # API Gateway: a name in both maps keeps the multi-value list, except that distinct values are added.
        if lname in seen_multi and any(h == (lname, v) for h in headers):
            continue
        headers.append((lname, v))

    if sum(len(k) + len(v) + 4 for k, v in headers) > MAX_HEADER_BYTES:
        raise MalformedResponse(f"the headers add up to more than {MAX_HEADER_BYTES} bytes")
    body = doc.get("body")
    is_b64 = doc.get("isBase64Encoded", False)
    if not isinstance(is_b64, bool):
        raise MalformedResponse("isBase64Encoded must be true or false")
    if body is None:
        raw = b""
    elif isinstance(body, str):
        if is_b64:
            try:
                raw = base64.b64decode(body, validate=True)
            except (binascii.Error, ValueError):
                raise MalformedResponse("body is marked isBase64Encoded but is not valid base64") from None
        else:
            raw = body.encode("utf-8")
    elif isinstance(body, (dict, list)) and not is_b64:
        # KrakenD accepts an object as body; users moving from it expect the same.
        raw = json.dumps(body).encode()
        if not any(h[0] == "content-type" for h in headers):
            headers.append(("content-type", "application/json"))
    else:
        raise MalformedResponse(f"body must be a string, got {type(body).__name__}")
    return HttpResponse(status, headers, raw)


def unwrap_v2_response(payload: bytes) -> HttpResponse:
    """Parse an HTTP API (2.0) answer, as API Gateway does.

    An object with statusCode is a structured response: headers (one value each, comma-joined), `cookies`
    (each becomes a Set-Cookie header), body and isBase64Encoded. Any other valid JSON is the body of a 200
    with content-type application/json, as the function returned it.
    """
    doc = _load(payload)
    if not isinstance(doc, dict) or "statusCode" not in doc:
        return HttpResponse(200, [("content-type", "application/json")], payload.strip())
    cookies = doc.get("cookies") or []
    if not isinstance(cookies, list):
        raise MalformedResponse("cookies must be a list of strings")
    out = _structured(doc, multi_value=False)
    for i, cookie in enumerate(cookies):
        out.headers.append(("set-cookie", _header_value(cookie, f"cookies[{i}]")))
    return out


def _short(payload: bytes, limit: int = 500) -> str:
    text = payload[:limit].decode("utf-8", "replace")
    return text + ("..." if len(payload) > limit else "")


def function_error(payload: bytes, kind: str, request_id: str) -> HttpResponse:
    """A function that raised (X-Amz-Function-Error): 502 for the client, the details for the log."""
    detail = ""
    try:
        doc = json.loads(payload)
        if isinstance(doc, dict):
            detail = f"{doc.get('errorType', 'Error')}: {doc.get('errorMessage', '')}"
            if doc.get("errorType") == "Sandbox.Timedout" or "Task timed out" in str(
                doc.get("errorMessage", "")
            ):
                out = json_error(
                    504,
                    "Endpoint request timed out",
                    request_id,
                    log_reason="function timed out",
                    log_detail=detail,
                )
                out.kind = "function_timeout"
                return out
    except ValueError:
        detail = _short(payload)
    out = json_error(
        502,
        "Internal server error",
        request_id,
        log_reason=f"function error ({kind})",
        log_detail=detail or _short(payload),
    )
    out.kind = "function_error"
    return out


def invoke_api_error(
    status: int, error_type: str, payload: bytes, request_id: str, retry_after: str | None
) -> HttpResponse:
    """The Invoke API refused the call itself. Map it to what a client of a gateway can act on."""
    message, code = _error_body(payload)
    etype = error_type.split(":", 1)[0] or code
    detail = f"{etype or 'HTTP ' + str(status)}: {message}"
    if status == 429 or etype in ("TooManyRequestsException", "EC2ThrottledException"):
        resp = json_error(
            429, "Too Many Requests", request_id, log_reason="Lambda throttled", log_detail=detail
        )
        # A client told to slow down is told when to come back: Lambda's own hint, or a second.
        resp.headers.append(("retry-after", _retry_after(retry_after, payload)))
        resp.kind = "throttled"
        return resp
    if etype in (
        "InvalidSignatureException",
        "UnrecognizedClientException",
        "IncompleteSignatureException",
        "MissingAuthenticationTokenException",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
    ):
        return json_error(
            502,
            f"Lambda rejected the gateway's request signature ({etype})",
            request_id,
            log_reason="signature rejected: check the Upstream's credentials",
            log_detail=detail,
        )
    if etype in ("AccessDeniedException", "AccessDenied") or status == 403:
        return json_error(
            502,
            f"Lambda denied the invocation ({etype or 'AccessDenied'})",
            request_id,
            log_reason="access denied: the credentials may not invoke this function",
            log_detail=detail,
        )
    if etype == "ResourceNotFoundException" or status == 404:
        return json_error(
            502, "Lambda function not found", request_id, log_reason="function not found", log_detail=detail
        )
    if etype == "RequestTooLargeException" or status == 413:
        return json_error(
            413,
            "Request payload too large",
            request_id,
            log_reason="payload over Lambda's limit",
            log_detail=detail,
        )
    if status == 504:
        return json_error(
            504,
            "Endpoint request timed out",
            request_id,
            log_reason="Lambda API timed out",
            log_detail=detail,
        )
    return json_error(
        502, "Bad gateway", request_id, log_reason=f"Lambda API error {status}", log_detail=detail
    )


def _retry_after(header: str | None, payload: bytes) -> str:
    """Whole seconds from Lambda's Retry-After header or its body's retryAfterSeconds, at least 1."""
    candidates: list[Any] = [header]
    try:
        doc = json.loads(payload)
        if isinstance(doc, dict):
            candidates.append(doc.get("retryAfterSeconds"))
    except ValueError:
        pass
    for value in candidates:
        try:
            seconds = float(str(value).strip())
        except ValueError:
            continue
        if 0 <= seconds <= 3600:
            return str(max(1, math.ceil(seconds)))
    return "1"


def _error_body(payload: bytes) -> tuple[str, str]:
    """(message, error code) from an AWS error body: JSON as Lambda sends it, or the XML some emulators send."""
    try:
        doc = json.loads(payload)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        code = str(doc.get("__type") or doc.get("code") or doc.get("Code") or "").rsplit("#", 1)[-1]
        return str(doc.get("message") or doc.get("Message") or ""), code
    text = payload[:4000].decode("utf-8", "replace")
    code_m = re.search(r"<Code>([^<]{1,100})</Code>", text)
    msg_m = re.search(r"<Message>([^<]{0,500})</Message>", text)
    if code_m or msg_m:
        return (msg_m.group(1) if msg_m else ""), (code_m.group(1) if code_m else "")
    return _short(payload, 200), ""


def gateway_error(status: int, request_id: str, detail: str) -> HttpResponse:
    """Envoy answered instead of Lambda (no route to it, timeout, reset)."""
    if status == 504:
        return json_error(
            504, "Endpoint request timed out", request_id, log_reason="upstream timeout", log_detail=detail
        )
    if status == 413:
        return json_error(
            413, "Request payload too large", request_id, log_reason="request too large", log_detail=detail
        )
    if status == 503:
        return json_error(
            503,
            "Service Unavailable",
            request_id,
            log_reason="Lambda endpoint unreachable",
            log_detail=detail,
        )
    # Not Lambda's answer, and not a client error Envoy made: the gateway cannot vouch for it (even a 200).
    return json_error(
        502 if status >= 500 or status < 400 else status,
        "Bad gateway",
        request_id,
        log_reason=f"gateway error {status}",
        log_detail=detail,
    )
