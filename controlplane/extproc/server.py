"""The ext_proc server: each Envoy stream is one request, turned into a SigV4-signed Lambda Invoke and back.

Request headers (and body) become the API Gateway 1.0 event, signed and sent by Envoy to Lambda; Lambda's
answer becomes the HTTP response. Anything that cannot be done correctly ends the request: it fails closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import itertools
import json
import logging
import os
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass, field

import grpc
from botocore.credentials import ReadOnlyCredentials
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2

from controlplane.aws.events import (
    HttpRequest,
    Identity,
    RouteInfo,
    build_v1_event,
    build_v2_event,
    path_parameters,
)
from controlplane.aws.integration import MappingFailed, build_payload, build_response
from controlplane.aws.raw import NotJson, raw_payload, raw_response
from controlplane.aws.responses import (
    HttpResponse,
    MalformedResponse,
    function_error,
    gateway_error,
    invoke_api_error,
    json_error,
    unwrap_proxy_response,
    unwrap_v2_response,
)
from controlplane.aws.roles import RoleCache, RoleCredentials
from controlplane.aws.signing import CredentialsUnavailable, DefaultChain, frozen, sign_invoke
from controlplane.extproc.gate import (
    API_KEY_HEADER,
    JWT_NAMESPACE,
    Decision,
    Gate,
    authorizer_event,
    claims_of,
)
from controlplane.model.resources import ERROR_KINDS
from controlplane.model.routes import AuthorizerTarget, Invocable, RouteTarget

log = logging.getLogger("lambdagate.extproc")

# The gRPC server options for ext_proc (and the control plane's server, which may serve it too).
GRPC_OPTIONS = [
    # Buffered bodies travel in one message: room for a 6 MB Lambda payload, base64 and the event around it.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]

FILTER_NAME = "envoy.filters.http.ext_proc"
# Bodies above this are processed in a worker thread (measured: a 6 MB body costs ~60 ms of CPU).
LARGE_BODY = 256 * 1024
# Lambda's invocation payload limits: 6 MB for a synchronous call, 1 MB for an asynchronous (Event) one.
MAX_SYNC_PAYLOAD = 6 * 1024 * 1024
MAX_ASYNC_PAYLOAD = 1024 * 1024
# Headers of the Invoke call besides the signature's, per invocation type (signed too).
INVOKE_HEADERS = {
    "RequestResponse": {"content-type": "application/json"},
    "Event": {"content-type": "application/json", "x-amz-invocation-type": "Event"},
    "DryRun": {"content-type": "application/json", "x-amz-invocation-type": "DryRun"},
}
# Set on requests of routes with retries: the route whose credentials sign each attempt again. The upstream
# ext_proc of the retrying cluster reads it (and leaves it: a retry reuses the headers); a client's own copy is
# always removed or overwritten.
RESIGN_HEADER = "x-lambdagate-sign"
# Tracing headers passed on to the Invoke call (Lambda and X-Ray read X-Amzn-Trace-Id; botocore never signs it).
TRACE_HEADER = "x-amzn-trace-id"
TRACEPARENT_RE = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
AMZN_TRACE_RE = re.compile(r"^[\x21-\x7e]{1,256}$")
# A function named by a path parameter: a logical name's characters, looked up among the Upstream's names.
PARAM_NAME_RE = re.compile(r"^[A-Za-z0-9._:$-]{1,170}$")
# Response headers Envoy or the client should keep from Lambda's answer; everything else is Lambda's own.
KEPT_RESPONSE_HEADERS = frozenset({"date"})
_TRUE = wrappers_pb2.BoolValue(value=True)
CONTINUE = pb.CommonResponse()


@dataclass(frozen=True)
class CompiledTarget:
    """A RouteTarget with what the hot path needs ready: parsed route info and signing credentials."""

    target: RouteTarget
    route: RouteInfo
    scheme: str
    # botocore's ReadOnlyCredentials is a namedtuple whose repr shows the secret.
    credentials: ReadOnlyCredentials | None = field(repr=False)
    # The role's keys, kept fresh off the request path (routes with role_arn only).
    role: RoleCredentials | None = field(default=None, repr=False)
    # The one function of a route without weighted choices or a path parameter.
    fixed: Invocable | None = None
    # Cumulative weights of weighted choices, for random.choices.
    cum_weights: tuple[int, ...] = ()
    # The Lambda authorizer's signing keys (its own Upstream's), like `credentials` and `role` above.
    auth_credentials: ReadOnlyCredentials | None = field(default=None, repr=False)
    auth_role: RoleCredentials | None = field(default=None, repr=False)


class RouteTable:
    """The routes ext_proc serves, one generation per route-configuration version.

    A generation stays resolvable while some Envoy still holds (or is being sent) that version: after a NACK,
    or with a slow Envoy, requests keep arriving with route names of an older configuration.
    """

    def __init__(self, roles: RoleCache | None = None) -> None:
        self.roles = roles if roles is not None else RoleCache()
        self._generations: dict[str, dict[str, CompiledTarget]] = {}
        self._current = ""
        self._in_use: set[str] = set()
        self._merged: dict[str, CompiledTarget] = {}

    def update(self, targets: Mapping[str, RouteTarget], version: str) -> None:
        compiled: dict[str, CompiledTarget] = {}
        previous = self._generations.get(self._current, {})
        for name, t in targets.items():
            old = previous.get(name)
            if old is not None and old.target is t:
                # translate hands back the very same target for an unchanged route: nothing to compile again
                # (10,000 routes, 3,333 regexes: 194 ms a change otherwise).
                compiled[name] = old
                continue
            m = t.matcher
            regex = None
            if m.template_regex is not None:
                regex = re.compile(m.template_regex)
            elif m.kind == "regex" and m.params:
                regex = re.compile(m.value)
            route = RouteInfo(
                t.resource,
                t.stage,
                regex,
                m.value if m.kind == "prefix" else None,
                dict(t.stage_variables) or None,
                t.route_key,
            )
            creds = frozen(t.credentials) if t.credentials else None
            role = self.roles.get(t.credentials, t.role_arn, t.region) if t.role_arn else None
            fixed = None
            if not t.choices and t.function_param is None:
                fixed = Invocable(t.function, t.function_name, t.qualifier, t.invoke_path)
            cum = tuple(itertools.accumulate(c.weight for c in t.choices))
            a = t.authorizer
            auth_creds = frozen(a.credentials) if a is not None and a.credentials else None
            auth_role = (
                self.roles.get(a.credentials, a.role_arn, a.region) if a is not None and a.role_arn else None
            )
            compiled[name] = CompiledTarget(
                t, route, t.scheme, creds, role, fixed, cum, auth_creds, auth_role
            )
        self._generations[version] = compiled
        self._current = version
        self._rebuild()

    def retain(self, in_use: set[str]) -> None:
        """Forget generations no connected Envoy can still route with."""
        self._in_use = set(in_use)
        self._rebuild()

    def _rebuild(self) -> None:
        keep = self._in_use | {self._current}
        self._generations = {v: g for v, g in self._generations.items() if v in keep}
        merged: dict[str, CompiledTarget] = {}
        for version, generation in self._generations.items():
            if version != self._current:
                merged.update(generation)
        # Names hash their target, so generations agree on a shared name; the newest credentials win.
        merged.update(self._generations.get(self._current, {}))
        self._merged = merged
        self.roles.retain({r for t in merged.values() for r in (t.role, t.auth_role) if r is not None})

    @property
    def generations(self) -> int:
        return len(self._generations)

    def get(self, name: str) -> CompiledTarget | None:
        return self._merged.get(name)

    def __len__(self) -> int:
        return len(self._generations.get(self._current, {}))


def _header(key: str, value: str | bytes, append: bool = False) -> base_pb2.HeaderValueOption:
    raw = value if isinstance(value, bytes) else value.encode("utf-8")
    opt = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=raw))
    if append:
        # This Envoy ignores append_action in ext_proc mutations; the legacy BoolValue is what repeats a header.
        opt.append.CopyFrom(_TRUE)
    return opt


def _headers_of(msg: pb.HttpHeaders) -> list[tuple[str, str]]:
    out = []
    for h in msg.headers.headers:
        out.append((h.key, h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value))
    return out


class Processor:
    """One HTTP request's journey through ext_proc. Created on request_headers."""

    __slots__ = (
        "server",
        "target",
        "request_id",
        "method",
        "path",
        "authority",
        "headers",
        "source_ip",
        "protocol",
        "resp_status",
        "resp_headers",
        "chosen",
        "finished",
        "trace_header",
        "traceparent",
        "identity",
        "mapping",
    )

    def __init__(self, server: ExtProcServer) -> None:
        self.server = server
        self.target: CompiledTarget | None = None
        self.request_id = ""
        self.method = ""
        self.path = ""
        self.authority = ""
        self.headers: list[tuple[str, str]] = []
        self.source_ip = ""
        self.protocol = "HTTP/1.1"
        self.resp_status = 0
        self.resp_headers: dict[str, str] = {}
        self.chosen: Invocable | None = None
        # Set once the last message this stream will see has been answered.
        self.finished = False
        # The client's tracing headers (first of each), read while the headers are walked anyway.
        self.trace_header: str | None = None
        self.traceparent: str | None = None
        # Who is calling (JWT claims, a Lambda authorizer's principal and context, an API key), for the event.
        self.identity: Identity | None = None
        # A non-proxy integration's request context, kept for its response templates.
        self.mapping: Mapping[str, object] = {}

    # --- request path -------------------------------------------------------------------------------

    def on_request_headers(
        self, req: pb.ProcessingRequest
    ) -> pb.ProcessingResponse | Awaitable[pb.ProcessingResponse]:
        route_name = ""
        attrs = req.attributes.get(FILTER_NAME)
        if attrs is not None:
            fields = attrs.fields
            if "xds.route_name" in fields:
                route_name = fields["xds.route_name"].string_value
            if "source.address" in fields:
                self.source_ip = fields["source.address"].string_value.rsplit(":", 1)[0].strip("[]")
            if "request.protocol" in fields:
                self.protocol = fields["request.protocol"].string_value or self.protocol
        headers = []
        for key, value in _headers_of(req.request_headers):
            if key[0] == ":":
                if key == ":method":
                    self.method = value
                elif key == ":path":
                    self.path = value
                elif key == ":authority":
                    self.authority = value
            else:
                headers.append((key, value))
                if key == "x-request-id":
                    self.request_id = value
                elif key == TRACE_HEADER and self.trace_header is None:
                    self.trace_header = value
                elif key == "traceparent" and self.traceparent is None:
                    self.traceparent = value
        self.headers = headers
        if not self.request_id:
            self.request_id = str(uuid.uuid4())
        if not route_name:
            resign = next((v for k, v in headers if k == RESIGN_HEADER), None)
            if resign is not None:
                # The upstream ext_proc of a retrying cluster: one attempt, to be signed (again).
                return self._resign(resign, headers)
            # The filter is enabled per route, so this means an Envoy configured by something else: refuse.
            return self._immediate(json_error(404, "Not Found", self.request_id))
        self.target = self.server.routes.get(route_name)
        if self.target is None:
            log.error(
                "request %s: route %r has no Lambda target (config changing?); refusing it",
                self.request_id,
                route_name,
            )
            return self._immediate(
                json_error(502, "No Lambda function is configured for this route", self.request_id)
            )
        t = self.target.target
        if t.jwt or t.api_keys is not None or t.authorizer is not None:
            return self._admit(req)
        return self._headers_done(req)

    def _headers_done(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if req.request_headers.end_of_stream:
            return self._invoke(b"", phase="headers")
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=CONTINUE))

    def _admit(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse | Awaitable[pb.ProcessingResponse]:
        """The caller's identity: JWT claims Envoy verified, an API key, a Lambda authorizer's decision."""
        assert self.target is not None
        t = self.target.target
        identity = Identity()
        if t.jwt:
            found = claims_of(req.metadata_context.filter_metadata.get(JWT_NAMESPACE))
            if found is None:
                # jwt_authn let the request through without claims: never pass it on unauthenticated.
                return self._immediate(
                    json_error(401, "Unauthorized", self.request_id, log_reason="no JWT claims")
                )
            identity.claims, identity.scopes = found
        if t.api_keys is not None:
            presented = next((v for k, v in self.headers if k == API_KEY_HEADER), None)
            key = self.server.gate.api_key(t.api_keys, presented, self.request_id)
            if isinstance(key, HttpResponse):
                return self._immediate(key)
            identity.api_key, identity.api_key_id = key
        self.identity = identity
        a = t.authorizer
        if a is None:
            return self._headers_done(req)
        values = self.server.gate.identity(a, self.headers, self.path)
        if values is None:
            return self._immediate(
                json_error(401, "Unauthorized", self.request_id, log_reason="identity source missing")
            )
        raw_path = self.path.partition("?")[0].split("#", 1)[0]
        method_arn = f"{t.method_arn_prefix}/{self.method}/{raw_path.lstrip('/')}"
        decision = self.server.gate.cached(a, values)
        if decision is not None:
            return self._decided(req, decision, method_arn)
        return self._ask(req, a, values, method_arn)

    async def _ask(
        self, req: pb.ProcessingRequest, a: AuthorizerTarget, values: tuple[str, ...], method_arn: str
    ) -> pb.ProcessingResponse:
        assert self.target is not None
        creds = self._credentials(self.target.target, authorizer=True)
        if isinstance(creds, pb.ProcessingResponse):
            return creds
        http = HttpRequest(
            self.method,
            self.path,
            self.headers,
            b"",
            self.source_ip,
            self.protocol,
            self.request_id,
            self.authority,
        )
        event = authorizer_event(build_v1_event(http, self.target.route), method_arn)
        decision = await self.server.gate.ask(a, values, creds, event, self.request_id)
        if isinstance(decision, HttpResponse):
            return self._immediate(decision)
        return self._decided(req, decision, method_arn)

    def _decided(
        self, req: pb.ProcessingRequest, decision: Decision, method_arn: str
    ) -> pb.ProcessingResponse:
        admitted = self.server.gate.admit(decision, method_arn, self.request_id)
        if isinstance(admitted, HttpResponse):
            return self._immediate(admitted)
        assert self.identity is not None
        self.identity.principal_id, self.identity.context = admitted.principal_id, admitted.context
        return self._headers_done(req)

    def on_request_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if self.target is None:
            return self._immediate(json_error(500, "Internal server error", self.request_id))
        return self._invoke(req.request_body.body, phase="body")

    def _pick(self, t: RouteTarget) -> Invocable | pb.ProcessingResponse:
        """The function this request invokes: the route's, a weighted choice, or the path parameter's."""
        if t.function_param is not None:
            assert self.target is not None
            raw_path = self.path.partition("?")[0].split("#", 1)[0]
            value = (path_parameters(self.target.route, raw_path) or {}).get(t.function_param, "")
            found = None
            if PARAM_NAME_RE.fullmatch(value) and t.param_functions is not None:
                found = t.param_functions.get(value)
            if found is None:
                # Only the Upstream's own names are looked up: a request cannot reach another function or account.
                shown = value if PARAM_NAME_RE.fullmatch(value) else "(invalid name)"
                return self._immediate(
                    json_error(
                        404,
                        "No such function",
                        self.request_id,
                        log_reason="function from path parameter not found",
                        log_detail=f"route {t.route_name}: {t.function_param}={shown!r} is not a function of "
                        f"Upstream {t.upstream}",
                    )
                )
            return found
        assert self.target is not None
        if t.choices:
            return random.choices(t.choices, cum_weights=self.target.cum_weights)[0]
        assert self.target.fixed is not None
        return self.target.fixed

    def _credentials(
        self, t: RouteTarget, authorizer: bool = False
    ) -> ReadOnlyCredentials | pb.ProcessingResponse:
        """The keys that sign the route's Invoke (or, with `authorizer`, its Lambda authorizer's): a role's, the
        Secret's, else the default chain's."""
        c = self.target
        assert c is not None
        role, keys = (c.auth_role, c.auth_credentials) if authorizer else (c.role, c.credentials)
        try:
            if role is not None:
                return role.current()
            return keys or self.server.default_chain.current()
        except CredentialsUnavailable as err:
            what = "its authorizer" if authorizer else "this function"
            log.error(
                "request %s: route %s: no AWS credentials for %s: %s",
                self.request_id,
                t.route_name,
                what,
                err,
            )
            return self._immediate(
                json_error(502, f"The gateway has no AWS credentials for {what}", self.request_id)
            )

    def _invoke(self, body: bytes, phase: str) -> pb.ProcessingResponse:
        assert self.target is not None
        t = self.target.target
        chosen = self._pick(t)
        if isinstance(chosen, pb.ProcessingResponse):
            return chosen
        self.chosen = chosen
        trace, traceparent = _trace_ids(self.trace_header, self.traceparent)
        if self.trace_header is None:
            # API Gateway adds the trace header to every event; functions and X-Ray SDKs read it there.
            self.headers.append((TRACE_HEADER, trace))
        http = HttpRequest(
            self.method,
            self.path,
            self.headers,
            body,
            self.source_ip,
            self.protocol,
            self.request_id,
            self.authority,
            self.identity,
        )
        if t.integration is not None:
            try:
                payload, self.mapping = build_payload(t.integration, http, self.target.route)
            except MappingFailed as err:
                return self._immediate(
                    json_error(
                        400,
                        err.public,
                        self.request_id,
                        log_reason="request mapping failed",
                        log_detail=str(err),
                    )
                )
        elif t.payload_format == "raw":
            try:
                payload = raw_payload(http, self.target.route)
            except NotJson as err:
                return self._immediate(
                    json_error(
                        400,
                        "The request body must be JSON",
                        self.request_id,
                        log_reason="raw payload refused",
                        log_detail=str(err),
                    )
                )
        else:
            build = build_v2_event if t.payload_format == "apigateway-v2" else build_v1_event
            payload = json.dumps(build(http, self.target.route), separators=(",", ":")).encode()
        limit = MAX_ASYNC_PAYLOAD if t.invocation_type == "Event" else MAX_SYNC_PAYLOAD
        if len(payload) > limit:
            # Refused here, before anything is invoked: Lambda would refuse it anyway, after the upload.
            return self._immediate(
                json_error(
                    413,
                    "Request payload too large",
                    self.request_id,
                    log_reason="request too large",
                    log_detail=f"event of {len(payload)} bytes, over Lambda's {limit} for {t.invocation_type}",
                )
            )
        creds = self._credentials(t)
        if isinstance(creds, pb.ProcessingResponse):
            return creds
        invoke_headers = _invoke_headers(t)
        payload_hash = hashlib.sha256(payload).hexdigest() if t.max_retries else None
        signed = sign_invoke(
            creds,
            t.region,
            self.target.scheme,
            t.authority,
            chosen.invoke_path,
            payload,
            invoke_headers,
            payload_hash,
        )
        extra = [_header(TRACE_HEADER, trace)]
        if traceparent is not None:
            extra.append(_header("traceparent", traceparent))
        if t.max_retries:
            extra.append(_header(RESIGN_HEADER, t.route_name))
        # What this mutation sets is not removed; every other client header is (a client's x-lambdagate-sign or
        # invalid traceparent included).
        kept = {"content-length", *signed, *(h.header.key for h in extra)}
        mutation = pb.HeaderMutation(
            set_headers=[
                _header(":method", "POST"),
                _header(":path", chosen.invoke_path),
                _header(":authority", t.authority),
                # Honoured in the body phase (BUFFERED with headers SENT); for a request that had no body,
                # Envoy drops it and sends the event chunked.
                _header("content-length", str(len(payload))),
                *(_header(k, v) for k, v in signed.items()),
                *extra,
            ],
            # Client headers and cookies travel inside the event, never to the Invoke API.
            remove_headers=sorted({k for k, _ in self.headers if k not in kept}),
        )
        common = pb.CommonResponse(header_mutation=mutation, body_mutation=pb.BodyMutation(body=payload))
        if phase == "headers":
            # A request without a body gets one: the event.
            common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    def _resign(self, route_name: str, headers: list[tuple[str, str]]) -> pb.ProcessingResponse:
        """Sign one attempt of a retried Invoke again, with fresh credentials and a fresh date.

        The body is not here (headers-only stream): it is signed through the X-Amz-Content-SHA256 header that
        the first signature already covered, so a changed body could not pass.
        """
        self.target = self.server.routes.get(route_name)
        values = dict(headers)
        payload_hash = values.get("x-amz-content-sha256", "")
        if self.target is None or not re.fullmatch(r"[0-9a-f]{64}", payload_hash):
            log.error(
                "re-signing: route %r is unknown or the attempt has no payload hash; refusing", route_name
            )
            return self._immediate(json_error(502, "Bad gateway", self.request_id))
        t = self.target.target
        if not _invokes(t, self.path):
            # Only an Invoke call of this route is ever signed here, whatever else reached this stream.
            log.error(
                "re-signing: %r is not an Invoke path of route %s; refusing", self.path[:200], route_name
            )
            return self._immediate(json_error(502, "Bad gateway", self.request_id))
        creds = self._credentials(t)
        if isinstance(creds, pb.ProcessingResponse):
            return creds
        signed = sign_invoke(
            creds,
            t.region,
            self.target.scheme,
            t.authority,
            self.path,
            b"",
            _invoke_headers(t),
            payload_hash,
        )
        log.debug("route %s: attempt signed at %s", t.route_name, signed.get("x-amz-date", "?"))
        self.finished = True  # the re-signing stream sees the request headers only
        mutation = pb.HeaderMutation(
            set_headers=[_header(k, v) for k, v in signed.items()],
            # The route header stays: a retry reuses these headers, and its own stream must find the route.
            remove_headers=[] if "x-amz-security-token" in signed else ["x-amz-security-token"],
        )
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))
        )

    # --- response path ------------------------------------------------------------------------------

    def on_response_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        status = 0
        headers: dict[str, str] = {}
        for key, value in _headers_of(req.response_headers):
            if key == ":status":
                status = int(value) if value.isdigit() else 0
            else:
                headers[key] = value
        self.resp_status = status
        self.resp_headers = headers
        if req.response_headers.end_of_stream:
            self.finished = True
            out = self._answer(b"")
            return pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(response=self._rewrite(out, True))
            )
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=CONTINUE))

    def on_response_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        # Buffered: the whole body in one message, the last of the stream.
        self.finished = True
        out = self._answer(req.response_body.body)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=self._rewrite(out, False)))

    def _answer(self, payload: bytes) -> HttpResponse:
        status, headers, rid = self.resp_status, self.resp_headers, self.request_id
        t = self.target.target if self.target else None
        fn = self.chosen.function_name if self.chosen else (t.function_name if t else "")
        where = f"route {t.route_name} function {fn}" if t else "no route"
        lambda_rid = headers.get("x-amzn-requestid", "")
        if t is not None and t.log_tail and "x-amz-log-result" in headers:
            _log_tail(rid, where, lambda_rid, headers["x-amz-log-result"])
        if status == 200 and lambda_rid:
            fn_error = headers.get("x-amz-function-error")
            integrated = None
            if t is not None and t.integration is not None:
                # None: a function error no integration response matches, answered as any function error.
                integrated = build_response(t.integration, payload, fn_error or None, self.mapping, rid)
            if integrated is not None:
                out = integrated
            elif fn_error:
                out = function_error(payload, fn_error, rid)
            elif t is not None and t.payload_format == "raw":
                out = raw_response(payload)
            else:
                try:
                    if t is not None and t.payload_format == "apigateway-v2":
                        out = unwrap_v2_response(payload)
                    else:
                        out = unwrap_proxy_response(payload)
                except MalformedResponse as err:
                    out = json_error(
                        502,
                        "Internal server error",
                        rid,
                        log_reason="malformed Lambda proxy response",
                        log_detail=str(err),
                    )
                    out.kind = "malformed_response"
        elif status in (202, 204) and lambda_rid:
            out = HttpResponse(status)
        elif lambda_rid or "x-amzn-errortype" in headers:
            out = invoke_api_error(
                status, headers.get("x-amzn-errortype", ""), payload, rid, headers.get("retry-after")
            )
        else:
            out = gateway_error(status, rid, payload[:200].decode("utf-8", "replace"))
        if out.kind is not None and t is not None and t.errors:
            # The route's error mapping (options.errors): only the status changes, the body stays the same.
            mapped = dict(t.errors).get(out.kind, ERROR_KINDS[out.kind])
            if mapped != out.status:
                out.status = mapped
                if mapped != 429:
                    out.headers = [(k, v) for k, v in out.headers if k != "retry-after"]
                elif not any(k == "retry-after" for k, _ in out.headers):
                    # Every 429 the gateway answers says when to come back.
                    out.headers.append(("retry-after", "1"))
        if out.log_reason:
            log.error(
                "request %s: %s: %s: %s (lambda request %s)",
                rid,
                where,
                out.log_reason,
                out.log_detail or "",
                lambda_rid or "-",
            )
        return out

    def _rewrite(self, out: HttpResponse, replace_body: bool) -> pb.CommonResponse:
        set_headers = [_header(":status", str(out.status)), _header("x-amzn-requestid", self.request_id)]
        seen = {"x-amzn-requestid"}
        if out.status not in (204, 304):
            # RFC 9110 forbids content-length on 204; on 304 it would describe a body that is not sent.
            set_headers.append(_header("content-length", str(len(out.body))))
            seen.add("content-length")
        for key, value in out.headers:
            # The first value of a name replaces; further values of it (Set-Cookie...) are appended.
            set_headers.append(_header(key, value, append=key in seen))
            seen.add(key)
        # Everything else Lambda's answer carried is Lambda's business, not the client's.
        remove = sorted(k for k in self.resp_headers if k not in KEPT_RESPONSE_HEADERS and k not in seen)
        common = pb.CommonResponse(
            header_mutation=pb.HeaderMutation(set_headers=set_headers, remove_headers=remove),
            body_mutation=pb.BodyMutation(body=out.body),
        )
        if replace_body:
            common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
        return common

    def _immediate(self, out: HttpResponse) -> pb.ProcessingResponse:
        if out.log_reason:
            log.error("request %s: %s: %s", self.request_id, out.log_reason, out.log_detail or "")
        return pb.ProcessingResponse(
            immediate_response=pb.ImmediateResponse(
                status=http_status_pb2.HttpStatus(code=out.status),
                headers=pb.HeaderMutation(set_headers=[_header(k, v) for k, v in out.headers]),
                body=out.body,
                details="lambdagate",
            )
        )


