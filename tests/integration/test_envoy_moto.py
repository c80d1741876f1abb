"""Through a real Envoy to moto's Lambda API with signature checking on: an independent SigV4 verifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import Envoy, MotoServer, control_plane, free_port, http, wait_until


def write_config(folder: Path, moto: MotoServer, secret_key: str) -> None:
    (folder / "gateway.yaml").write_text(f"""
apiVersion: v1
kind: Secret
metadata: {{name: aws}}
stringData: {{access_key: {moto.access_key}, secret_key: {secret_key}}}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {{name: moto}}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: {moto.url}
  functions:
  - {{name: hello, spec: {{function_name: hello-fn}}}}
  - {{name: by-arn, spec: {{function_name: "arn:aws:lambda:us-east-1:123456789012:function:hello-fn"}}}}
  - {{name: v1, spec: {{function_name: hello-fn, qualifier: "1"}}}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {{name: api}}
spec:
  routes:
  - matcher: {{prefix: /arn}}
    destination: {{upstream: moto, function: by-arn}}
  - matcher: {{prefix: /v1}}
    destination: {{upstream: moto, function: v1}}
  - matcher: {{prefix: /}}
    destination: {{upstream: moto, function: hello}}
""")


@pytest.fixture(scope="module")
def moto() -> MotoServer:
    with MotoServer() as server:
        server.create_function("hello-fn", publish=True)
        yield server


def test_signed_invocations_are_accepted_by_moto(moto: MotoServer, tmp_path: Path, loop_thread) -> None:
    write_config(tmp_path, moto, moto.secret_key)
    port = free_port()
    with control_plane(loop_thread, tmp_path, listen_port=port) as cp, Envoy(cp.port) as envoy:
        envoy.wait_listening(port)
        moto.queue_results(
            [
                json.dumps({"statusCode": 201, "headers": {"x-from": "moto"}, "body": "created"}),
                json.dumps({"statusCode": 200, "body": "via arn"}),
                json.dumps({"statusCode": 200, "body": "get"}),
            ]
        )
        r = http("POST", f"http://127.0.0.1:{port}/things", b'{"a": 1}', {"content-type": "application/json"})
        assert (r.status, r.body, r.header("x-from")) == (201, b"created", "moto")
        r = http("POST", f"http://127.0.0.1:{port}/arn/x", b"binary\x00\xff", {"content-type": "image/png"})
        assert (r.status, r.body) == (200, b"via arn")
        r = http("GET", f"http://127.0.0.1:{port}/things?x=1")
        assert (r.status, r.body) == (200, b"get")
        # ?Qualifier= is part of what is signed; moto checks it and knows version 1.
        moto.queue_results([json.dumps({"statusCode": 200, "body": "version 1"})])
        r = http("GET", f"http://127.0.0.1:{port}/v1")
        assert (r.status, r.body) == (200, b"version 1")


def test_wrong_secret_key_is_a_clear_signature_error(moto: MotoServer, tmp_path: Path, loop_thread) -> None:
    write_config(tmp_path, moto, "definitely-not-the-secret")
    port = free_port()
    with control_plane(loop_thread, tmp_path, listen_port=port) as cp, Envoy(cp.port) as envoy:
        envoy.wait_listening(port)
        r = http("GET", f"http://127.0.0.1:{port}/things")
        assert r.status == 502
        assert "signature" in r.json()["message"]
        assert "definitely-not-the-secret" not in r.body.decode()
        # The same folder, corrected, recovers without a restart.
        write_config(tmp_path, moto, moto.secret_key)
        moto.queue_results([json.dumps({"statusCode": 200, "body": "ok now"})] * 5)
        wait_until(
            lambda: http("GET", f"http://127.0.0.1:{port}/things").body == b"ok now",
            10,
            what="rotated secret to take effect",
        )
