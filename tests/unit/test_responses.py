"""Lambda's answer to the client's HTTP response: proxy responses, function errors, Invoke API errors."""

from __future__ import annotations

import base64
import json

import pytest

from controlplane.aws.responses import (
    MalformedResponse,
    function_error,
    gateway_error,
    invoke_api_error,
    unwrap_proxy_response,
)


def unwrap(doc) -> object:
    return unwrap_proxy_response(json.dumps(doc).encode())


def values(resp, name):
    return [v for k, v in resp.headers if k == name]


# ---------------------------------------------------------------------------------------------------------------
# Proxy responses


def test_minimal_response():
    resp = unwrap({"statusCode": 204})
    assert resp.status == 204
    assert resp.headers == []
    assert resp.body == b""


def test_headers_are_lowercased_and_body_is_utf8():
    resp = unwrap(
        {"statusCode": 200, "headers": {"Content-Type": "text/plain; charset=utf-8"}, "body": "héllo"}
    )
    assert resp.headers == [("content-type", "text/plain; charset=utf-8")]
    assert resp.body == "héllo".encode()


def test_headers_and_multi_value_headers_merge():
    resp = unwrap(
        {
            "statusCode": 200,
            "headers": {"X-Single": "s", "X-Both": "same", "X-Extra": "e1"},
            "multiValueHeaders": {
                "X-Both": ["same", "other"],
                "X-Extra": ["e2"],
                "Vary": ["Accept", "Origin"],
            },
            "body": "",
        }
    )
    assert values(resp, "x-single") == ["s"]
    # A value in both maps appears once; distinct values are all kept.
    assert values(resp, "x-both") == ["same", "other"]
    assert sorted(values(resp, "x-extra")) == ["e1", "e2"]
    assert values(resp, "vary") == ["Accept", "Origin"]


def test_multiple_set_cookie_stay_separate():
    resp = unwrap(
        {
            "statusCode": 302,
            "headers": {"Location": "/home", "Set-Cookie": "a=1; Path=/"},
            "multiValueHeaders": {
                "Set-Cookie": ["b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT", "c=3; HttpOnly"]
            },
        }
    )
    cookies = values(resp, "set-cookie")
    assert sorted(cookies) == ["a=1; Path=/", "b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT", "c=3; HttpOnly"]
    assert values(resp, "location") == ["/home"]


def test_base64_body():
    raw = bytes(range(256))
    resp = unwrap(
        {
            "statusCode": 200,
            "headers": {"content-type": "image/png"},
            "body": base64.b64encode(raw).decode(),
            "isBase64Encoded": True,
        }
    )
    assert resp.body == raw


def test_string_status_code():
    assert unwrap({"statusCode": "404", "body": "nope"}).status == 404


def test_dict_body_is_json_krakend_style():
    resp = unwrap({"statusCode": 200, "body": {"pets": [1, 2]}})
    assert json.loads(resp.body) == {"pets": [1, 2]}
    assert values(resp, "content-type") == ["application/json"]
    # A content type set by the function wins.
    resp = unwrap({"statusCode": 200, "headers": {"Content-Type": "application/hal+json"}, "body": {"a": 1}})
    assert values(resp, "content-type") == ["application/hal+json"]


def test_scalar_header_values_are_stringified():
    resp = unwrap(
        {"statusCode": 200, "headers": {"X-Count": 3, "X-Flag": True}, "multiValueHeaders": {"X-N": [1, 2]}}
    )
    assert values(resp, "x-count") == ["3"]
    assert values(resp, "x-flag") == ["true"]
    assert values(resp, "x-n") == ["1", "2"]


def test_hop_by_hop_headers_are_dropped():
    resp = unwrap(
        {
            "statusCode": 200,
            "headers": {
                "Connection": "close",
                "Content-Length": "999",
                "Transfer-Encoding": "chunked",
                "X-Ok": "1",
            },
            "multiValueHeaders": {"Keep-Alive": ["timeout=5"]},
            "body": "hi",
        }
    )
    assert [k for k, _ in resp.headers] == ["x-ok"]


def test_null_maps_and_null_body_are_fine():
    resp = unwrap({"statusCode": 200, "headers": None, "multiValueHeaders": None, "body": None})
    assert (resp.status, resp.headers, resp.body) == (200, [], b"")