def _invokes(t: RouteTarget, path: str) -> bool:
    """Whether `path` is the Invoke path of one of the route's functions."""
    if path == t.invoke_path or any(c.invoke_path == path for c in t.choices):
        return True
    return t.param_functions is not None and any(f.invoke_path == path for f in t.param_functions.values())


def _invoke_headers(t: RouteTarget) -> dict[str, str]:
    headers = INVOKE_HEADERS[t.invocation_type]
    if t.log_tail and t.invocation_type == "RequestResponse":
        headers = {**headers, "x-amz-log-type": "Tail"}
    return headers


def _trace_ids(given: str | None, traceparent: str | None) -> tuple[str, str | None]:
    """The X-Amzn-Trace-Id to use (the client's, else one made from its W3C traceparent, else a new one), and the
    traceparent to pass on (a valid one only)."""
    parent_m = TRACEPARENT_RE.fullmatch(traceparent.strip().lower()) if traceparent is not None else None
    valid_parent = traceparent.strip().lower() if parent_m is not None and traceparent is not None else None
    if given is not None and AMZN_TRACE_RE.fullmatch(given.strip()):
        return given.strip(), valid_parent
    if parent_m is not None:
        trace, parent, flags = parent_m.groups()
        # X-Ray's trace id is the W3C one split after its first 8 hex digits (the epoch seconds).
        sampled = int(flags, 16) & 1
        return f"Root=1-{trace[:8]}-{trace[8:]};Parent={parent};Sampled={sampled}", valid_parent
    return f"Root=1-{int(time.time()):08x}-{os.urandom(12).hex()}", None


