"""Server-side AWS Signature Version 4 verification for the local Lambda endpoint.

Recomputes the signature with botocore's own SigV4 signer over the request as received and compares.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

from botocore.auth import EMPTY_SHA256_HASH, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

MAX_CLOCK_SKEW_S = 300
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"

_ALGORITHM = "AWS4-HMAC-SHA256"
_AMZ_DATE_RE = re.compile(r"(\d{4})(\d{2})(\d{2})T(\d{2})(\d{2})(\d{2})Z")
_SIGNATURE_RE = re.compile(r"[0-9a-f]{64}")
_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
)
_SIGNER_CACHE_MAX = 256


class SigV4Error(Exception):
    """A rejected request: AWS error code, HTTP status and a message that is safe to return."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


class _SignedHeaders:
    """The signed headers of a received request, as the small mapping botocore's signer reads.

    Stands in for botocore's HTTPHeaders (an email.message.Message, slow to fill) on the request path.
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, list[str]] = {}

    def add(self, name: str, value: str) -> None:
        self._values.setdefault(name, []).append(value)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._values

    def __getitem__(self, name: str) -> str:
        return ",".join(self._values[name.lower()])

    def get_all(self, name: str, failobj: Any = None) -> list[str] | Any:
        return self._values.get(name.lower(), failobj)

    def items(self) -> list[tuple[str, str]]:
        return [(name, value) for name, values in self._values.items() for value in values]


class _ReceivedRequestSigV4(SigV4Auth):  # type: ignore[misc]  # botocore ships no type hints
    """botocore's signer, canonicalising exactly what the client declared as signed.

    botocore drops some headers (user-agent, connection, ...) and invents `host` when signing; a
    verifier has to take the client's SignedHeaders list at its word instead.
    """

    def __init__(self, credentials: Credentials, service_name: str, region_name: str) -> None:
        super().__init__(credentials, service_name, region_name)
        self._signing_key: tuple[str, bytes] | None = None

    def signature(self, string_to_sign: str, request: AWSRequest) -> str:
        # The derived key only changes with the scope date; deriving it is four HMACs per request
        # otherwise. Same derivation as SigV4Auth.signature, remembered for the day.
        date = request.context["timestamp"][0:8]
        cached = self._signing_key
        if cached is None or cached[0] != date:
            key = self._sign(f"AWS4{self.credentials.secret_key}".encode(), date)
            for part in (self._region_name, self._service_name, "aws4_request"):
                key = self._sign(key, part)
            cached = self._signing_key = (date, key)
        signature: str = self._sign(cached[1], string_to_sign, hex=True)
        return signature

    def headers_to_sign(self, request: AWSRequest) -> Any:
        return request.headers

    def payload(self, request: AWSRequest) -> str:
        # The received body is always bytes; hashing it directly skips AWSRequest.prepare(), which
        # copies and rewrites the whole request just to hand back the same bytes.
        body = request.data
        return hashlib.sha256(body).hexdigest() if body else EMPTY_SHA256_HASH


def _utc_stamp(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class SigV4Verifier:
    """Checks `Authorization: AWS4-HMAC-SHA256 ...` headers against a fixed set of access keys."""

    def __init__(
        self,
        credentials: Mapping[str, str],
        *,
        service: str = "lambda",
        region: str | None = None,
        allow_unsigned_payload: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secrets = dict(credentials)
        self._service = service
        self._region = region
        self._allow_unsigned_payload = allow_unsigned_payload
        self._clock = clock
        self._signers: dict[tuple[str, str], _ReceivedRequestSigV4] = {}

    def set_credentials(self, credentials: Mapping[str, str]) -> None:
        """Replace the accepted keys (a rotated Secret). Cached signers hold secrets, so they go too."""
        self._secrets = dict(credentials)
        self._signers = {}

    def verify(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
    ) -> str:
        """Return the caller's access key id, or raise SigV4Error.

        `target` is the request target exactly as sent (percent-encoded path and query); `headers` are
        (lower-case name, value) pairs in arrival order, repeats included.
        """
        header_pairs = list(headers)
        values: dict[str, str] = {}
        for name, value in header_pairs:
            values[name] = f"{values[name]},{value}" if name in values else value

        authorization = values.get("authorization")
        if authorization is None:
            raise SigV4Error("MissingAuthenticationTokenException", "Missing Authentication Token")
        access_key, scope_date, region, signed, signature = self._parse_authorization(authorization)

        secret = self._secrets.get(access_key)
        if secret is None:
            raise SigV4Error(
                "UnrecognizedClientException", "The security token included in the request is invalid."
            )

        amz_date = values.get("x-amz-date")
        if amz_date is None:
            raise SigV4Error(
                "IncompleteSignatureException",
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
            )
        self._check_date(amz_date, scope_date)

        signed_names = signed.split(";")
        signed_set = set(signed_names)
        for required, label in (("host", "'Host' or ':authority'"), ("x-amz-date", "'X-Amz-Date'")):
            if required not in signed_set:
                raise SigV4Error(
                    "InvalidSignatureException", f"{label} must be a 'SignedHeader' in the AWS Authorization."
                )
        if "x-amz-security-token" in values and "x-amz-security-token" not in signed_set:
            raise SigV4Error(
                "InvalidSignatureException",
                "'X-Amz-Security-Token' must be a 'SignedHeader' in the AWS Authorization.",
            )
        if not signed_set.issubset(values):
            raise SigV4Error("InvalidSignatureException", _MISMATCH)

        # The URL only carries path and query: the signed Host header goes in with the other headers.
        request = AWSRequest(method=method, url=f"http://localhost{target}", data=body)
        # Only the signed headers, repeats kept, so botocore canonicalises what the client signed.
        signed_headers = _SignedHeaders()
        for name, value in header_pairs:
            if name in signed_set:
                signed_headers.add(name, value)
        request.headers = signed_headers
        request.context["timestamp"] = amz_date
        signer = self._signer(access_key, secret, region)
        canonical_request = signer.canonical_request(request)
        string_to_sign = signer.string_to_sign(request, canonical_request)
        expected = signer.signature(string_to_sign, request)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise SigV4Error("InvalidSignatureException", _MISMATCH)

        # botocore trusts a signed x-amz-content-sha256 in place of hashing the body, so the header has
        # to be checked against the body that actually arrived.
        content_sha = values.get("x-amz-content-sha256") if "x-amz-content-sha256" in signed_set else None
        if content_sha is not None:
            if content_sha == UNSIGNED_PAYLOAD:
                if not self._allow_unsigned_payload:
                    raise SigV4Error("InvalidSignatureException", "Unsigned payloads are not accepted.")
            elif not hmac.compare_digest(content_sha.encode(), hashlib.sha256(body).hexdigest().encode()):
                raise SigV4Error(
                    "InvalidSignatureException",
                    "The provided 'x-amz-content-sha256' header does not match what was computed.",
                )
        return access_key

    def _parse_authorization(self, authorization: str) -> tuple[str, str, str, str, str]:
        algorithm, _, params = authorization.strip().partition(" ")
        if algorithm != _ALGORITHM:
            raise SigV4Error(
                "IncompleteSignatureException", f"Unsupported AWS 'algorithm': '{algorithm[:32]}'."
            )
        fields: dict[str, str] = {}
        for part in params.split(","):
            key, sep, value = part.strip().partition("=")
            if sep:
                fields[key] = value
        missing = [key for key in ("Credential", "SignedHeaders", "Signature") if not fields.get(key)]
        if missing:
            raise SigV4Error(
                "IncompleteSignatureException",
                " ".join(f"Authorization header requires '{key}' parameter." for key in missing),
            )
        scope = fields["Credential"].split("/")
        if len(scope) != 5 or not all(scope):
            raise SigV4Error(
                "IncompleteSignatureException",
                "Credential must have exactly 5 slash-delimited elements, "
                "e.g. keyid/date/region/service/term.",
            )
        access_key, scope_date, region, service, terminator = scope
        if terminator != "aws4_request":
            raise SigV4Error(
                "InvalidSignatureException",
                "Credential should be scoped with a valid terminator: 'aws4_request', "
                f"not '{terminator[:32]}'.",
            )
        if service != self._service:
            raise SigV4Error(
                "InvalidSignatureException",
                f"Credential should be scoped to correct service: '{self._service}'.",
            )
        if self._region is not None and region != self._region:
            raise SigV4Error("InvalidSignatureException", "Credential should be scoped to a valid region.")
        signature = fields["Signature"]
        if not _SIGNATURE_RE.fullmatch(signature):
            raise SigV4Error("InvalidSignatureException", _MISMATCH)
        return access_key, scope_date, region, fields["SignedHeaders"], signature

    def _check_date(self, amz_date: str, scope_date: str) -> None:
        match = _AMZ_DATE_RE.fullmatch(amz_date)
        try:
            if match is None:
                raise ValueError(amz_date)
            year, month, day, hour, minute, second = (int(group) for group in match.groups())
            signed_at = datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc).timestamp()
        except ValueError:
            raise SigV4Error(
                "IncompleteSignatureException",
                "X-Amz-Date must be in the ISO-8601 basic format yyyyMMdd'T'HHmmss'Z'.",
            ) from None
        if scope_date != amz_date[:8]:
            raise SigV4Error(
                "InvalidSignatureException",
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: "
                f"'{scope_date[:16]}' != '{amz_date[:8]}', from '{amz_date}'.",
            )
        now = self._clock()
        if signed_at < now - MAX_CLOCK_SKEW_S:
            raise SigV4Error(
                "InvalidSignatureException",
                f"Signature expired: {amz_date} is now earlier than {_utc_stamp(now - MAX_CLOCK_SKEW_S)} "
                f"({_utc_stamp(now)} - 5 min.)",
            )
        if signed_at > now + MAX_CLOCK_SKEW_S:
            raise SigV4Error(
                "InvalidSignatureException",
                f"Signature not yet current: {amz_date} is still later than "
                f"{_utc_stamp(now + MAX_CLOCK_SKEW_S)} "
                f"({_utc_stamp(now)} + 5 min.)",
            )

    def _signer(self, access_key: str, secret: str, region: str) -> _ReceivedRequestSigV4:
        key = (access_key, region)
        signer = self._signers.get(key)
        if signer is None:
            if len(self._signers) >= _SIGNER_CACHE_MAX:
                # Regions come from the client when the server is not pinned to one; keep this bounded.
                self._signers.clear()
            signer = self._signers[key] = _ReceivedRequestSigV4(
                Credentials(access_key, secret), self._service, region
            )
        return signer