@pytest.mark.parametrize(
    "payload, words",
    [
        (b"not json at all", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b'"a string"', "not an object"),
        (b"[1, 2]", "not an object"),
        (b"null", "not an object"),
        (json.dumps({"body": "x"}).encode(), "no statusCode"),
        (json.dumps({"statusCode": "OK"}).encode(), "not a final HTTP status"),
        (json.dumps({"statusCode": 99}).encode(), "not a final HTTP status"),
        (json.dumps({"statusCode": 600}).encode(), "not a final HTTP status"),
        (json.dumps({"statusCode": 200.5}).encode(), "not a final HTTP status"),
        (json.dumps({"statusCode": True}).encode(), "not a final HTTP status"),
        (json.dumps({"statusCode": None}).encode(), "not a final HTTP status"),
        (
            json.dumps({"statusCode": 200, "body": "@@@", "isBase64Encoded": True}).encode(),
            "not valid base64",
        ),
        (
            json.dumps({"statusCode": 200, "body": "aGk", "isBase64Encoded": True}).encode(),
            "not valid base64",
        ),
        (json.dumps({"statusCode": 200, "body": "x", "isBase64Encoded": "true"}).encode(), "isBase64Encoded"),
        (
            json.dumps({"statusCode": 200, "headers": {"X-A": "a\r\nSet-Cookie: evil=1"}}).encode(),
            "control character",
        ),
        (json.dumps({"statusCode": 200, "headers": {"X-A": "a\nb"}}).encode(), "control character"),
        (
            json.dumps({"statusCode": 200, "multiValueHeaders": {"X-A": ["ok", "b\rc"]}}).encode(),
            "control character",
        ),
        (
            json.dumps({"statusCode": 200, "headers": {"Bad Name": "v"}}).encode(),
            "not an HTTP token",
        ),
        (
            json.dumps({"statusCode": 200, "headers": {"X-A\r\nX-B": "v"}}).encode(),
            "not an HTTP token",
        ),
        (json.dumps({"statusCode": 101}).encode(), "not a final HTTP status"),
        (json.dumps({"statusCode": 200, "headers": {"x-badé": "v"}}).encode(), "not an HTTP token"),
        (json.dumps({"statusCode": 200, "headers": {"X-A": "a\x01b"}}).encode(), "control character"),
        (json.dumps({"statusCode": 200, "headers": {"X-A": "caf\u00e9"}}).encode(), "non-ASCII"),
        (json.dumps({"statusCode": 200, "headers": {"X-A": "v" * 20000}}).encode(), "the limit is"),
        (
            json.dumps({"statusCode": 200, "multiValueHeaders": {"X-A": ["v" * 10000] * 6}}).encode(),
            "headers add up",
        ),
        (json.dumps({"statusCode": 200, "headers": {"X-A": ["list"]}}).encode(), "must be a string"),
        (json.dumps({"statusCode": 200, "headers": {"X-A": {"a": 1}}}).encode(), "must be a string"),
        (json.dumps({"statusCode": 200, "headers": ["X-A"]}).encode(), "headers must be an object"),
        (json.dumps({"statusCode": 200, "multiValueHeaders": {"X-A": "v"}}).encode(), "must be a list"),
        (
            json.dumps({"statusCode": 200, "multiValueHeaders": ["v"]}).encode(),
            "multiValueHeaders must be an object",
        ),
        (json.dumps({"statusCode": 200, "body": 42}).encode(), "body must be a string"),
        (json.dumps({"statusCode": 200, "body": True}).encode(), "body must be a string"),
        (
            json.dumps({"statusCode": 200, "body": {"a": 1}, "isBase64Encoded": True}).encode(),
            "body must be a string",
        ),
    ],
)
def test_malformed_responses(payload, words):
    with pytest.raises(MalformedResponse) as info:
        unwrap_proxy_response(payload)
    assert words in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Function errors

STACK = ['  File "/var/task/app.py", line 3, in handler', "    raise ValueError('db password hunter2')"]


def test_function_error_is_502_without_stack_trace():
    payload = json.dumps(
        {
            "errorMessage": "db password hunter2",
            "errorType": "ValueError",
            "stackTrace": STACK,
            "requestId": "x",
        }
    ).encode()
    resp = function_error(payload, "Unhandled", "req-9")
    assert resp.status == 502
    body = json.loads(resp.body)
    assert body == {"message": "Internal server error", "requestId": "req-9"}
    assert b"hunter2" not in resp.body and b"app.py" not in resp.body and b"ValueError" not in resp.body
    assert ("content-type", "application/json") in resp.headers
    # The log gets the details.
    assert "ValueError" in resp.log_detail and "hunter2" in resp.log_detail
    assert "Unhandled" in resp.log_reason


def test_function_error_with_non_json_payload():
    resp = function_error(b"\xffsegfault" + b"x" * 2000, "Unhandled", "r")
    assert resp.status == 502
    assert json.loads(resp.body)["message"] == "Internal server error"
    assert len(resp.log_detail) < 600


@pytest.mark.parametrize(
    "doc",
    [
        {
            "errorMessage": "2024-01-01T00:00:00Z abc Task timed out after 3.00 seconds",
            "errorType": "Runtime.ExitError",
        },
        {
            "errorType": "Sandbox.Timedout",
            "errorMessage": "RequestId: abc Error: Task timed out after 3.00 seconds",
        },
    ],
)
def test_function_timeout_is_504(doc):
    resp = function_error(json.dumps(doc).encode(), "Unhandled", "r")
    assert resp.status == 504
    assert json.loads(resp.body) == {"message": "Endpoint request timed out", "requestId": "r"}


