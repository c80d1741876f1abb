"""KrakenD's `backend/lambda` semantics (payload format `raw`): no API Gateway envelope either way.

A GET (or HEAD) sends a JSON object of the request's parameters; any other method sends its body as is, which
must then be JSON, as Lambda's Invoke API requires. The function's output is the client's 200 JSON answer.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from controlplane.aws.events import HttpRequest, RouteInfo, path_parameters
from controlplane.aws.responses import HttpResponse


class NotJson(ValueError):
    """A non-GET body that Lambda would refuse (the raw format passes bodies on unchanged)."""


def raw_payload(req: HttpRequest, route: RouteInfo) -> bytes:
    """The Invoke payload: the parameters of a GET/HEAD, or the body of anything else."""
    raw_path, _, query = req.path.partition("?")
    if req.method in ("GET", "HEAD"):
        params: dict[str, Any] = {}
        for key, value in parse_qsl(query.split("#", 1)[0], keep_blank_values=True):
            # A repeated query parameter becomes a list, in the order sent.
            if key in params:
                prev = params[key]
                params[key] = [*prev, value] if isinstance(prev, list) else [prev, value]
            else:
                params[key] = value
        # Path parameters win over query parameters of the same name: the route, not the client, chose them.
        params.update(path_parameters(route, raw_path.split("#", 1)[0]) or {})
        return json.dumps(params, separators=(",", ":"), ensure_ascii=False).encode()
    if not req.body.strip():
        return b"{}"
    try:
        # Strict: UTF-8 only (no BOM, no UTF-16), and no NaN/Infinity, which Python accepts and Lambda refuses.
        json.loads(req.body.decode("utf-8"), parse_constant=_no_constants)
    except ValueError as err:  # UnicodeDecodeError included
        raise NotJson(f"the body is not JSON ({err})") from None
    return req.body


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def raw_response(payload: bytes) -> HttpResponse:
    """The function's output, unchanged, as a 200 JSON answer."""
    return HttpResponse(200, [("content-type", "application/json")], payload)
