"""SigV4 signing of Lambda Invoke requests with botocore, and the credentials it signs with.

Credentials from a Secret are static; without a secret_ref, botocore's default chain is used, refreshed off
the event loop so the request path never waits on the network. A web identity token (IRSA) or Pod Identity
token is watched and used again as soon as its file changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from botocore.auth import SIGNED_HEADERS_BLACKLIST
from botocore.credentials import Credentials, ReadOnlyCredentials
from botocore.utils import normalize_url_path

from controlplane.model import AwsCredentials

log = logging.getLogger("lambdagate.aws")

SIGNED_HEADER_NAMES = ("authorization", "x-amz-date", "x-amz-security-token")


class CredentialsUnavailable(RuntimeError):
    pass


class _NoRefreshTraceback(logging.Filter):
    """botocore logs a failed credential refresh with its traceback, whose message may quote what was sent to STS
    (an STS that echoes a refused token). We log those failures ourselves, scrubbed; botocore's line keeps no
    exception."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("botocore.credentials").addFilter(_NoRefreshTraceback())


def sign_invoke(
    creds: ReadOnlyCredentials,
    region: str,
    scheme: str,
    authority: str,
    path: str,
    body: bytes,
    extra_headers: dict[str, str] | None = None,
    payload_hash: str | None = None,
    now: float | None = None,
) -> dict[str, str]:
    """Sign a POST to Lambda and return the headers to send: Authorization, X-Amz-*, and any extras.

    SigV4 computed directly (hashlib/hmac), with the signing key cached per day, region and secret: the same
    bytes botocore's SigV4Auth produces (the tests hold it to botocore for every shape of request we send),
    without building botocore's request objects on the request path. With `payload_hash` (the body's hex
    SHA-256) the body is not needed: it is signed through an X-Amz-Content-SHA256 header, which is how an
    attempt is signed again without the body at hand. `scheme` is part of the URL, not of the signature.
    """
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    day = amz_date[:8]
    out: dict[str, str] = {}
    if extra_headers:
        for key, value in extra_headers.items():
            out[key.lower()] = value
    if payload_hash is not None:
        out["x-amz-content-sha256"] = payload_hash
    else:
        payload_hash = hashlib.sha256(body).hexdigest()
    out["x-amz-date"] = amz_date
    if creds.token:
        out["x-amz-security-token"] = creds.token
    signed = {k: v for k, v in out.items() if k not in _UNSIGNED}
    signed["host"] = authority
    names = sorted(signed)
    canonical_headers = "".join(f"{k}:{' '.join(signed[k].split())}\n" for k in names)
    signed_names = ";".join(names)
    canonical = "\n".join(("POST", *_canonical_target(path), canonical_headers, signed_names, payload_hash))
    scope = f"{day}/{region}/lambda/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    signature = hmac.new(_signing_key(creds.secret_key, day, region), to_sign.encode(), hashlib.sha256)
    out["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={creds.access_key}/{scope}, SignedHeaders={signed_names}, "
        f"Signature={signature.hexdigest()}"
    )
    return out


# Headers botocore's SigV4Auth never signs (its SIGNED_HEADERS_BLACKLIST).
_UNSIGNED = frozenset(h.lower() for h in SIGNED_HEADERS_BLACKLIST)
_KEYS: dict[tuple[str, str, str], bytes] = {}
_TARGETS: dict[str, tuple[str, str]] = {}
_CACHE_MAX = 1024


def _signing_key(secret: str, day: str, region: str) -> bytes:
    """HMAC(HMAC(HMAC(HMAC("AWS4"+secret, day), region), "lambda"), "aws4_request"), once a day per key."""
    cache_key = (secret, day, region)
    key = _KEYS.get(cache_key)
    if key is None:
        key = hmac.new(("AWS4" + secret).encode(), day.encode(), hashlib.sha256).digest()
        for part in (region, "lambda", "aws4_request"):
            key = hmac.new(key, part.encode(), hashlib.sha256).digest()
        if len(_KEYS) >= _CACHE_MAX:
            _KEYS.clear()  # old days and rotated keys: cheaper to rebuild than to track
        _KEYS[cache_key] = key
    return key


