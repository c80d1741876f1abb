"""Web identity (IRSA) credentials through a real Envoy to moto's Lambda API, signature checking on.

The Upstreams have no secret_ref: ext_proc signs with the default chain, which has assumed a role with the web
identity token file (moto's STS, behind tests/aws_front.py). Rotating the token file changes the keys the next
invocations are signed with, long before the old ones expire; a role_arn Upstream follows too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from aws_front import moto_with_web_identity
from harness import Envoy, LoopThread, control_plane, free_port, http, wait_until

from controlplane.aws import signing

TOKENS = ("eyJ.first-token.sig", "eyJ.second-token.sig")


def write_token(path: Path, token: str) -> None:
    tmp = path.with_suffix(".new")
    tmp.write_text(token)
    os.replace(tmp, path)


def test_invocations_sign_with_web_identity_keys_and_follow_a_new_token(
    tmp_path: Path, loop_thread: LoopThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    folder = tmp_path / "config"
    folder.mkdir()
    # Look at the token file often, so the test need not wait for the default 10 s.
    monkeypatch.setattr(signing, "TOKEN_CHECK_S", 0.1)
    with moto_with_web_identity() as (moto, front):
        front.accept = set(TOKENS)
        moto.create_function("hello-fn")
        write_token(token, TOKENS[0])
        monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token))
        monkeypatch.setenv("AWS_ROLE_ARN", front.setup.role_arn)
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", front.url)
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # Lambda calls go through the front too: it records who signed them, and moto checks the signatures.
        (folder / "api.yaml").write_text(f"""
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {{name: pod-identity}}
spec:
  region: us-east-1
  endpoint: {front.url}
  functions: [{{name: hello, spec: {{function_name: hello-fn}}}}]
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {{name: as-role}}
spec:
  region: us-east-1
  endpoint: {front.url}
  role_arn: {front.setup.role_arn}
  functions: [{{name: hello, spec: {{function_name: hello-fn}}}}]
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {{name: api}}
spec:
  routes:
  - matcher: {{prefix: /role}}
    destination: {{upstream: as-role, function: hello}}
  - matcher: {{prefix: /}}
    destination: {{upstream: pod-identity, function: hello}}
""")
        port = free_port()
        base = f"http://127.0.0.1:{port}"

        def call(path: str) -> tuple[int, bytes, str | None]:
            moto.queue_results([json.dumps({"statusCode": 200, "body": f"hello {path}"})])
            before = len(front.calls(path_part="/invocations"))
            r = http("POST", base + path, b"{}")
            invokes = front.calls(path_part="/invocations")[before:]
            return r.status, r.body, invokes[-1].access_key if invokes else None

        with control_plane(loop_thread, folder, listen_port=port) as cp, Envoy(cp.port) as envoy:
            envoy.wait_listening(port)
            chain = cp.default_chain
            assert chain.method == "assume-role-with-web-identity"
            first = chain.current().access_key
            assert [s.token for s in front.calls("AssumeRoleWithWebIdentity")] == [TOKENS[0]], front.seen

            status, body, signer = call("/things")
            assert (status, body) == (200, b"hello /things")
            assert signer == first and first.startswith("ASIA")

            status, body, role_signer = call("/role/x")
            assert (status, body) == (200, b"hello /role/x")
            # The role was assumed with the web identity keys, and its own keys signed the call.
            assert front.calls("AssumeRole")[-1].access_key == first
            assert role_signer is not None and role_signer not in (first, None)

            write_token(token, TOKENS[1])
            wait_until(lambda: chain.current().access_key != first, 10, what="keys from the new token")
            second = chain.current().access_key
            assert front.calls("AssumeRoleWithWebIdentity")[-1].token == TOKENS[1]
            status, body, signer = call("/things")
            assert (status, body, signer) == (200, b"hello /things", second)

            # The role is assumed again with the new keys, within the chain's token check.
            wait_until(
                lambda: front.calls("AssumeRole")[-1].access_key == second, 10, what="the role assumed again"
            )
            wait_until(lambda: call("/role/y")[2] not in (role_signer, None), 10, what="new role keys in use")
            status, body, _ = call("/role/z")
            assert (status, body) == (200, b"hello /role/z")
