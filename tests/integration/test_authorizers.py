"""Issue 7's access control through a real Envoy: JWT authorizers (Envoy's jwt_authn, keys inline, from a file
and from a JWKS URI), scopes (RBAC), Lambda REQUEST authorizers (IAM policy, context, cache) and API keys with
a rate limit per key. Every function records its invocations, so the tests can tell what was never invoked."""

from __future__ import annotations

import http.server as http_server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from harness import Envoy, LoopThread, free_port, gateway_with_envoy, http, lay_out, wait_until

SECRET = "authorizers-secret"
ISSUER = "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_TEST"
AUDIENCE = "client-app"
API_KEY = "k3y-for-acme-0123456789abcdef"
GOLD_KEY = "k3y-for-gold-0123456789abcdef"

FUNCTIONS = {
    "echo": """
        import json, os

        def handler(event, context):
            with open(os.environ["LG_AUTH_RECORD"], "a") as f:
                f.write(json.dumps({"fn": "echo", "path": event.get("path") or event.get("rawPath")}) + "\\n")
            return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(event)}
    """,
    "authorize": """
        import json, os

        def handler(event, context):
            with open(os.environ["LG_AUTH_RECORD"], "a") as f:
                f.write(json.dumps({"fn": "authorize", "event": event}) + "\\n")
            token = (event.get("headers") or {}).get("authorization", "")
            if token == "bad":
                raise Exception("Unauthorized")
            if token == "broken":
                return {"principalId": "x"}
            effect = "Deny" if token.startswith("deny") else "Allow"
            # Allow everything under this stage's GET routes, the usual way of building the Resource.
            arn = event["methodArn"].split("/")[0] + "/" + event["methodArn"].split("/")[1] + "/GET/*"
            return {
                "principalId": "user-" + token,
                "policyDocument": {
                    "Version": "2012-10-17",
                    "Statement": [{"Action": "execute-api:Invoke", "Effect": effect, "Resource": arn}],
                },
                "context": {"tier": "gold", "quota": 5, "admin": False},
            }
    """,
}

CONFIG = """
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData: {access_key: AKIDAUTH, secret_key: authorizers-secret}
---
apiVersion: v1
kind: Secret
metadata: {name: partner-keys}
stringData: {acme: %(api_key)s, gold: %(gold_key)s}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: fns}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  functions:
  - {name: echo, spec: {function_name: echo}}
  - {name: authorize, spec: {function_name: authorize}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  stage: prod
  authorizers:
    cognito:
      type: jwt
      issuer: %(issuer)s
      audiences: [%(audience)s]
      jwks: {inline: '%(jwks)s'}
    from-file:
      type: jwt
      issuer: %(issuer)s
      jwks: {file: ../keys/jwks.json}     # relative to the config folder
    remote:
      type: jwt
      issuer: %(issuer)s
      audiences: [%(audience)s]
      jwks: {uri: "http://127.0.0.1:%(jwks_port)d/.well-known/jwks.json"}
    custom:
      type: lambda
      upstream: fns
      function: authorize
      identity_sources: [header:Authorization]
      ttl: 300s
  api_keys:
    secret_ref: partner-keys
    rate_limit: {requests: 2, per: 1h}
    limits:
      gold: {requests: 100, per: 1s}
  auth: {authorizer: cognito}            # every route, unless it says otherwise
  routes:
  - matcher: {path: /v1/me, methods: [GET]}
    destination: {upstream: fns, function: echo}
  - matcher: {path: /v2/me, methods: [GET]}
    destination: {upstream: fns, function: echo}
    options: {payload_format: apigateway-v2}
  - matcher: {path: /orders, methods: [GET]}
    destination: {upstream: fns, function: echo}
    auth: {scopes: [orders/read, admin]}
  - matcher: {path: /file}
    destination: {upstream: fns, function: echo}
    auth: {authorizer: from-file}
  - matcher: {path: /remote}
    destination: {upstream: fns, function: echo}
    auth: {authorizer: remote}
  - matcher: {path: /custom, methods: [GET, POST]}
    destination: {upstream: fns, function: echo}
    auth: {authorizer: custom}
  - matcher: {path: /keyed}
    destination: {upstream: fns, function: echo}
    auth: {authorizer: none, api_key_required: true}
  - matcher: {path: /public}
    destination: {upstream: fns, function: echo}
    auth: {authorizer: none}
  - matcher: {path: /mock-protected}
    mock: {status: 200, body: secret mock}
"""


