"""Black-box tests of the local Lambda Invoke server, driven by real boto3 clients and raw HTTP.

Servers run on an event loop in a background thread so the blocking clients can be used directly.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.client
import json
import os
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.auth
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError
from harness import LoopThread, serve_local_lambda

from controlplane.locallambda import LocalLambda

AKID = "AKIDLOCALTEST"
SECRET = "local-test-secret"
REGION = "us-east-1"
INVOKE = "/2015-03-31/functions/{}/invocations"

PETS = """
import asyncio
import logging
import time
from pathlib import Path


def echo(event, context):
    try:
        asyncio.get_running_loop()
        on_loop = True
    except RuntimeError:
        on_loop = False
    return {
        "v": "latest",
        "event": event,
        "function_name": context.function_name,
        "version": context.function_version,
        "arn": context.invoked_function_arn,
        "memory": context.memory_limit_in_mb,
        "request_id": context.aws_request_id,
        "log_group": context.log_group_name,
        "remaining_ok": 0 < context.get_remaining_time_in_millis() <= 3000,
        "identity": context.identity,
        "on_loop": on_loop,
    }


def echo_v1(event, context):
    return {"v": "1", "version": context.function_version}


def echo_v2(event, context):
    return {"v": "2", "version": context.function_version}


def boom(event, context):
    raise ValueError("kaboom")


def slow(event, context):
    time.sleep(event.get("sleep", 1.0))
    return "late"


def chatty(event, context):
    print("hello from", context.aws_request_id)
    logging.getLogger("pets").warning("careful %s", event.get("tag"))
    time.sleep(event.get("sleep", 0))
    print("tag", event.get("tag"))


def unmarshalable(event, context):
    return {1, 2}


def uses_loop(event, context):
    # What Mangum does: run a coroutine on the thread's current loop, as Lambda's main thread allows.
    async def answer():
        return "from a coroutine"

    return asyncio.get_event_loop().run_until_complete(answer())


def touch(event, context):
    # Write then rename, so a poller never sees the file half-written.
    partial = Path(event["path"] + ".partial")
    partial.write_text(context.aws_request_id)
    partial.replace(event["path"])
"""

FUNCTIONS_YAML = """
functions:
- name: Echo
  handler: pets.echo
  versions: {"1": pets.echo_v1, 2: pets.echo_v2}
  aliases: {live: "1", beta: "$LATEST"}
