"""Who may call, for the checks Envoy cannot make: API keys with a rate limit per key, and Lambda (REQUEST)
authorizers with their IAM policy and cached results. JWTs are verified by Envoy; only their claims come here.

Everything here runs before anything is invoked, and refuses with API Gateway's answers (401, 403, 429).
"""

from __future__ import annotations

import asyncio
import fnmatch
import functools
import hashlib
import hmac
import json
import logging
import re
import ssl
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from botocore.credentials import ReadOnlyCredentials
from google.protobuf import json_format, struct_pb2

from controlplane.aws.events import Identity
from controlplane.aws.invoke import invoke
from controlplane.aws.responses import HttpResponse, json_error
from controlplane.model.resources import RateLimit
from controlplane.model.routes import ApiKeyTable, AuthorizerTarget

log = logging.getLogger("lambdagate.extproc.gate")

JWT_NAMESPACE = "envoy.filters.http.jwt_authn"
CLAIMS_KEY = "lambdagate_jwt"
API_KEY_HEADER = "x-api-key"
# Cached authorizer results, across all authorizers of this process (least recently used go first).
MAX_CACHED = 10_000
# The most one authorizer call may take; API Gateway's own limit is 30 s, but a caller waits on it.
AUTHORIZER_TIMEOUT_S = 10.0


def claims_of(metadata: struct_pb2.Struct | None) -> tuple[dict[str, Any], list[str] | None] | None:
    """The verified claims jwt_authn left in the request's metadata, and the token's scopes."""
    if metadata is None or CLAIMS_KEY not in metadata.fields:
        return None
    claims = json_format.MessageToDict(metadata.fields[CLAIMS_KEY].struct_value)
    scopes: list[str] | None = None
    raw = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        scopes = raw.split()
    elif isinstance(raw, list):
        scopes = [str(s) for s in raw]
    return claims, scopes


class Bucket:
    """A token bucket: `requests` per `per_s`, up to `burst` at once."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, limit: RateLimit) -> None:
        self.rate = limit.requests / limit.per_s
        self.burst = float(limit.burst)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0 if a request may go now, else the seconds until one may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


@dataclass(frozen=True)
class Decision:
    """An authorizer's answer, cached per identity: the policy is evaluated for each request's methodArn."""

    principal_id: str
    statements: tuple[tuple[bool, tuple[str, ...], tuple[str, ...]], ...]  # (allow, actions, resources)
    context: dict[str, Any]
    expires: float

    def verdict(self, method_arn: str) -> bool | None:
        """True: allowed; False: explicitly denied; None: no statement allows it."""
        allowed = None
        for allow, actions, resources in self.statements:
            if not any(_action_matches(a) for a in actions):
                continue
            if not any(_arn_matches(r, method_arn) for r in resources):
                continue
            if not allow:
                return False
            allowed = True
        return allowed


def _action_matches(action: str) -> bool:
    return action.lower() in ("*", "execute-api:*", "execute-api:invoke")


@functools.lru_cache(maxsize=4096)
def _arn_pattern(resource: str) -> re.Pattern[str]:
    # IAM wildcards: * any run of characters, ? one character; nothing else is special (fnmatch's [ranges]
    # are not IAM's, so brackets are escaped to stay literal).
    return re.compile(fnmatch.translate(resource.replace("[", "[[]")))


def _arn_matches(resource: str, method_arn: str) -> bool:
    return resource == "*" or _arn_pattern(resource).match(method_arn) is not None


class PolicyError(ValueError):
    pass


def parse_answer(payload: bytes, ttl_s: float) -> Decision:
    """API Gateway's authorizer response: principalId, policyDocument (Version, Statement), context."""
    try:
        doc = json.loads(payload)
    except ValueError:
        raise PolicyError("the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise PolicyError("the answer is not a JSON object")
    policy = doc.get("policyDocument")
    if not isinstance(policy, dict):
        raise PolicyError("policyDocument is missing or not an object")
    raw_statements = policy.get("Statement")
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]
    if not isinstance(raw_statements, list):
        raise PolicyError("policyDocument.Statement is missing")
    statements = []
    for i, st in enumerate(raw_statements):
        if not isinstance(st, dict):
            raise PolicyError(f"Statement[{i}] is not an object")
        effect = st.get("Effect")
        if effect not in ("Allow", "Deny"):
            raise PolicyError(f"Statement[{i}].Effect must be Allow or Deny")
        actions = _strings(st.get("Action"), f"Statement[{i}].Action")
        resources = _strings(st.get("Resource"), f"Statement[{i}].Resource")
        statements.append((effect == "Allow", actions, resources))
    principal = doc.get("principalId", "")
    if not isinstance(principal, str):
        raise PolicyError("principalId must be a string")
    context = doc.get("context") or {}
    if not isinstance(context, dict) or any(
        not isinstance(v, (str, int, float, bool)) for v in context.values()
    ):
        # API Gateway's rule: context values are strings, numbers or booleans, never objects or lists.
        raise PolicyError("context must be an object of strings, numbers and booleans")
    return Decision(principal, tuple(statements), context, time.monotonic() + ttl_s)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PolicyError(f"{where} must be a string or a list of strings")


