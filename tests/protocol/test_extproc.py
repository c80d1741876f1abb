"""Our ext_proc server driven over real gRPC by generated stubs playing Envoy, message by message."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2
from harness import control_plane

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CONFIG = f"""
apiVersion: v1
kind: Secret
metadata: {{name: aws}}
stringData: {{access_key: AKIDEXAMPLE, secret_key: "{SECRET}", session_token: tok123}}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {{name: up}}
spec:
  region: eu-west-1
  secret_ref: aws
  functions:
  - {{name: pet, spec: {{function_name: "123456789012:function:get-pet", qualifier: live}}}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {{name: vs}}
spec:
  stage: prod
  routes: [{{matcher: {{path: "/pets/{{petId}}", methods: [GET, POST]}}, destination: {{upstream: up, function: pet}}}}]
"""


def headers(pairs: list[tuple[str, str]], eos: bool) -> pb.HttpHeaders:
    return pb.HttpHeaders(
        headers=base_pb2.HeaderMap(
            headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
        ),
        end_of_stream=eos,
    )


def attrs(route_name: str) -> dict[str, struct_pb2.Struct]:
    s = struct_pb2.Struct()
    s.update(
        {"xds.route_name": route_name, "source.address": "203.0.113.7:5555", "request.protocol": "HTTP/2"}
    )
    return {"envoy.filters.http.ext_proc": s}


def mutated(mutation: pb.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def sigv4(
    secret: str,
    date: str,
    region: str,
    method: str,
    path: str,
    query: str,
    hdrs: dict[str, str],
    signed: list[str],
    body: bytes,
) -> str:
    """SigV4 recomputed by hand, independently of botocore."""
    canonical_headers = "".join(f"{h}:{hdrs[h].strip()}\n" for h in signed)
    # Non-S3 services sign the path URI-encoded once more.
    from urllib.parse import quote

    canonical = "\n".join(
        [
            method,
            quote(path, safe="/~"),
            query,
            canonical_headers,
            ";".join(signed),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{date[:8]}/{region}/lambda/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (date[:8], region, "lambda", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def server(tmp_path: Path, loop_thread):
    (tmp_path / "c.yaml").write_text(CONFIG)
    with control_plane(loop_thread, tmp_path, listen_port=8080) as cp:
        channel = grpc.insecure_channel(f"127.0.0.1:{cp.port}")
        try:
            yield cp, pb_grpc.ExternalProcessorStub(channel)
        finally:
            channel.close()


def test_get_becomes_signed_invoke_and_response_is_unwrapped(server) -> None:
    cp, stub = server
    (route_name,) = cp.translation.route_table
    reqs = [
        pb.ProcessingRequest(
            request_headers=headers(
                [
                    (":method", "GET"),
                    (":path", "/pets/42?x=1&x=2"),
                    (":authority", "api.example"),
                    (":scheme", "https"),
                    ("cookie", "a=1"),
                    ("x-request-id", "rid-1"),
                    ("user-agent", "ua/1"),
                ],
                eos=True,
            ),
            attributes=attrs(route_name),
        ),
        pb.ProcessingRequest(
            response_headers=headers(
                [(":status", "200"), ("x-amzn-requestid", "lam-1"), ("content-type", "application/json")],
                eos=False,
            )
        ),
        pb.ProcessingRequest(
            response_body=pb.HttpBody(
                body=json.dumps(
                    {
                        "statusCode": 201,
                        "multiValueHeaders": {"Set-Cookie": ["a=1", "b=2"]},
                        "body": base64.b64encode(b"\x00bin").decode(),
                        "isBase64Encoded": True,
                    }
                ).encode(),
                end_of_stream=True,
            )
        ),
    ]
    out = list(stub.Process(iter(reqs), timeout=5))
    assert len(out) == 3
    common = out[0].request_headers.response
    assert common.status == pb.CommonResponse.CONTINUE_AND_REPLACE
    h = mutated(common.header_mutation)
    assert h[":method"] == "POST"
    assert h[":path"] == "/2015-03-31/functions/123456789012%3Afunction%3Aget-pet/invocations?Qualifier=live"
    assert h[":authority"] == "lambda.eu-west-1.amazonaws.com"
    assert h["x-amz-security-token"] == "tok123"
    # Client headers never reach the Invoke API.
    assert {"cookie", "user-agent", "x-request-id"} <= set(common.header_mutation.remove_headers)
    body = common.body_mutation.body
    event = json.loads(body)
    assert event["pathParameters"] == {"petId": "42"}
    assert event["multiValueQueryStringParameters"] == {"x": ["1", "2"]}
    assert event["requestContext"]["identity"]["sourceIp"] == "203.0.113.7"
    assert event["requestContext"]["stage"] == "prod" and event["requestContext"]["protocol"] == "HTTP/2"
    assert event["headers"]["cookie"] == "a=1" and event["requestContext"]["requestId"] == "rid-1"

    auth = h["authorization"]
    signed = auth.split("SignedHeaders=")[1].split(",")[0].split(";")
    assert "host" in signed and "x-amz-security-token" in signed
    all_headers = {**h, "host": h[":authority"]}
    path, _, query = h[":path"].partition("?")
    expected = sigv4(SECRET, h["x-amz-date"], "eu-west-1", "POST", path, query, all_headers, signed, body)
    assert auth.endswith("Signature=" + expected)
    assert "Credential=AKIDEXAMPLE/" in auth

    resp = out[2].response_body.response
    rh = [
        (o.header.key, o.header.raw_value.decode(), o.append.value) for o in resp.header_mutation.set_headers
    ]
    assert (":status", "201", False) in rh
    assert ("set-cookie", "a=1", False) in rh and ("set-cookie", "b=2", True) in rh
    assert ("content-length", "4", False) in rh
    assert resp.body_mutation.body == b"\x00bin"
    assert "x-amzn-requestid" in [k for k, *_ in rh]


def test_post_body_is_signed_in_the_body_phase(server) -> None:
    cp, stub = server
    (route_name,) = cp.translation.route_table
    reqs = [
        pb.ProcessingRequest(
            request_headers=headers(
                [
                    (":method", "POST"),
                    (":path", "/pets/7"),
                    (":authority", "h"),
                    ("content-type", "image/png"),
                ],
                eos=False,
            ),
            attributes=attrs(route_name),
        ),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b"\x89PNG\x00", end_of_stream=True)),
    ]
    out = list(stub.Process(iter(reqs), timeout=5))
    assert out[0].request_headers.response == pb.CommonResponse()
    common = out[1].request_body.response
    event = json.loads(common.body_mutation.body)
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == b"\x89PNG\x00"
    assert "authorization" in mutated(common.header_mutation)


def lambda_exchange(route_name: str, status: str, lambda_headers: list[tuple[str, str]], body: bytes):
    """A GET, then Lambda's answer: the three messages Envoy sends for a request without a body."""
    return [
        pb.ProcessingRequest(
            request_headers=headers([(":method", "GET"), (":path", "/pets/1")], eos=True),
            attributes=attrs(route_name),
        ),
        pb.ProcessingRequest(response_headers=headers([(":status", status), *lambda_headers], eos=False)),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]


def test_function_error_becomes_502_without_details(server) -> None:
    cp, stub = server
    (route_name,) = cp.translation.route_table
    error = {
        "errorMessage": "db password is hunter2",
        "errorType": "KeyError",
        "stackTrace": ["File x line 1"],
    }
    reqs = lambda_exchange(
        route_name,
        "200",
        [("x-amzn-requestid", "l"), ("x-amz-function-error", "Unhandled")],
        json.dumps(error).encode(),
    )
    out = list(stub.Process(iter(reqs), timeout=5))
    resp = out[2].response_body.response
    assert mutated(resp.header_mutation)[":status"] == "502"
    assert b"hunter2" not in resp.body_mutation.body and b"stackTrace" not in resp.body_mutation.body


def test_unknown_route_fails_closed(server) -> None:
    _, stub = server
    reqs = [
        pb.ProcessingRequest(
            request_headers=headers([(":method", "GET"), (":path", "/x")], eos=True),
            attributes=attrs("default/vs/0/deadbeef00"),
        )
    ]
    out = list(stub.Process(iter(reqs), timeout=5))
    assert out[0].WhichOneof("response") == "immediate_response"
    assert out[0].immediate_response.status.code == 502


def test_throttling_stays_429(server) -> None:
    cp, stub = server
    (route_name,) = cp.translation.route_table
    reqs = lambda_exchange(
        route_name,
        "429",
        [("x-amzn-requestid", "l"), ("x-amzn-errortype", "TooManyRequestsException"), ("retry-after", "3")],
        b'{"message":"Rate exceeded"}',
    )
    out = list(stub.Process(iter(reqs), timeout=5))
    h = mutated(out[2].response_body.response.header_mutation)
    assert h[":status"] == "429" and h["retry-after"] == "3"


def test_204_has_no_content_length(server) -> None:
    cp, stub = server
    (route_name,) = cp.translation.route_table
    reqs = lambda_exchange(
        route_name,
        "200",
        [("x-amzn-requestid", "l"), ("content-length", "40")],
        json.dumps({"statusCode": 204, "body": ""}).encode(),
    )
    out = list(stub.Process(iter(reqs), timeout=5))
    resp = out[2].response_body.response
    assert mutated(resp.header_mutation)[":status"] == "204"
    assert "content-length" not in mutated(resp.header_mutation)
    assert "content-length" in resp.header_mutation.remove_headers