class JwksServer:
    def __init__(self, body: bytes) -> None:
        self.hits = 0
        outer = self

        class Handler(http_server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                outer.hits += 1
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http_server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> JwksServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class Stack:
    def __init__(
        self, base: str, record: Path, envoy: Envoy, key: Any, jwks: JwksServer, folder: Path
    ) -> None:
        self.base, self.record, self.envoy, self.key, self.jwks, self.folder = (
            base,
            record,
            envoy,
            key,
            jwks,
            folder,
        )

    def calls(self, fn: str) -> list[dict[str, Any]]:
        if not self.record.exists():
            return []
        lines = [json.loads(line) for line in self.record.read_text().splitlines()]
        return [line for line in lines if line["fn"] == fn]

    def token(self, key: Any = None, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 600, **claims}
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key or self.key, algorithm="RS256", headers={"kid": "test-key"})

    def get(self, path: str, token: str | None = None, **headers: str) -> Any:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return http("GET", self.base + path, headers=headers)


def _jwks(key: Any) -> str:
    public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": "test-key", "alg": "RS256", "use": "sig"})
    return json.dumps({"keys": [public]})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = _jwks(key)
    loop_thread = LoopThread()
    tmp = tmp_path_factory.mktemp("authorizers")
    record = tmp / "invocations.log"
    mp = pytest.MonkeyPatch()
    mp.setenv("LG_AUTH_RECORD", str(record))
    try:
        with JwksServer(jwks.encode()) as remote:
            config = CONFIG % {
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "jwks": jwks,
                "jwks_port": remote.port,
                "api_key": API_KEY,
                "gold_key": GOLD_KEY,
            }
            functions, folder = lay_out(tmp, FUNCTIONS, config)
            # Outside the config folder: every file in it is read as resource documents.
            (tmp / "keys").mkdir()
            (tmp / "keys" / "jwks.json").write_text(jwks)
            with gateway_with_envoy(loop_thread, folder, functions, {"AKIDAUTH": SECRET}) as (url, envoy):
                yield Stack(url, record, envoy, key, remote, folder)
    finally:
        loop_thread.close()
        mp.undo()


# ---------------------------------------------------------------------------------------------------------------
# JWT authorizers


def test_a_valid_token_shows_its_claims_to_the_function_in_both_formats(stack: Stack) -> None:
    token = stack.token(
        **{"cognito:groups": ["admins", "ops"], "email_verified": True, "scope": "orders/read"}
    )
    v1 = stack.get("/v1/me", token)
    assert v1.status == 200, v1.body
    claims = v1.json()["requestContext"]["authorizer"]["claims"]
    # API Gateway's REST authorizer gives every claim as a string.
    assert claims["sub"] == "user-1" and claims["iss"] == ISSUER and claims["aud"] == AUDIENCE
    assert claims["cognito:groups"] == "[admins ops]" and claims["email_verified"] == "true"
    assert claims["exp"].isdigit()
    assert v1.json()["headers"]["authorization"] == f"Bearer {token}"  # passed on, as API Gateway does
    v2 = stack.get("/v2/me", token)
    assert v2.status == 200
    jwt_ctx = v2.json()["requestContext"]["authorizer"]["jwt"]
    assert jwt_ctx["claims"]["sub"] == "user-1"
    assert jwt_ctx["scopes"] == ["orders/read"]


@pytest.mark.parametrize(
    "case",
    ["missing", "expired", "wrong-audience", "wrong-issuer", "wrong-key", "garbage", "no-bearer"],
)
def test_a_bad_token_gets_401_json_and_nothing_runs(stack: Stack, case: str) -> None:
    before = len(stack.calls("echo"))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    headers: dict[str, str] = {}
    token = {
        "missing": None,
        "expired": stack.token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        "wrong-audience": stack.token(aud="someone-else"),
        "wrong-issuer": stack.token(iss="https://evil.example.com"),
        "wrong-key": stack.token(key=other),
        "garbage": "not.a.jwt",
        "no-bearer": None,
    }[case]
    if case == "no-bearer":
        headers["Authorization"] = stack.token()  # without the Bearer prefix
    r = stack.get("/v1/me", token, **headers)
    assert r.status == 401, (case, r.status, r.body)
    assert r.json()["message"] == "Unauthorized"
    assert r.json()["requestId"]
    assert len(stack.calls("echo")) == before


def test_scopes_any_of_the_routes_is_enough(stack: Stack) -> None:
    before = len(stack.calls("echo"))
    assert stack.get("/orders", stack.token(scope="profile orders/read")).status == 200
    assert stack.get("/orders", stack.token(scp=["admin"])).status == 200  # Okta's list form
    for token in (stack.token(scope="profile"), stack.token(scope="orders/readwrite"), stack.token()):
        r = stack.get("/orders", token)
        assert r.status == 403 and r.json()["message"] == "Forbidden"
    assert len(stack.calls("echo")) == before + 2