class Gate:
    """Per process: API-key buckets and the authorizers' result cache."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str], Bucket] = {}
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], Decision] = OrderedDict()
        self._ssl: ssl.SSLContext | None = None
        self.authorizer_calls = 0  # for tests and logs: how often an authorizer function was invoked

    # --- API keys -------------------------------------------------------------------------------------

    def api_key(
        self, table: ApiKeyTable, presented: str | None, request_id: str
    ) -> tuple[str, str] | HttpResponse:
        """(key, its name) for a known key within its rate limit; else API Gateway's 403, or 429."""
        if not presented:
            return json_error(403, "Forbidden", request_id, log_reason="API key missing")
        digest = hashlib.sha256(presented.encode()).hexdigest()
        name = None
        for known, key_name in table.digests:
            if hmac.compare_digest(known, digest):
                name = key_name
        if name is None:
            return json_error(403, "Forbidden", request_id, log_reason="API key unknown")
        limit = next((lim for key_name, lim in table.limits if key_name == name), table.rate_limit)
        if limit is not None:
            bucket = self._buckets.get((table.name, name))
            if bucket is None or (bucket.rate, bucket.burst) != (limit.requests / limit.per_s, limit.burst):
                bucket = self._buckets[(table.name, name)] = Bucket(limit)
            wait = bucket.take()
            if wait:
                out = json_error(
                    429, "Too Many Requests", request_id, log_reason=f"API key {name!r} over its rate limit"
                )
                out.headers.append(("retry-after", str(max(1, int(wait + 0.999)))))
                return out
        return presented, name

    # --- Lambda authorizers ---------------------------------------------------------------------------

    @staticmethod
    def identity(auth: AuthorizerTarget, headers: list[tuple[str, str]], path: str) -> tuple[str, ...] | None:
        """The identity sources' values, or None when one is missing (API Gateway: 401 without a call)."""
        query: dict[str, str] | None = None
        values = []
        for kind, name in auth.identity_sources:
            if kind == "header":
                value = next((v for k, v in headers if k == name), "")
            else:
                if query is None:
                    query = dict(parse_qsl(path.partition("?")[2].split("#", 1)[0], keep_blank_values=True))
                value = query.get(name, "")
            if not value.strip():
                return None
            values.append(value)
        return tuple(values)

    def cached(self, auth: AuthorizerTarget, identity: tuple[str, ...]) -> Decision | None:
        if auth.ttl_s <= 0:
            return None
        key = (auth.name, identity)
        found = self._cache.get(key)
        if found is None:
            return None
        if found.expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return found

    async def ask(
        self,
        auth: AuthorizerTarget,
        identity: tuple[str, ...],
        creds: ReadOnlyCredentials,
        event: dict[str, Any],
        request_id: str,
    ) -> Decision | HttpResponse:
        """Invoke the authorizer function; its decision, or the error answer the client gets."""
        self.authorizer_calls += 1
        body = json.dumps(event, separators=(",", ":")).encode()
        answer = await asyncio.to_thread(
            invoke,
            creds,
            auth.region,
            auth.scheme,
            auth.authority,
            auth.invocable.invoke_path,
            body,
            self._ssl_context,
            auth.timeout_s,
        )
        where = f"authorizer {auth.name} ({auth.invocable.function})"
        if answer.function_error:
            message = _error_message(answer.body)
            if message == "Unauthorized":
                # API Gateway's convention: the authorizer raises "Unauthorized" for a bad identity.
                return json_error(401, "Unauthorized", request_id, log_reason=f"{where}: Unauthorized")
            return json_error(
                500,
                "Authorizer error",
                request_id,
                log_reason=f"{where} failed",
                log_detail=message or answer.function_error,
            )
        if answer.status != 200:
            detail = answer.error or f"{answer.status} {answer.body[:300]!r}"
            return json_error(
                500, "Authorizer error", request_id, log_reason=f"{where}: no answer", log_detail=detail
            )
        try:
            decision = parse_answer(answer.body, auth.ttl_s)
        except PolicyError as err:
            return json_error(
                500,
                "Authorizer error",
                request_id,
                log_reason=f"{where}: malformed answer",
                log_detail=str(err),
            )
        if auth.ttl_s > 0:
            self._cache[(auth.name, identity)] = decision
            while len(self._cache) > MAX_CACHED:
                self._cache.popitem(last=False)
        return decision

    @staticmethod
    def admit(decision: Decision, method_arn: str, request_id: str) -> Identity | HttpResponse:
        verdict = decision.verdict(method_arn)
        if verdict:
            return Identity(principal_id=decision.principal_id, context=dict(decision.context))
        message = (
            "User is not authorized to access this resource with an explicit deny"
            if verdict is False
            else "User is not authorized to access this resource"
        )
        return json_error(403, message, request_id, log_reason=f"authorizer policy refuses {method_arn}")

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            import certifi

            self._ssl = ssl.create_default_context(cafile=certifi.where())
        return self._ssl


def _error_message(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return ""
    return str(doc.get("errorMessage", "")) if isinstance(doc, dict) else ""


def authorizer_event(event: dict[str, Any], method_arn: str) -> dict[str, Any]:
    """API Gateway's REQUEST authorizer event: the proxy event's request fields, without the body."""
    out: dict[str, Any] = {"type": "REQUEST", "methodArn": method_arn}
    for key, value in event.items():
        if key not in ("body", "isBase64Encoded"):
            out[key] = value
    return out
