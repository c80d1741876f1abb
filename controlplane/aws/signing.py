"""SigV4 signing of Lambda Invoke requests with botocore, and the credentials it signs with.

Credentials from a Secret are static; without a secret_ref, botocore's default chain is used, refreshed off
the event loop so the request path never waits on the network.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, ReadOnlyCredentials

from controlplane.model import AwsCredentials

log = logging.getLogger("lambdagate.aws")

SIGNED_HEADER_NAMES = ("authorization", "x-amz-date", "x-amz-security-token")


class CredentialsUnavailable(RuntimeError):
    pass


def sign_invoke(
    creds: ReadOnlyCredentials,
    region: str,
    scheme: str,
    authority: str,
    path: str,
    body: bytes,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """Sign a POST to Lambda and return the headers to send: Authorization, X-Amz-*, and any extras."""
    headers = {"host": authority}
    if extra_headers:
        headers.update(extra_headers)
    request = AWSRequest(method="POST", url=f"{scheme}://{authority}{path}", data=body, headers=headers)
    SigV4Auth(creds, "lambda", region).add_auth(request)
    out = {k.lower(): v for k, v in request.headers.items()}
    out.pop("host", None)
    return out


class DefaultChain:
    """botocore's default chain (env, profile, web identity, IMDS...), refreshed in a thread."""

    def __init__(self, refresh_margin_s: float = 300.0) -> None:
        self._frozen: ReadOnlyCredentials | None = None
        self._expiry: float | None = None
        self._lock = threading.Lock()
        self._refresh_margin_s = refresh_margin_s
        self._error: str | None = None

    def load(self) -> None:
        """Blocking: resolve the chain. Call through asyncio.to_thread."""
        import botocore.session

        with self._lock:
            try:
                creds = botocore.session.Session().get_credentials()
                if creds is None:
                    self._frozen, self._error = (
                        None,
                        "botocore's default credential chain found no credentials",
                    )
                    return
                self._frozen = creds.get_frozen_credentials()
                expiry = getattr(creds, "_expiry_time", None)
                self._expiry = expiry.timestamp() if expiry is not None else None
                self._error = None
            except Exception as err:  # botocore raises many types; the message holds no secret
                self._error = f"loading credentials failed: {type(err).__name__}: {err}"
                log.error("%s", self._error)

    def current(self) -> ReadOnlyCredentials:
        if self._frozen is None:
            raise CredentialsUnavailable(self._error or "credentials not loaded yet")
        return self._frozen

    def needs_refresh(self) -> bool:
        if self._frozen is None:
            return True
        return self._expiry is not None and self._expiry - time.time() < self._refresh_margin_s

    async def keep_fresh(self, stop: asyncio.Event, check_every_s: float = 30.0) -> None:
        while not stop.is_set():
            if self.needs_refresh():
                await asyncio.to_thread(self.load)
            try:
                await asyncio.wait_for(stop.wait(), check_every_s)
            except asyncio.TimeoutError:
                pass


def frozen(creds: AwsCredentials) -> ReadOnlyCredentials:
    return Credentials(creds.access_key, creds.secret_key, creds.session_token).get_frozen_credentials()
