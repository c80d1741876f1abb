"""Through a real Envoy, our ext_proc and our local Lambda endpoint: the request path end to end.

Covers the event a function sees, response unwrapping, function and signature errors, live config changes,
secrets kept out of Envoy, and fail-closed behaviour when ext_proc is gone.
"""

from __future__ import annotations

import base64
import contextlib
import http.server as http_server
import json
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Envoy, LoopThread, control_plane, free_port, http, wait_until

from controlplane.locallambda import LocalLambda
from controlplane.model.resources import Endpoint

SECRET = "local-secret-value-4f1c"

HANDLERS = textwrap.dedent("""
    import base64, json, os

    def echo(event, context):
        log = os.environ.get("LG_CALL_LOG")
        if log:
            with open(log, "a") as f:
                f.write(event["path"] + "\\n")
        return {"statusCode": 200, "headers": {"content-type": "application/json"},
                "multiValueHeaders": {"Set-Cookie": ["a=1; Path=/", "b=2; Path=/"]},
                "body": json.dumps(event)}

    def binary(event, context):
        raw = base64.b64decode(event["body"]) if event["isBase64Encoded"] else (event["body"] or "").encode()
        return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
                "body": base64.b64encode(raw[::-1]).decode(), "isBase64Encoded": True}

    def boom(event, context):
        raise KeyError("database password is hunter2")

    def malformed(event, context):
        return {"status": "not a proxy response"}
""")


def config(access_key: str = "AKIDLOCAL", secret: str = SECRET) -> str:
    return textwrap.dedent(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: aws}}
        stringData: {{access_key: {access_key}, secret_key: {secret}}}
        ---
        apiVersion: lambdagate.io/v1
        kind: Upstream
        metadata: {{name: local}}
        spec:
          region: us-east-1
          secret_ref: aws
          endpoint: local
          functions:
          - {{name: echo, spec: {{function_name: echo}}}}
          - {{name: binary, spec: {{function_name: binary}}}}
          - {{name: boom, spec: {{function_name: boom}}}}
          - {{name: malformed, spec: {{function_name: malformed}}}}
          - {{name: missing, spec: {{function_name: not-deployed}}}}
          - {{name: old, spec: {{function_name: echo, qualifier: "7"}}}}
        ---
        apiVersion: lambdagate.io/v1
        kind: VirtualService
        metadata: {{name: api}}
        spec:
          routes:
          - matcher: {{path: "/users/{{userId}}/orders/{{orderId}}", methods: [GET]}}
            destination: {{upstream: local, function: echo}}
          - matcher: {{prefix: /bin}}
            destination: {{upstream: local, function: binary}}
          - matcher: {{prefix: /boom}}
            destination: {{upstream: local, function: boom}}
          - matcher: {{prefix: /malformed}}
            destination: {{upstream: local, function: malformed}}
          - matcher: {{prefix: /missing}}
            destination: {{upstream: local, function: missing}}
          - matcher: {{prefix: /old}}
            destination: {{upstream: local, function: old}}
          - matcher: {{prefix: /echo}}
            destination: {{upstream: local, function: echo}}
    """)


class Stack:
    def __init__(self, base: str, cp: object, envoy: Envoy, folder: Path, calls: Path) -> None:
        self.base, self.cp, self.envoy, self.folder, self.calls = base, cp, envoy, folder, calls


@contextlib.contextmanager
def local_lambda(tmp_path: Path, loop_thread: LoopThread, keys: dict[str, str]) -> Iterator[Endpoint]:
    """Our local Lambda endpoint serving HANDLERS (one function per handler), stopped however the test ends."""
    functions = tmp_path / "functions"
    functions.mkdir()
    for name in ("echo", "binary", "boom", "malformed"):
        (functions / f"{name}.py").write_text(HANDLERS.replace(f"def {name}(", "def handler("))
    local = LocalLambda(functions, keys)
    lport = loop_thread.run(local.start())
    try:
        yield Endpoint("http", "127.0.0.1", lport)
    finally:
        loop_thread.run(local.stop())


@contextlib.contextmanager
def running_stack(
    tmp_path: Path, loop_thread: LoopThread, config_text: str, keys: dict[str, str]
) -> Iterator[Stack]:
    """Local endpoint, control plane and a real Envoy, with `config_text` as the config folder."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "api.yaml").write_text(config_text)
    port = free_port()
    with (
        local_lambda(tmp_path, loop_thread, keys) as endpoint,
        control_plane(loop_thread, folder, listen_port=port, local_endpoint=endpoint) as cp,
        Envoy(cp.port) as envoy,
    ):
        envoy.wait_listening(port)
        yield Stack(f"http://127.0.0.1:{port}", cp, envoy, folder, tmp_path / "calls.log")