def _log_tail(request_id: str, where: str, lambda_rid: str, encoded: str) -> None:
    """The function's last 4 KB of log (X-Amz-Log-Result), line by line into the gateway's log only."""
    try:
        text = base64.b64decode(encoded, validate=True).decode("utf-8", "replace")
    except (binascii.Error, ValueError):
        log.warning("request %s: %s: undecodable log tail (lambda request %s)", request_id, where, lambda_rid)
        return
    for line in text.splitlines():
        if line.strip():
            log.info(
                "request %s: %s: log (lambda request %s): %s", request_id, where, lambda_rid or "-", line
            )


class ExtProcServer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, routes: RouteTable, default_chain: DefaultChain) -> None:
        self.routes = routes
        self.default_chain = default_chain
        self.gate = Gate()
        self.streams = 0  # streams started, for recycling worker processes

    async def Process(  # noqa: N802 (gRPC's name)
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        proc = Processor(self)
        self.streams += 1
        async for req in request_iterator:
            which = req.WhichOneof("request")
            try:
                if which == "request_headers":
                    answer = proc.on_request_headers(req)
                    # A Lambda authorizer not in the cache is asked without holding up other streams.
                    response = answer if isinstance(answer, pb.ProcessingResponse) else await answer
                elif which == "request_body":
                    if len(req.request_body.body) > LARGE_BODY:
                        # base64, JSON and SHA-256 of megabytes would stall every other stream on this loop.
                        response = await asyncio.to_thread(proc.on_request_body, req)
                    else:
                        response = proc.on_request_body(req)
                elif which == "response_headers":
                    response = proc.on_response_headers(req)
                elif which == "response_body":
                    if len(req.response_body.body) > LARGE_BODY:
                        response = await asyncio.to_thread(proc.on_response_body, req)
                    else:
                        response = proc.on_response_body(req)
                elif which == "request_trailers":
                    response = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif which == "response_trailers":
                    response = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
                else:
                    continue
            except Exception:
                # Never let a bug pass a request on half-processed: answer 500 and end the stream.
                log.exception("request %s: processing %s failed", proc.request_id, which)
                yield proc._immediate(json_error(500, "Internal server error", proc.request_id))
                return
            yield response
            if proc.finished or response.HasField("immediate_response"):
                # Nothing more will be asked of this stream: end it now, cleanly. Left open, Envoy resets it when
                # the request ends, and grpc.aio leaks native memory for every RPC its client cancels (grpc
                # issue 43360; measured here at ~130 bytes a request, a steady RSS climb under load).
                return
