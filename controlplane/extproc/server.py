"""The ext_proc server: each Envoy stream is one request, turned into a SigV4-signed Lambda Invoke and back.

Request headers (and body) become the API Gateway 1.0 event, signed and sent by Envoy to Lambda; Lambda's
answer becomes the HTTP response. Anything that cannot be done correctly ends the request: it fails closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import grpc
from botocore.credentials import ReadOnlyCredentials
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import wrappers_pb2

from controlplane.aws.events import HttpRequest, RouteInfo, build_v1_event, build_v2_event
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
from controlplane.model.routes import RouteTarget

log = logging.getLogger("lambdagate.extproc")

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


class RouteTable:
    """The routes ext_proc serves, one generation per route-configuration version.

    A generation stays resolvable while some Envoy still holds (or is being sent) that version: after a NACK,
    or with a slow Envoy, requests keep arriving with route names of an older configuration.
    """

    def __init__(self, roles: RoleCache | None = None) -> None:
        self.roles = roles or RoleCache()
        self._generations: dict[str, dict[str, CompiledTarget]] = {}
        self._current = ""
        self._in_use: set[str] = set()
        self._merged: dict[str, CompiledTarget] = {}

    def update(self, targets: Mapping[str, RouteTarget], version: str) -> None:
        compiled: dict[str, CompiledTarget] = {}
        for name, t in targets.items():
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
            compiled[name] = CompiledTarget(t, route, t.scheme, creds, role)
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
        self.roles.retain({t.role for t in merged.values() if t.role is not None})

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

    # --- request path -------------------------------------------------------------------------------

    def on_request_headers(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
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
        self.headers = headers
        if not self.request_id:
            self.request_id = str(uuid.uuid4())
        if not route_name:
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
        if req.request_headers.end_of_stream:
            return self._invoke(b"", phase="headers")
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=CONTINUE))

    def on_request_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        if self.target is None:
            return self._immediate(json_error(500, "Internal server error", self.request_id))
        return self._invoke(req.request_body.body, phase="body")

    def _invoke(self, body: bytes, phase: str) -> pb.ProcessingResponse:
        assert self.target is not None
        t = self.target.target
        http = HttpRequest(
            self.method,
            self.path,
            self.headers,
            body,
            self.source_ip,
            self.protocol,
            self.request_id,
            self.authority,
        )
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
        try:
            if self.target.role is not None:
                creds = self.target.role.current()
            else:
                creds = self.target.credentials or self.server.default_chain.current()
        except CredentialsUnavailable as err:
            log.error("request %s: route %s: no AWS credentials: %s", self.request_id, t.route_name, err)
            return self._immediate(
                json_error(502, "The gateway has no AWS credentials for this function", self.request_id)
            )
        signed = sign_invoke(
            creds,
            t.region,
            self.target.scheme,
            t.authority,
            t.invoke_path,
            payload,
            INVOKE_HEADERS[t.invocation_type],
        )
        mutation = pb.HeaderMutation(
            set_headers=[
                _header(":method", "POST"),
                _header(":path", t.invoke_path),
                _header(":authority", t.authority),
                # Honoured in the body phase (BUFFERED with headers SENT); for a request that had no body,
                # Envoy drops it and sends the event chunked.
                _header("content-length", str(len(payload))),
                *(_header(k, v) for k, v in signed.items()),
            ],
            # Client headers and cookies travel inside the event, never to the Invoke API.
            remove_headers=sorted({k for k, _ in self.headers if k not in signed and k != "content-length"}),
        )
        common = pb.CommonResponse(header_mutation=mutation, body_mutation=pb.BodyMutation(body=payload))
        if phase == "headers":
            # A request without a body gets one: the event.
            common.status = pb.CommonResponse.CONTINUE_AND_REPLACE
            return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

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
            out = self._answer(b"")
            return pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(response=self._rewrite(out, True))
            )
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=CONTINUE))

    def on_response_body(self, req: pb.ProcessingRequest) -> pb.ProcessingResponse:
        out = self._answer(req.response_body.body)
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=self._rewrite(out, False)))

    def _answer(self, payload: bytes) -> HttpResponse:
        status, headers, rid = self.resp_status, self.resp_headers, self.request_id
        t = self.target.target if self.target else None
        where = f"route {t.route_name} function {t.function_name}" if t else "no route"
        lambda_rid = headers.get("x-amzn-requestid", "")
        if status == 200 and lambda_rid:
            fn_error = headers.get("x-amz-function-error")
            if fn_error:
                out = function_error(payload, fn_error, rid)
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
        elif status in (202, 204) and lambda_rid:
            out = HttpResponse(status)
        elif lambda_rid or "x-amzn-errortype" in headers:
            out = invoke_api_error(
                status, headers.get("x-amzn-errortype", ""), payload, rid, headers.get("retry-after")
            )
        else:
            out = gateway_error(status, rid, payload[:200].decode("utf-8", "replace"))
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


class ExtProcServer(pb_grpc.ExternalProcessorServicer):
    def __init__(self, routes: RouteTable, default_chain: DefaultChain) -> None:
        self.routes = routes
        self.default_chain = default_chain

    async def Process(  # noqa: N802 (gRPC's name)
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        proc = Processor(self)
        async for req in request_iterator:
            which = req.WhichOneof("request")
            try:
                if which == "request_headers":
                    yield proc.on_request_headers(req)
                elif which == "request_body":
                    if len(req.request_body.body) > LARGE_BODY:
                        # base64, JSON and SHA-256 of megabytes would stall every other stream on this loop.
                        yield await asyncio.to_thread(proc.on_request_body, req)
                    else:
                        yield proc.on_request_body(req)
                elif which == "response_headers":
                    yield proc.on_response_headers(req)
                elif which == "response_body":
                    if len(req.response_body.body) > LARGE_BODY:
                        yield await asyncio.to_thread(proc.on_response_body, req)
                    else:
                        yield proc.on_response_body(req)
                elif which == "request_trailers":
                    yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
                elif which == "response_trailers":
                    yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
            except Exception:
                # Never let a bug pass a request on half-processed: answer 500 and end the stream.
                log.exception("request %s: processing %s failed", proc.request_id, which)
                yield proc._immediate(json_error(500, "Internal server error", proc.request_id))
                return