def test_jwks_from_a_file_and_from_a_uri(stack: Stack) -> None:
    token = stack.token()
    assert stack.get("/file", token).status == 200
    assert stack.get("/file").status == 401
    r = wait_until(lambda: (x := stack.get("/remote", token)).status == 200 and x, what="remote JWKS fetched")
    assert r.json()["requestContext"]["authorizer"]["claims"]["sub"] == "user-1"
    assert stack.jwks.hits >= 1
    assert stack.get("/remote", stack.token(aud="x")).status == 401


def test_a_jwt_protects_mock_routes_too_and_none_opts_out(stack: Stack) -> None:
    assert stack.get("/mock-protected").status == 401
    r = stack.get("/mock-protected", stack.token())
    assert (r.status, r.body) == (200, b"secret mock")
    public = stack.get("/public")
    assert public.status == 200 and "authorizer" not in public.json()["requestContext"]


# ---------------------------------------------------------------------------------------------------------------
# Lambda authorizers


def test_lambda_authorizer_allows_with_context_and_caches(stack: Stack) -> None:
    asked = len(stack.calls("authorize"))
    r = http("GET", stack.base + "/custom?x=1", headers={"Authorization": "alice"})
    assert r.status == 200, r.body
    authorizer = r.json()["requestContext"]["authorizer"]
    assert authorizer == {"principalId": "user-alice", "tier": "gold", "quota": 5, "admin": False}
    calls = stack.calls("authorize")
    assert len(calls) == asked + 1
    event = calls[-1]["event"]
    assert event["type"] == "REQUEST"
    assert event["methodArn"] == "arn:aws:execute-api:us-east-1:000000000000:api/prod/GET/custom"
    assert event["headers"]["authorization"] == "alice"
    assert event["queryStringParameters"] == {"x": "1"}
    assert "body" not in event
    # Cached for the identity: the function is not asked again, the policy is evaluated again.
    assert http("GET", stack.base + "/custom", headers={"Authorization": "alice"}).status == 200
    assert len(stack.calls("authorize")) == asked + 1
    # The cached policy allows GET only: a POST with the same identity is refused without asking again.
    post = http(
        "POST", stack.base + "/custom", b"{}", {"Authorization": "alice", "content-type": "application/json"}
    )
    assert post.status == 403
    assert post.json()["message"] == "User is not authorized to access this resource"
    assert len(stack.calls("authorize")) == asked + 1


def test_lambda_authorizer_deny_and_missing_identity(stack: Stack) -> None:
    before = len(stack.calls("echo"))
    r = http("GET", stack.base + "/custom", headers={"Authorization": "deny-me"})
    assert r.status == 403
    assert r.json()["message"] == "User is not authorized to access this resource with an explicit deny"
    asked = len(stack.calls("authorize"))
    missing = http("GET", stack.base + "/custom")
    assert missing.status == 401 and missing.json()["message"] == "Unauthorized"
    assert len(stack.calls("authorize")) == asked  # no identity: not even asked
    bad = http("GET", stack.base + "/custom", headers={"Authorization": "bad"})
    assert bad.status == 401  # the authorizer raised "Unauthorized"
    broken = http("GET", stack.base + "/custom", headers={"Authorization": "broken"})
    assert broken.status == 500 and broken.json()["message"] == "Authorizer error"
    assert len(stack.calls("echo")) == before


# ---------------------------------------------------------------------------------------------------------------
# API keys


def test_api_keys_and_the_rate_limit_per_key(stack: Stack) -> None:
    before = len(stack.calls("echo"))
    assert http("GET", stack.base + "/keyed").status == 403
    wrong = http("GET", stack.base + "/keyed", headers={"x-api-key": "not-a-key"})
    assert wrong.status == 403 and wrong.json()["message"] == "Forbidden"
    assert len(stack.calls("echo")) == before
    ok = http("GET", stack.base + "/keyed", headers={"x-api-key": API_KEY})
    assert ok.status == 200
    identity = ok.json()["requestContext"]["identity"]
    assert identity["apiKey"] == API_KEY and identity["apiKeyId"] == "acme"
    assert http("GET", stack.base + "/keyed", headers={"x-api-key": API_KEY}).status == 200
    limited = http("GET", stack.base + "/keyed", headers={"x-api-key": API_KEY})
    assert limited.status == 429 and limited.json()["message"] == "Too Many Requests"
    assert int(limited.header("retry-after") or 0) >= 1
    # Another key has its own bucket (and its own, higher limit).
    for _ in range(5):
        assert http("GET", stack.base + "/keyed", headers={"x-api-key": GOLD_KEY}).status == 200
    assert len(stack.calls("echo")) == before + 7


def test_no_key_or_token_reaches_envoys_config(stack: Stack) -> None:
    dump = stack.envoy.admin("/config_dump")
    assert API_KEY not in dump and GOLD_KEY not in dump
    assert SECRET not in dump