- {name: Boom, handler: pets.boom}
- {name: Slow, handler: pets.slow, timeout: 0.3}
- {name: Chatty, handler: pets.chatty}
- {name: Marshal, handler: pets.unmarshalable}
- {name: Touch, handler: pets.touch}
- {name: UsesLoop, handler: pets.uses_loop}
- {name: Broken, handler: broken.handler}
- {name: Missing, handler: pets.nope}
"""


def _write(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text), encoding="utf-8")


def _serve(runner: LoopThread, folder: Path, **kwargs: Any) -> Iterator[LocalLambda]:
    yield from serve_local_lambda(runner, folder, {AKID: SECRET}, **kwargs)


@pytest.fixture(scope="module")
def yaml_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("yaml_functions")
    _write(folder / "pets.py", PETS)
    _write(folder / "broken.py", "raise RuntimeError('cannot import me')\n")
    _write(folder / "functions.yaml", FUNCTIONS_YAML)
    return folder


@pytest.fixture(scope="module")
def server(loop_thread: LoopThread, yaml_dir: Path) -> Iterator[LocalLambda]:
    yield from _serve(loop_thread, yaml_dir, region=REGION)


@pytest.fixture(scope="module")
def implicit_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("implicit_functions")
    _write(folder / "_helpers.py", "GREETING = 'hi'\n")
    _write(
        folder / "hello.py",
        """
        from _helpers import GREETING

        def handler(event, context):
            return {"greeting": GREETING, "name": context.function_name}
        """,
    )
    _write(folder / "pets.py", "def handler(event, context):\n    return 'implicit pets'\n")
    _write(folder / "nohandler.py", "VALUE = 1\n")
    return folder


@pytest.fixture(scope="module")
def implicit_server(loop_thread: LoopThread, implicit_dir: Path) -> Iterator[LocalLambda]:
    yield from _serve(loop_thread, implicit_dir)


def _client(server: LocalLambda, **kwargs: Any) -> Any:
    options: dict[str, Any] = {
        "region_name": REGION,
        "aws_access_key_id": AKID,
        "aws_secret_access_key": SECRET,
    }
    options.update(kwargs)
    return boto3.client(
        "lambda",
        endpoint_url=server.url,
        config=Config(retries={"total_max_attempts": 1}, read_timeout=10, connect_timeout=5),
        **options,
    )


@pytest.fixture(scope="module")
def client(server: LocalLambda) -> Any:
    return _client(server)


def _payload(response: dict[str, Any]) -> Any:
    return json.loads(response["Payload"].read() or b"null")


def _error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return excinfo.value.response["Error"]["Code"]


def _signed_headers(
    server: LocalLambda,
    path: str,
    body: bytes,
    *,
    secret: str = SECRET,
    token: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """Sign a request the way boto3 would, for requests sent with http.client."""
    request = AWSRequest(method="POST", url=server.url + path, data=body, headers=extra or {})
    SigV4Auth(Credentials(AKID, secret, token), "lambda", REGION).add_auth(request)
    return dict(request.headers.items())


def _raw(
    server: LocalLambda, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.headers, response.read()
    finally:
        conn.close()


# --- synchronous invocations -----------------------------------------------------------------------


def test_sync_invoke_returns_result_event_and_context(client: Any) -> None:
    response = client.invoke(FunctionName="Echo", Payload=json.dumps({"pet": "cat"}).encode())
    body = _payload(response)
    assert response["StatusCode"] == 200
    assert response["ExecutedVersion"] == "$LATEST"
    assert "FunctionError" not in response
    headers = response["ResponseMetadata"]["HTTPHeaders"]
    assert headers["content-type"] == "application/json"
    assert body["event"] == {"pet": "cat"}
    assert body["function_name"] == "Echo"
    assert body["version"] == "$LATEST"
    assert body["arn"] == "arn:aws:lambda:us-east-1:000000000000:function:Echo"
    assert body["memory"] == 128
    assert body["request_id"] == response["ResponseMetadata"]["RequestId"]
    assert body["log_group"] == "/aws/lambda/Echo"
    assert body["remaining_ok"] is True
    assert body["identity"] is None
    assert body["on_loop"] is False


def test_handlers_can_use_the_threads_event_loop(client: Any) -> None:
    for _ in range(3):  # on every worker thread, not just the first invocation
        assert _payload(client.invoke(FunctionName="UsesLoop")) == "from a coroutine"


def test_empty_payload_is_empty_object(client: Any) -> None:
    assert _payload(client.invoke(FunctionName="Echo"))["event"] == {}


@pytest.mark.parametrize(
    ("function_name", "qualifier", "expected_v", "expected_version"),
    [
        ("Echo", "$LATEST", "latest", "$LATEST"),
        ("Echo:1", None, "1", "1"),
        ("Echo", "2", "2", "2"),
        ("Echo", "live", "1", "1"),
        ("Echo:beta", None, "latest", "$LATEST"),
        ("Echo:live", "live", "1", "1"),
        ("arn:aws:lambda:us-east-1:123456789012:function:Echo", None, "latest", "$LATEST"),
        ("arn:aws:lambda:us-east-1:123456789012:function:Echo:live", None, "1", "1"),
        ("123456789012:function:Echo", "2", "2", "2"),
        ("123456789012:function:Echo:1", None, "1", "1"),
    ],
)
def test_qualifiers_versions_aliases_and_arns(
    client: Any, function_name: str, qualifier: str | None, expected_v: str, expected_version: str
) -> None:
    kwargs = {"Qualifier": qualifier} if qualifier else {}
    response = client.invoke(FunctionName=function_name, Payload=b"{}", **kwargs)
    body = _payload(response)
    assert body["v"] == expected_v
    assert response["ExecutedVersion"] == expected_version


def test_invoked_function_arn_carries_the_qualifier(client: Any) -> None:
    body = _payload(client.invoke(FunctionName="Echo:beta"))
    assert body["arn"] == "arn:aws:lambda:us-east-1:000000000000:function:Echo:beta"


def test_conflicting_qualifiers_are_rejected(client: Any) -> None:
    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="Echo:1", Qualifier="2")
    assert _error_code(excinfo) == "InvalidParameterValueException"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


@pytest.mark.parametrize(
    ("function_name", "qualifier", "arn"),
    [
        ("Nope", None, "arn:aws:lambda:us-east-1:000000000000:function:Nope"),
        ("Echo", "7", "arn:aws:lambda:us-east-1:000000000000:function:Echo:7"),
        ("Echo", "prod", "arn:aws:lambda:us-east-1:000000000000:function:Echo:prod"),
        # A *.py file is not a function when functions.yaml exists.
        ("pets", None, "arn:aws:lambda:us-east-1:000000000000:function:pets"),
        ("arn:aws:lambda:eu-west-1:123456789012:function:Echo", None, None),
    ],
)
def test_unknown_function_or_qualifier(
    client: Any, function_name: str, qualifier: str | None, arn: str | None
) -> None:
    kwargs = {"Qualifier": qualifier} if qualifier else {}
    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName=function_name, **kwargs)
    assert _error_code(excinfo) == "ResourceNotFoundException"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    message = excinfo.value.response["Error"]["Message"]
    assert message.startswith("Function not found: ")
    if arn is not None:
        assert message == f"Function not found: {arn}"


# --- SigV4 -----------------------------------------------------------------------------------------


def test_wrong_secret_is_invalid_signature(server: LocalLambda) -> None:
    with pytest.raises(ClientError) as excinfo:
        _client(server, aws_secret_access_key="not-the-secret").invoke(FunctionName="Echo")
    assert _error_code(excinfo) == "InvalidSignatureException"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    message = excinfo.value.response["Error"]["Message"]
    assert message.startswith("The request signature we calculated does not match")
    assert SECRET not in message and "not-the-secret" not in message


def test_unknown_access_key(server: LocalLambda) -> None:
    with pytest.raises(ClientError) as excinfo:
        _client(server, aws_access_key_id="AKIDUNKNOWN").invoke(FunctionName="Echo")
    assert _error_code(excinfo) == "UnrecognizedClientException"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_credential_scoped_to_another_region(server: LocalLambda) -> None:
    with pytest.raises(ClientError) as excinfo:
        _client(server, region_name="eu-west-1").invoke(FunctionName="Echo")
    assert _error_code(excinfo) == "InvalidSignatureException"


def test_expired_signature(server: LocalLambda, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(minutes=10)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: stale)
    with pytest.raises(ClientError) as excinfo:
        _client(server).invoke(FunctionName="Echo")
    assert _error_code(excinfo) == "InvalidSignatureException"
    assert "Signature expired" in excinfo.value.response["Error"]["Message"]


def test_session_token_is_accepted(server: LocalLambda) -> None:
    response = _client(server, aws_session_token="any-session-token").invoke(FunctionName="Echo")
    assert response["StatusCode"] == 200


def test_unsigned_session_token_is_rejected(server: LocalLambda) -> None:
    path = INVOKE.format("Echo")
    headers = _signed_headers(server, path, b"{}")
    headers["X-Amz-Security-Token"] = "added-after-signing"
    status, response_headers, _ = _raw(server, "POST", path, b"{}", headers)
    assert status == 403
    assert response_headers["x-amzn-ErrorType"] == "InvalidSignatureException"


def test_signed_content_sha256_must_match_the_body(server: LocalLambda) -> None:
    # Envoy's signer sends and signs x-amz-content-sha256; botocore then trusts it instead of the body.
    path = INVOKE.format("Echo")
    signed_body = b'{"amount": 1}'
    digest = hashlib.sha256(signed_body).hexdigest()
    headers = _signed_headers(server, path, signed_body, extra={"X-Amz-Content-SHA256": digest})
    assert "x-amz-content-sha256" in headers["Authorization"]
    assert _raw(server, "POST", path, signed_body, headers)[0] == 200
    status, response_headers, _ = _raw(server, "POST", path, b'{"amount": 9}', headers)
    assert status == 403
    assert response_headers["x-amzn-ErrorType"] == "InvalidSignatureException"


def test_unsigned_payload_is_rejected(server: LocalLambda) -> None:
    path = INVOKE.format("Echo")
    headers = _signed_headers(server, path, b"{}", extra={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    assert _raw(server, "POST", path, b"{}", headers)[0] == 403


def test_missing_authorization(server: LocalLambda) -> None:
    status, headers, body = _raw(server, "POST", INVOKE.format("Echo"), b"{}")
    assert status == 403
    assert headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
    assert headers["Content-Type"] == "application/json"
    assert headers["x-amzn-RequestId"]
    assert json.loads(body) == {"message": "Missing Authentication Token"}


def test_tampered_body_is_rejected(server: LocalLambda) -> None:
    path = INVOKE.format("Echo")
    headers = _signed_headers(server, path, b'{"amount": 1}')
    status, response_headers, body = _raw(server, "POST", path, b'{"amount": 9}', headers)
    assert status == 403
    assert response_headers["x-amzn-ErrorType"] == "InvalidSignatureException"
    assert json.loads(body)["message"].startswith("The request signature we calculated does not match")


def test_signed_raw_request_with_encoded_arn(server: LocalLambda) -> None:
    path = INVOKE.format("arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3AEcho%3Alive")
    headers = _signed_headers(server, path, b"{}")
    status, response_headers, body = _raw(server, "POST", path, b"{}", headers)
    assert status == 200
    assert json.loads(body)["v"] == "1"
    assert response_headers["X-Amz-Executed-Version"] == "1"


def test_chunked_request_body(server: LocalLambda) -> None:
    path = INVOKE.format("Echo")
    body = json.dumps({"chunked": True, "filler": "x" * 5000}).encode()
    headers = _signed_headers(server, path, body)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        parts = [body[:7], body[7:4000], body[4000:]]
        conn.request("POST", path, body=iter(parts), headers=headers, encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert json.loads(response.read())["event"] == {"chunked": True, "filler": "x" * 5000}
    finally:
        conn.close()


def test_chunked_tampered_body_is_rejected(server: LocalLambda) -> None:
    path = INVOKE.format("Echo")
    headers = _signed_headers(server, path, b'{"a": 1}')
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", path, body=iter([b'{"a": ', b"2}"]), headers=headers, encode_chunked=True)
        response = conn.getresponse()
        response.read()
        assert response.status == 403
    finally:
        conn.close()


def test_keep_alive_serves_two_requests_on_one_connection(server: LocalLambda) -> None:
    path = INVOKE.format("Echo")
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        seen = []
        sockets = []
        for n in range(2):
            body = json.dumps({"n": n}).encode()
            conn.request("POST", path, body=body, headers=_signed_headers(server, path, body))
            sockets.append(conn.sock)
            response = conn.getresponse()
            assert response.status == 200
            assert not response.will_close
            seen.append(json.loads(response.read())["event"]["n"])
        assert seen == [0, 1]
        assert sockets[0] is sockets[1] and sockets[0] is not None
    finally:
        conn.close()


# --- HTTP-level errors -----------------------------------------------------------------------------


def test_unknown_route(server: LocalLambda) -> None:
    # GetPolicy: a real Lambda API the local endpoint does not implement.
    status, headers, body = _raw(server, "GET", "/2015-03-31/functions/Echo/policy")
    assert status == 404
    assert headers["x-amzn-ErrorType"] == "UnknownOperationException"
    assert headers["x-amzn-RequestId"]
    assert json.loads(body)["Type"] == "User"


def test_invalid_json_payload(client: Any) -> None:
    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="Echo", Payload=b"{not json")
    assert _error_code(excinfo) == "InvalidRequestContentException"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


def test_oversized_sync_payload_then_connection_still_usable(server: LocalLambda) -> None:
    path = INVOKE.format("Echo")
    big = b'"' + b"a" * (6 * 1024 * 1024 - 1) + b'"'  # one byte over the 6 MB limit
    assert len(big) == 6 * 1024 * 1024 + 1
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("POST", path, body=big, headers=_signed_headers(server, path, big))
        response = conn.getresponse()
        body = response.read()
        assert response.status == 413
        assert response.headers["x-amzn-ErrorType"] == "RequestTooLargeException"
        assert "6291456" in json.loads(body)["message"]
        conn.request("POST", path, body=b"{}", headers=_signed_headers(server, path, b"{}"))
        assert conn.getresponse().status == 200
    finally:
        conn.close()


def test_oversized_event_payload(client: Any) -> None:
    payload = b'"' + b"a" * (1024 * 1024) + b'"'
    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="Echo", InvocationType="Event", Payload=payload)
    assert _error_code(excinfo) == "RequestTooLargeException"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 413


# --- invocation types and function errors ----------------------------------------------------------


def test_event_invocation_runs_in_background(client: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    response = client.invoke(
        FunctionName="Touch", InvocationType="Event", Payload=json.dumps({"path": str(marker)})
    )
    assert response["StatusCode"] == 202
    assert response["Payload"].read() == b""
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert marker.read_text() == response["ResponseMetadata"]["RequestId"]


def test_dry_run_does_not_run_the_handler(client: Any, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    response = client.invoke(
        FunctionName="Touch", InvocationType="DryRun", Payload=json.dumps({"path": str(marker)})
    )
    assert response["StatusCode"] == 204
    time.sleep(0.05)
    assert not marker.exists()


def test_dry_run_of_unknown_function(client: Any) -> None:
    with pytest.raises(ClientError) as excinfo:
        client.invoke(FunctionName="Nope", InvocationType="DryRun")
    assert _error_code(excinfo) == "ResourceNotFoundException"


def test_handler_exception_is_unhandled_function_error(client: Any) -> None:
    response = client.invoke(FunctionName="Boom")
    body = _payload(response)
    assert response["StatusCode"] == 200
    assert response["FunctionError"] == "Unhandled"
    assert body["errorMessage"] == "kaboom"
    assert body["errorType"] == "ValueError"
    assert any("pets.py" in line and "boom" in line for line in body["stackTrace"])


def test_timeout(client: Any) -> None:
    started = time.monotonic()
    response = client.invoke(FunctionName="Slow", Payload=b'{"sleep": 1.0}')
    elapsed = time.monotonic() - started
    body = _payload(response)
    assert elapsed < 0.9
    assert response["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Sandbox.Timedout"
    assert body["errorMessage"].endswith("Task timed out after 0.30 seconds")


def test_unserialisable_result_is_marshal_error(client: Any) -> None:
    response = client.invoke(FunctionName="Marshal")
    assert response["FunctionError"] == "Unhandled"
    assert _payload(response)["errorType"] == "Runtime.MarshalError"


def test_module_import_failure_only_breaks_its_function(client: Any) -> None:
    response = client.invoke(FunctionName="Broken")
    body = _payload(response)
    assert response["FunctionError"] == "Unhandled"
    assert body["errorType"] == "Runtime.ImportModuleError"
    assert "cannot import me" in body["errorMessage"]
    assert client.invoke(FunctionName="Echo")["StatusCode"] == 200


def test_missing_handler_attribute(client: Any) -> None:
    response = client.invoke(FunctionName="Missing")
    assert response["FunctionError"] == "Unhandled"
    assert _payload(response)["errorType"] == "Runtime.HandlerNotFound"


def test_log_tail(client: Any) -> None:
    response = client.invoke(FunctionName="Chatty", LogType="Tail", Payload=b'{"tag": "t-1"}')
    request_id = response["ResponseMetadata"]["RequestId"]
    log = base64.b64decode(response["LogResult"]).decode()
    assert _payload(response) is None
    assert log.startswith(f"START RequestId: {request_id} Version: $LATEST\n")
    assert f"hello from {request_id}\n" in log
    assert "careful t-1" in log and "[WARNING]" in log
    assert f"END RequestId: {request_id}\n" in log
    assert f"REPORT RequestId: {request_id}\tDuration: " in log


def test_log_tail_is_per_invocation_under_concurrency(client: Any) -> None:
    logs: dict[str, str] = {}

    def call(tag: str) -> None:
        payload = json.dumps({"tag": tag, "sleep": 0.1}).encode()
        response = client.invoke(FunctionName="Chatty", LogType="Tail", Payload=payload)
        logs[tag] = base64.b64decode(response["LogResult"]).decode()

    threads = [threading.Thread(target=call, args=(f"tag-{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted(logs) == [f"tag-{n}" for n in range(4)]
    for tag, log in logs.items():
        assert f"tag {tag}\n" in log
        assert all(f"tag {other}\n" not in log for other in logs if other != tag)


def test_no_log_result_without_tail(client: Any) -> None:
    assert "LogResult" not in client.invoke(FunctionName="Chatty")


# --- implicit functions folder ---------------------------------------------------------------------


def test_implicit_functions_and_sibling_imports(implicit_server: LocalLambda) -> None:
    client = _client(implicit_server)
    assert _payload(client.invoke(FunctionName="hello")) == {"greeting": "hi", "name": "hello"}
    # Same file name as in the other folder, loaded as a separate module.
    assert _payload(client.invoke(FunctionName="pets")) == "implicit pets"
    for name in ("nohandler", "_helpers", "Echo"):
        with pytest.raises(ClientError) as excinfo:
            client.invoke(FunctionName=name)
        assert _error_code(excinfo) == "ResourceNotFoundException"


def test_implicit_server_accepts_any_region(implicit_server: LocalLambda) -> None:
    client = _client(implicit_server, region_name="eu-west-1")
    body = _payload(client.invoke(FunctionName="arn:aws:lambda:eu-west-1:123456789012:function:hello"))
    assert body["name"] == "hello"


def test_reload_and_change_detection(implicit_server: LocalLambda, implicit_dir: Path) -> None:
    client = _client(implicit_server)
    _write(implicit_dir / "added.py", "def handler(event, context):\n    return 'v1'\n")
    implicit_server.reload()
    assert _payload(client.invoke(FunctionName="added")) == "v1"

    # No explicit reload: the server notices the new mtime within its one-second check interval.
    _write(implicit_dir / "added.py", "def handler(event, context):\n    return 'v2'\n")
    later = time.time() + 5
    os.utime(implicit_dir / "added.py", (later, later))
    deadline = time.monotonic() + 3
    while True:
        result = _payload(client.invoke(FunctionName="added"))
        if result == "v2" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert result == "v2"
