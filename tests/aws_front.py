"""A front door for moto's server: what AWS's own front does that moto's does not, and a record of who signed what.

- STS `AssumeRoleWithWebIdentity` is unsigned in AWS: the token is the proof. moto's server with signature
  checking on cannot serve an unsigned call (it answers 500). The front plays AWS's part: it accepts only the
  tokens it was told are valid (the identity provider's), answers others as STS does (400
  `InvalidIdentityToken`), and passes accepted calls to moto signed as an IAM user that may call
  `sts:AssumeRoleWithWebIdentity`. moto then issues the role's keys and checks every later use of them.
- Every other request reaches moto as it came (Host header and body unchanged, so signatures still verify),
  and moto checks the caller's own signature.
- Each request is recorded: its action (or path), the access key that signed it, the web identity token.

`setup_web_identity` creates the IAM user and the role with moto's checking briefly off (moto-api/reset-auth).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from harness import MotoServer
from harness import http as http_request

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
    "content-length",
}


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    action: str | None  # the Query API's Action, or None (Lambda's REST paths)
    access_key: str | None  # from Authorization's Credential=, None when unsigned
    token: str | None  # WebIdentityToken, for AssumeRoleWithWebIdentity
    status: int


@dataclass(frozen=True)
class WebIdentitySetup:
    role_arn: str  # the role web identity assumes; may call lambda:* and sts:AssumeRole
    sts_access_key: str  # the front's own IAM user, for forwarding AssumeRoleWithWebIdentity
    sts_secret_key: str


def setup_web_identity(moto: MotoServer, role_name: str = "web-identity") -> WebIdentitySetup:
    """An IAM user the front signs web identity calls as, and a role web identity may assume."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=moto.url,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    _auth(moto, 5)  # exactly the five IAM calls below go unchecked
    try:
        iam.create_user(UserName="sts-front")
        iam.put_user_policy(
            UserName="sts-front",
            PolicyName="web-identity",
            PolicyDocument=_allow(["sts:AssumeRoleWithWebIdentity"]),
        )
        key = iam.create_access_key(UserName="sts-front")["AccessKey"]
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/oidc.example"},
                    "Action": "sts:AssumeRoleWithWebIdentity",
                },
                {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"},
            ],
        }
        role = iam.create_role(RoleName=role_name, AssumeRolePolicyDocument=json.dumps(trust))["Role"]
        iam.put_role_policy(
            RoleName=role_name, PolicyName="invoke", PolicyDocument=_allow(["lambda:*", "sts:AssumeRole"])
        )
    finally:
        _auth(moto, 0)  # checking on again for everything
    return WebIdentitySetup(role["Arn"], key["AccessKeyId"], key["SecretAccessKey"])


def _allow(actions: list[str]) -> str:
    return json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    )


def _auth(moto: MotoServer, unchecked: int) -> None:
    r = http_request(
        "POST", moto.url + "/moto-api/reset-auth", str(unchecked).encode(), {"content-type": "text/plain"}
    )
    assert r.status == 200, r


class AwsFront:
    """The front on a free port in front of `moto`; `accept` is the set of valid web identity tokens."""

    def __init__(self, moto: MotoServer, setup: WebIdentitySetup) -> None:
        self.moto = moto
        self.setup = setup
        self.accept: set[str] = set()
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AwsFront:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def calls(self, action: str | None = None, path_part: str | None = None) -> list[Seen]:
        with self._lock:
            seen = list(self.seen)
        return [
            s
            for s in seen
            if (action is None or s.action == action) and (path_part is None or path_part in s.path)
        ]

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def do_PUT(self) -> None:
                self._serve()

            def do_DELETE(self) -> None:
                self._serve()

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("content-length") or 0))

            def _serve(self) -> None:
                body = self._body()
                headers = [(k, v) for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP]
                authorization = self.headers.get("authorization")
                access_key = None
                if authorization and "Credential=" in authorization:
                    access_key = authorization.split("Credential=", 1)[1].split("/", 1)[0]
                form: dict[str, list[str]] = {}
                if "x-www-form-urlencoded" in (self.headers.get("content-type") or ""):
                    form = urllib.parse.parse_qs(body.decode(errors="replace"))
                action = (form.get("Action") or [None])[0]
                token = (form.get("WebIdentityToken") or [None])[0]
                if action == "AssumeRoleWithWebIdentity" and authorization is None:
                    if token not in front.accept:
                        # A careless STS echoing what it refused: our logs must still not show it.
                        status, out_headers, out = _sts_error(f"Couldn't verify the token {token}")
                        # Recorded before answering: whoever got the answer finds the call recorded.
                        front._record(Seen(self.command, self.path, action, None, token, status))
                        self._answer(status, out_headers, out)
                        return
                    headers = _signed_as(front.setup, front.moto, self.path, body, headers)
                status, out_headers, out = _forward(front.moto, self.command, self.path, headers, body)
                front._record(Seen(self.command, self.path, action, access_key, token, status))
                self._answer(status, out_headers, out)

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in HOP_BY_HOP and k.lower() not in ("date", "server"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler


def _sts_error(message: str) -> tuple[int, list[tuple[str, str]], bytes]:
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
        f"<Code>InvalidIdentityToken</Code><Message>{message}</Message></Error>"
        f"<RequestId>{uuid.uuid4()}</RequestId></ErrorResponse>"
    ).encode()
    return 400, [("content-type", "text/xml")], body


def _signed_as(
    setup: WebIdentitySetup, moto: MotoServer, path: str, body: bytes, headers: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    host = f"127.0.0.1:{moto.port}"
    kept = {k: v for k, v in headers if k.lower() not in ("host", "authorization", "x-amz-date")}
    request = AWSRequest(method="POST", url=f"http://{host}{path}", data=body, headers={**kept, "host": host})
    SigV4Auth(Credentials(setup.sts_access_key, setup.sts_secret_key), "sts", "us-east-1").add_auth(request)
    return list(request.headers.items())


def _forward(
    moto: MotoServer, method: str, path: str, headers: list[tuple[str, str]], body: bytes
) -> tuple[int, list[tuple[str, str]], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", moto.port, timeout=30)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.getheaders(), resp.read()
    finally:
        conn.close()


@contextlib.contextmanager
def moto_with_web_identity() -> Iterator[tuple[MotoServer, AwsFront]]:
    """moto (signature checking on) with a web identity role, behind a front; both stopped at the end."""
    with MotoServer() as moto:
        setup = setup_web_identity(moto)
        with AwsFront(moto, setup) as front:
            yield moto, front