@pytest.fixture
def stack(tmp_path: Path, loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    monkeypatch.setenv("LG_CALL_LOG", str(tmp_path / "calls.log"))
    with running_stack(tmp_path, loop_thread, config(), {"AKIDLOCAL": SECRET}) as st:
        yield st


def test_event_reaches_function_and_response_is_unwrapped(stack: Stack) -> None:
    r = http(
        "GET",
        stack.base + "/users/u%201/orders/42?tag=a&tag=b&q=x%20y",
        headers={"Cookie": "session=abc", "X-Trace": "t1", "User-Agent": "lg-test"},
    )
    assert r.status == 200
    assert r.all("set-cookie") == ["a=1; Path=/", "b=2; Path=/"]
    event = r.json()
    assert event["httpMethod"] == "GET" and event["resource"] == "/users/{userId}/orders/{orderId}"
    assert event["path"] == "/users/u%201/orders/42"
    assert event["pathParameters"] == {"userId": "u 1", "orderId": "42"}
    assert event["queryStringParameters"] == {"tag": "b", "q": "x y"}
    assert event["multiValueQueryStringParameters"] == {"tag": ["a", "b"], "q": ["x y"]}
    assert event["headers"]["cookie"] == "session=abc" and event["headers"]["x-trace"] == "t1"
    ctx = event["requestContext"]
    assert ctx["identity"]["sourceIp"] == "127.0.0.1" and ctx["identity"]["userAgent"] == "lg-test"
    assert ctx["requestId"] == r.header("x-amzn-requestid")
    assert ctx["protocol"] == "HTTP/1.1" and ctx["httpMethod"] == "GET"
    assert abs(ctx["requestTimeEpoch"] / 1000 - time.time()) < 60
    assert event["body"] is None and event["isBase64Encoded"] is False


def test_post_text_and_binary_bodies(stack: Stack) -> None:
    r = http(
        "POST", stack.base + "/echo/x", json.dumps({"k": "v"}).encode(), {"content-type": "application/json"}
    )
    assert json.loads(r.json()["body"]) == {"k": "v"} and r.json()["isBase64Encoded"] is False
    payload = bytes(range(256)) * 40
    r = http("POST", stack.base + "/bin", payload, {"content-type": "application/octet-stream"})
    assert r.status == 200 and r.body == payload[::-1]
    assert r.header("content-type") == "application/octet-stream"
    assert r.header("content-length") == str(len(payload))


def test_function_errors_are_502_without_internals(stack: Stack) -> None:
    r = http("GET", stack.base + "/boom")
    assert r.status == 502 and r.json()["message"] == "Internal server error"
    assert b"hunter2" not in r.body and b"Traceback" not in r.body
    r = http("GET", stack.base + "/malformed")
    assert r.status == 502 and r.json()["message"] == "Internal server error"


def test_missing_function_or_version_is_a_clear_502(stack: Stack) -> None:
    for path in ("/missing", "/old"):
        r = http("GET", stack.base + path)
        assert r.status == 502 and r.json()["message"] == "Lambda function not found", path


def test_default_credential_chain_without_secret_ref(
    tmp_path: Path, loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    no_secret = config().split("---", 1)[1].replace("secret_ref: aws", "")
    with running_stack(tmp_path, loop_thread, no_secret, {"AKIDFROMENV": "env-secret"}) as st:
        r = http("GET", st.base + "/echo/env")
        assert r.status == 200 and r.json()["path"] == "/echo/env"


def test_wrong_key_is_signature_error_and_rotation_recovers(stack: Stack) -> None:
    (stack.folder / "api.yaml").write_text(config(secret="wrong-secret"))
    wait_until(lambda: http("GET", stack.base + "/echo").status == 502, 5, what="the wrong key to apply")
    r = http("GET", stack.base + "/echo")
    assert "signature" in r.json()["message"] and b"wrong-secret" not in r.body
    (stack.folder / "api.yaml").write_text(config())
    wait_until(lambda: http("GET", stack.base + "/echo").status == 200, 5, what="the right key to apply")


def test_adding_and_deleting_files_reaches_envoy(stack: Stack) -> None:
    assert http("GET", stack.base + "/extra").status == 404
    (stack.folder / "extra.yaml").write_text(
        textwrap.dedent("""
        apiVersion: lambdagate.io/v1
        kind: VirtualService
        metadata: {name: extra}
        spec:
          domains: ["extra.example"]
          routes: [{matcher: {prefix: /extra}, destination: {upstream: local, function: echo}}]
    """)
    )
    # The goal is 2 s (benchmarks/reload.py measures it); the wait here has slack for a loaded machine.
    wait_until(
        lambda: http("GET", stack.base + "/extra", headers={"Host": "extra.example"}).status == 200,
        10,
        what="the new VirtualService",
    )
    (stack.folder / "extra.yaml").unlink()
    wait_until(
        lambda: http("GET", stack.base + "/extra", headers={"Host": "extra.example"}).status == 404,
        10,
        what="the deleted VirtualService to go",
    )


def test_secrets_never_reach_envoy_config_dump(stack: Stack) -> None:
    dump = stack.envoy.admin("/config_dump?include_eds")
    assert "lambdagate_routes" in dump and SECRET not in dump and "AKIDLOCAL" not in dump


def test_fail_closed_when_extproc_is_gone(
    tmp_path: Path, loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = tmp_path / "calls.log"
    monkeypatch.setenv("LG_CALL_LOG", str(calls))
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "api.yaml").write_text(config())
    port = free_port()
    with (
        local_lambda(tmp_path, loop_thread, {"AKIDLOCAL": SECRET}) as endpoint,
        contextlib.ExitStack() as outer,
    ):
        cp_ctx = control_plane(loop_thread, folder, listen_port=port, local_endpoint=endpoint)
        cp = cp_ctx.__enter__()
        try:
            envoy = outer.enter_context(Envoy(cp.port))
            envoy.wait_listening(port)
            assert http("GET", f"http://127.0.0.1:{port}/echo/1").status == 200
            assert calls.read_text().splitlines() == ["/echo/1"]
        finally:
            cp_ctx.__exit__(None, None, None)
        # The control plane (xDS and ext_proc) is gone; Envoy keeps its config but must not forward.
        r = http("GET", f"http://127.0.0.1:{port}/echo/2")
        assert r.status >= 500
        assert calls.read_text().splitlines() == ["/echo/1"], "nothing reached Lambda without ext_proc"


class _Recorder(http_server.BaseHTTPRequestHandler):
    """A Lambda stand-in that records exactly what Envoy sent it."""

    protocol_version = "HTTP/1.1"
    seen: list[tuple[str, list[tuple[str, str]], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802
        if self.headers.get("transfer-encoding") == "chunked":
            body = b""
            while (size := int(self.rfile.readline().strip(), 16)) != 0:
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
        _Recorder.seen.append((self.path, list(self.headers.items()), body))
        out = json.dumps({"statusCode": 200, "body": "recorded"}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-amzn-requestid", "rec-1")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def test_only_the_signed_invoke_request_reaches_lambda(tmp_path: Path, loop_thread: LoopThread) -> None:
    from controlplane.locallambda import SigV4Verifier

    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen = []
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "api.yaml").write_text(
        config().replace("endpoint: local", f"endpoint: http://127.0.0.1:{server.server_port}")
    )
    port = free_port()
    try:
        with control_plane(loop_thread, folder, listen_port=port) as cp, Envoy(cp.port) as envoy:
            envoy.wait_listening(port)
            r = http(
                "POST",
                f"http://127.0.0.1:{port}/echo/a?b=c",
                b"hello",
                {
                    "Cookie": "session=s3cr3t",
                    "Authorization": "Bearer client-token",
                    "X-Envoy-Foo": "1",
                    "Content-Type": "text/plain",
                    "X-Custom": "yes",
                    # Internal and tracing header names with values lambdagate does not set: removed too.
                    "X-Lambdagate-Sign": "default/other/0/abc",
                    "Traceparent": "not-a-traceparent",
                },
            )
            assert r.status == 200 and r.body == b"recorded"
            assert http("GET", f"http://127.0.0.1:{port}/echo/b").status == 200
    finally:
        server.shutdown()
        server.server_close()
    (path, headers, body), (_, get_headers, get_body) = _Recorder.seen
    assert path == "/2015-03-31/functions/echo/invocations"
    names = {k.lower() for k, _ in headers}
    # Only what the Invoke API needs, framed with Content-Length, and the trace id Lambda and X-Ray read
    # (a new one here: the client sent none); nothing of the client's.
    assert names == {
        "host",
        "content-type",
        "x-amz-date",
        "authorization",
        "content-length",
        "x-amzn-trace-id",
    }, names
    assert dict((k.lower(), v) for k, v in headers)["content-length"] == str(len(body))
    # A request that had no body gets the event chunked: Envoy drops Content-Length from a headers-phase body.
    get_names = {k.lower() for k, _ in get_headers}
    assert get_names == {
        "host",
        "content-type",
        "x-amz-date",
        "authorization",
        "transfer-encoding",
        "x-amzn-trace-id",
    }, get_names
    assert json.loads(get_body)["httpMethod"] == "GET"
    assert dict((k.lower(), v) for k, v in headers)["authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDLOCAL/"
    )
    event = json.loads(body)
    assert event["headers"]["cookie"] == "session=s3cr3t" and event["headers"]["x-custom"] == "yes"
    assert event["headers"]["authorization"] == "Bearer client-token" and event["body"] == "hello"
    # The signature covers the host and the exact bytes that arrived.
    SigV4Verifier({"AKIDLOCAL": SECRET}).verify("POST", path, headers, body)


def test_role_arn_signs_with_the_assumed_role(
    tmp_path: Path, loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """role_arn: the Secret's keys assume the role at moto's STS (signatures checked); Lambda sees the role's."""
    from harness import MotoServer

    server = http_server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Recorder.seen = []
    folder = tmp_path / "config"
    folder.mkdir()
    port = free_port()
    try:
        with MotoServer() as moto:
            monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto.url)
            trust = {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
            }
            role = moto.client("iam").create_role(
                RoleName="invoker", AssumeRolePolicyDocument=json.dumps(trust)
            )["Role"]
            text = config(moto.access_key, moto.secret_key).replace(
                "endpoint: local",
                f"endpoint: http://127.0.0.1:{server.server_port}\n  role_arn: {role['Arn']}",
            )
            (folder / "api.yaml").write_text(text)
            with control_plane(loop_thread, folder, listen_port=port) as cp, Envoy(cp.port) as envoy:
                envoy.wait_listening(port)
                r = http("POST", f"http://127.0.0.1:{port}/echo/a", b"hello")
                assert r.status == 200 and r.body == b"recorded"

                # Keys STS refuses (a wrong secret): no role, so nothing is signed and nothing forwarded.
                (folder / "api.yaml").write_text(
                    config(moto.access_key, "wrong-secret").replace(
                        "endpoint: local",
                        f"endpoint: http://127.0.0.1:{server.server_port}\n  role_arn: {role['Arn']}x",
                    )
                )
                wait_until(
                    lambda: http("POST", f"http://127.0.0.1:{port}/echo/b", b"x").status == 502,
                    10,
                    what="the route with the unassumable role to answer 502",
                )
                forwarded = len(_Recorder.seen)
                r = http("POST", f"http://127.0.0.1:{port}/echo/c", b"x")
                assert r.status == 502 and "no AWS credentials" in r.json()["message"]
                assert len(_Recorder.seen) == forwarded, "an unsigned request reached Lambda"
    finally:
        server.shutdown()
        server.server_close()
    _, headers, _ = _Recorder.seen[0]
    sent = {k.lower(): v for k, v in headers}
    credential = sent["authorization"].split("Credential=", 1)[1].split("/", 1)[0]
    # moto's STS hands out temporary keys (ASIA...) with a session token: those signed the request.
    assert credential != moto.access_key and credential.startswith("ASIA"), credential
    assert sent["x-amz-security-token"]


def test_unreachable_lambda_endpoint_is_a_json_503(tmp_path: Path, loop_thread: LoopThread) -> None:
    closed = free_port()  # nothing listens here
    text = config().replace("endpoint: local", f"endpoint: http://127.0.0.1:{closed}")
    with running_stack(tmp_path, loop_thread, text, {"AKIDLOCAL": SECRET}) as st:
        r = http("GET", st.base + "/echo")
        assert r.status == 503
        assert r.json()["message"] == "Service Unavailable" and r.json()["requestId"]


def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes as they are and read what comes back until the server closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def test_envoys_own_answers_pass_untouched_and_unmatched_is_json_404(stack: Stack) -> None:
    port = int(stack.base.rsplit(":", 1)[1])
    r = http("GET", stack.base + "/no/such/route")
    assert r.status == 404 and r.json()["message"] == "Not Found" and r.json()["requestId"]
    # HTTP/1.0 is refused by Envoy itself (426); the processor must not turn that into silence or a 502.
    assert raw_request(port, b"GET /echo HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 426")
    # An escaped slash is redirected by Envoy with its Location header intact.
    reply = raw_request(port, b"GET /echo/%2F..%2Fa HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 307") and b"\r\nlocation: " in reply.lower()
    # A broken request line gets Envoy's 400, not a dropped connection.
    assert raw_request(port, b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert calls_of(stack) == []


def test_hostile_requests_never_break_the_stream(stack: Stack) -> None:
    cases = [
        ("GET", "/echo/" + "a" * 4000, None, {}),
        ("GET", "/echo?" + "&".join(f"k{i}=v{i}" for i in range(500)), None, {}),
        ("GET", "/echo?bad=%ff%fe&x=%", None, {}),
        ("POST", "/echo", b"\xff\xfe\x00 not utf-8", {"content-type": "text/plain"}),
        ("GET", "/echo", b"a body on a GET", {"content-type": "text/plain"}),
        ("HEAD", "/echo", None, {}),
        ("OPTIONS", "/echo", None, {}),
        ("GET", "/echo", None, {"X-Big": "v" * 30000}),
    ]
    for method, path, body, headers in cases:
        r = http(method, stack.base + path, body, headers)
        assert r.status == 200, (method, path[:40], r.status, r.body[:200])
        if method != "HEAD":
            event = r.json()
            assert event["httpMethod"] == method
    event = http("POST", stack.base + "/echo", b"\xff\xfe\x00", {"content-type": "text/plain"}).json()
    assert event["isBase64Encoded"] is True and base64.b64decode(event["body"]) == b"\xff\xfe\x00"
    assert http("GET", stack.base + "/echo?bad=%ff").json()["queryStringParameters"] == {"bad": "\ufffd"}


def calls_of(stack: Stack) -> list[str]:
    return stack.calls.read_text().splitlines() if stack.calls.exists() else []


def test_bodies_over_the_buffer_limit_are_refused_before_lambda(stack: Stack) -> None:
    r = http("POST", stack.base + "/echo", b"x" * (11 * 1024 * 1024), {"content-type": "text/plain"})
    assert r.status == 413
    assert calls_of(stack) == []
    # Just under Lambda's 6 MB limit once wrapped in the event: it goes through, processed off the event loop.
    payload = b"y" * (4 * 1024 * 1024)
    r = http("POST", stack.base + "/echo", payload, {"content-type": "text/plain"})
    assert r.status == 200 and len(r.json()["body"]) == len(payload)