# ---------------------------------------------------------------------------------------------------------------
# Invoke API errors


def api_error(status, etype, message="msg", retry_after=None):
    return invoke_api_error(
        status, etype, json.dumps({"message": message, "Type": "User"}).encode(), "rid", retry_after
    )


def test_invalid_signature_is_502_naming_the_signature():
    resp = api_error(
        403,
        "InvalidSignatureException:http://internal.amazon.com/coral/com.amazon.coral.service/",
        "The request signature we calculated does not match the signature you provided. Canonical String: POST\n/...",
    )
    assert resp.status == 502
    body = json.loads(resp.body)
    assert "signature" in body["message"] and "InvalidSignatureException" in body["message"]
    assert "Canonical" not in body["message"]
    assert body["requestId"] == "rid"
    assert "credentials" in resp.log_reason


@pytest.mark.parametrize(
    "etype", ["UnrecognizedClientException", "ExpiredTokenException", "IncompleteSignatureException"]
)
def test_other_auth_errors_name_the_signature(etype):
    resp = api_error(403, etype)
    assert resp.status == 502
    assert "signature" in json.loads(resp.body)["message"]


def test_access_denied_is_502():
    resp = api_error(403, "AccessDeniedException", "User arn:aws:iam::1:user/x is not authorized")
    assert resp.status == 502
    assert "denied" in json.loads(resp.body)["message"]
    assert "arn:aws" not in resp.body.decode()


def test_function_not_found_is_502():
    resp = api_error(
        404,
        "ResourceNotFoundException",
        "Function not found: arn:aws:lambda:us-east-1:123456789012:function:x",
    )
    assert resp.status == 502
    assert json.loads(resp.body)["message"] == "Lambda function not found"
    assert "123456789012" not in resp.body.decode()
    # 404 without a type still means not found.
    assert (
        json.loads(invoke_api_error(404, "", b"", "r", None).body)["message"] == "Lambda function not found"
    )


def test_throttling_stays_429_with_retry_after():
    resp = api_error(429, "TooManyRequestsException", "Rate exceeded", retry_after="2")
    assert resp.status == 429
    assert ("retry-after", "2") in resp.headers
    assert json.loads(resp.body)["message"] == "Too Many Requests"
    # Without Lambda's hint a throttled client is still told when to come back: after a second.
    resp = api_error(429, "TooManyRequestsException")
    assert resp.status == 429 and values(resp, "retry-after") == ["1"] and resp.kind == "throttled"
    # Lambda's body hint (retryAfterSeconds) is used when there is no header; rounded up, at least 1.
    hinted = invoke_api_error(429, "TooManyRequestsException", b'{"retryAfterSeconds": 2.5}', "r", None)
    assert values(hinted, "retry-after") == ["3"]
    assert values(invoke_api_error(429, "", b"{}", "r", "garbage"), "retry-after") == ["1"]
    assert api_error(502, "EC2ThrottledException").status == 429
    # A bare 429 (no error type, e.g. from a proxy in front of Lambda) is throttling too.
    resp = invoke_api_error(429, "", b"Too Many Requests", "r", "7")
    assert resp.status == 429 and ("retry-after", "7") in resp.headers


def test_too_large_is_413():
    resp = api_error(413, "RequestTooLargeException", "Request must be smaller than 6291456 bytes")
    assert resp.status == 413


@pytest.mark.parametrize(
    "status, etype", [(500, "ServiceException"), (502, ""), (503, "ResourceConflictException"), (500, "")]
)
def test_lambda_5xx_is_502(status, etype):
    resp = invoke_api_error(status, etype, b"<html>internal</html>", "r", None)
    assert resp.status == 502
    assert json.loads(resp.body) == {"message": "Bad gateway", "requestId": "r"}


def test_lambda_api_504_is_504():
    assert api_error(504, "").status == 504


def test_gateway_errors():
    assert gateway_error(504, "r", "upstream timeout").status == 504
    assert gateway_error(503, "r", "connect failed").status == 503
    assert gateway_error(413, "r", "").status == 413
    assert gateway_error(500, "r", "").status == 502
    for resp in (gateway_error(504, "r", "d"), gateway_error(503, "r", "d")):
        assert json.loads(resp.body)["requestId"] == "r"


@pytest.mark.parametrize("status", [200, 204, 302, 307])
def test_a_non_lambda_answer_below_400_is_never_passed_off_as_success(status):
    out = gateway_error(status, "rid", "no x-amzn-requestid")
    assert out.status == 502 and json.loads(out.body)["message"] == "Bad gateway"