def _canonical_target(path: str) -> tuple[str, str]:
    """(canonical URI, canonical query) of an Invoke path, as botocore builds them: the path normalised and
    URI-encoded once more (every service but S3), the query's pairs sorted as sent."""
    target = _TARGETS.get(path)
    if target is None:
        raw_path, _, query = path.partition("?")
        pairs = sorted(pair.partition("=")[::2] for pair in query.split("&")) if query else []
        target = (
            quote(normalize_url_path(raw_path), safe="/~"),
            "&".join(f"{k}={v}" for k, v in pairs),
        )
        if len(_TARGETS) >= _CACHE_MAX:
            _TARGETS.clear()
        _TARGETS[path] = target
    return target


# How often the web identity token file is looked at (a stat, in a thread), and how long to wait before trying
# again after a reload on a changed token failed. Module-level so tests can shorten them.
TOKEN_CHECK_S = 10.0
TOKEN_RETRY_S = 30.0
WEB_IDENTITY_METHOD = "assume-role-with-web-identity"
# EKS Pod Identity (and ECS): credentials from a container endpoint, authorised by a token file kubelet rotates.
CONTAINER_METHOD = "container-role"


@dataclass(frozen=True)
class _Loaded:
    """What one successful load produced; replaced as a whole, so readers never see half of two loads."""

    frozen: ReadOnlyCredentials = field(repr=False)
    expiry: float | None
    method: str
    # The token file these credentials were obtained with (web identity, or the container endpoint's
    # authorisation token), and its stat stamp from before it was read.
    token_file: str | None = None
    token_stamp: tuple[int, int, int, int] | None = None


def web_identity_token_file(session: Any) -> str | None:
    """The token file botocore's web identity provider reads: AWS_WEB_IDENTITY_TOKEN_FILE, else the profile's
    `web_identity_token_file` (the provider's own order)."""
    if "AWS_WEB_IDENTITY_TOKEN_FILE" in os.environ:
        return os.environ["AWS_WEB_IDENTITY_TOKEN_FILE"] or None
    try:
        value = session.get_scoped_config().get("web_identity_token_file")
    except Exception:  # noqa: BLE001 - a missing profile: botocore reports it when it resolves the chain
        return None
    return str(value) if value else None


def token_files(session: Any) -> dict[str, str]:
    """The token file each token-based provider of botocore's chain would read, by the provider's method."""
    files: dict[str, str] = {}
    web = web_identity_token_file(session)
    if web:
        files[WEB_IDENTITY_METHOD] = web
    container = os.environ.get("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE")
    if container:
        files[CONTAINER_METHOD] = container
    return files


