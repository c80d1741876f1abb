"""One signed Invoke call made by lambdagate itself (keep-warm rounds, Lambda authorizers), not through Envoy.

Blocking (http.client): run it in a thread. The answer is read up to a limit.
"""

from __future__ import annotations

import http.client
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from botocore.credentials import ReadOnlyCredentials

from controlplane.aws.signing import sign_invoke

MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class Answer:
    status: int  # 0: no answer (connection failed, timed out)
    headers: dict[str, str] = field(default_factory=dict)  # lowercase names, last value wins
    body: bytes = b""
    error: str = ""  # why there was no answer

    @property
    def function_error(self) -> str | None:
        return self.headers.get("x-amz-function-error")


def invoke(
    creds: ReadOnlyCredentials,
    region: str,
    scheme: str,
    authority: str,
    path: str,
    body: bytes,
    ssl_context: Callable[[], ssl.SSLContext],
    timeout_s: float,
    max_bytes: int = MAX_ANSWER_BYTES,
) -> Answer:
    """POST `body` to Lambda's Invoke `path`, signed; connection failures are an Answer with status 0."""
    headers = sign_invoke(creds, region, scheme, authority, path, body, {"content-type": "application/json"})
    headers["host"] = authority  # what was signed; http.client then adds no Host of its own
    where = urlsplit(f"{scheme}://{authority}")
    tls = scheme == "https"
    host, port = where.hostname or "", where.port or (443 if tls else 80)
    conn: http.client.HTTPConnection
    if tls:
        conn = http.client.HTTPSConnection(host, port, timeout=timeout_s, context=ssl_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read(max_bytes)
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    except (OSError, http.client.HTTPException) as err:
        return Answer(0, error=type(err).__name__)
    finally:
        conn.close()