def file_stamp(path: str) -> tuple[int, int, int, int] | None:
    """What changes when a file is rewritten or swapped (kubelet swaps a symlink): device, inode, size, mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class DefaultChain:
    """botocore's default chain (env, profile, web identity, IMDS...), refreshed in a thread.

    Credentials are renewed ahead of expiry. With web identity (IRSA, `AWS_WEB_IDENTITY_TOKEN_FILE`) the token
    file is also watched: when it changes, AssumeRoleWithWebIdentity runs again at once with the new token (and
    likewise EKS Pod Identity's `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`: the endpoint is asked again).
    A failed load keeps the last good credentials (they stay valid until they expire). `generation` counts the
    successful loads, so credentials derived from these (an assumed role_arn) know when to be derived again.
    """

    def __init__(self, refresh_margin_s: float = 300.0, token_check_s: float | None = None) -> None:
        self._state: _Loaded | None = None
        self._lock = threading.Lock()
        self._refresh_margin_s = refresh_margin_s
        self.token_check_s = TOKEN_CHECK_S if token_check_s is None else token_check_s
        self._error: str | None = None
        self._retry_at = 0.0
        self.generation = 0

    def load(self) -> bool:
        """Blocking: resolve the chain afresh (a web identity token is read again). Call through
        asyncio.to_thread. True when new credentials were installed; on failure the last good ones stay."""
        import botocore.session

        with self._lock:
            files: dict[str, str] = {}
            try:
                session = botocore.session.Session()
                files = token_files(session)
                # Stamped before botocore reads them: a change during the load shows as a change next time.
                stamps = {method: file_stamp(path) for method, path in files.items()}
                creds = session.get_credentials()
                if creds is None:
                    self._failed("botocore's default credential chain found no credentials")
                    return False
                frozen = creds.get_frozen_credentials()
            except Exception as err:  # botocore raises many types (client, parser, file errors)
                message = _scrub(str(err), list(files.values()), self._state)
                self._failed(f"loading credentials failed: {type(err).__name__}: {message}")
                return False
            expiry = getattr(creds, "_expiry_time", None)
            method = str(getattr(creds, "method", ""))
            self._state = _Loaded(
                frozen,
                expiry.timestamp() if expiry is not None else None,
                method,
                files.get(method),
                stamps.get(method),
            )
            if self._error is not None and self.generation:
                log.info("default credential chain: new credentials loaded (%s)", method)
            self._error = None
            self._retry_at = 0.0
            self.generation += 1
            return True

    def _failed(self, error: str) -> None:
        repeated = error == self._error
        self._error = error
        if self._state is None:
            (log.debug if repeated else log.error)("default credential chain: %s", error)
        else:
            (log.debug if repeated else log.warning)(
                "default credential chain: %s; keeping the current credentials until they expire", error
            )

    def current(self) -> ReadOnlyCredentials:
        state = self._state
        if state is None:
            raise CredentialsUnavailable(self._error or "credentials not loaded yet")
        return state.frozen

    @property
    def method(self) -> str | None:
        """How botocore found the current credentials (env, assume-role-with-web-identity, iam-role...)."""
        state = self._state
        return state.method if state is not None else None

    @property
    def token_file(self) -> str | None:
        """The token file being watched, if the credentials came from one (web identity, Pod Identity)."""
        state = self._state
        return state.token_file if state is not None else None

    def needs_refresh(self) -> bool:
        state = self._state
        if state is None:
            return True
        return state.expiry is not None and state.expiry - time.time() < self._refresh_margin_s

    def token_changed(self) -> bool:
        """Blocking (a stat): whether the watched token file differs from the one the credentials came from."""
        state = self._state
        if state is None or state.token_file is None:
            return False
        return file_stamp(state.token_file) != state.token_stamp

    def reload_if_token_changed(self) -> bool:
        """Blocking: if the token file changed, get credentials with the new token (AssumeRoleWithWebIdentity,
        or the container endpoint) at most every TOKEN_RETRY_S after a failure. True when new ones are in use."""
        if time.monotonic() < self._retry_at or not self.token_changed():
            return False
        path, how = self.token_file, self.method
        log.info("token file %s changed; getting new credentials with it (%s)", path, how)
        if self.load():
            state = self._state
            expiry = state.expiry if state is not None else None
            until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expiry)) if expiry else "no expiry"
            log.info("token file %s: new credentials in use (until %s)", path, until)
            return True
        self._retry_at = time.monotonic() + TOKEN_RETRY_S
        return False

    async def keep_fresh(self, stop: asyncio.Event, check_every_s: float = 30.0) -> None:
        while not stop.is_set():
            if self.needs_refresh():
                await asyncio.to_thread(self.load)
            elif self.token_file is not None and time.monotonic() >= self._retry_at:
                await asyncio.to_thread(self.reload_if_token_changed)
            wait = min(check_every_s, self.token_check_s) if self.token_file is not None else check_every_s
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except asyncio.TimeoutError:
                pass


def _scrub(message: str, files: list[str], state: _Loaded | None) -> str:
    """Remove what must never reach a log from an error message: the tokens and the current keys."""
    secrets: list[str] = []
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                secrets.append(f.read().strip())
        except OSError:
            pass
    if state is not None:
        secrets += [state.frozen.access_key, state.frozen.secret_key, state.frozen.token or ""]
    # STS refuses tokens under 4 characters before sending them anywhere, so shorter ones cannot be echoed.
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def frozen(creds: AwsCredentials) -> ReadOnlyCredentials:
    return Credentials(creds.access_key, creds.secret_key, creds.session_token).get_frozen_credentials()
