"""`lambdagate serve` as its own process beside an Envoy started from `lambdagate bootstrap`'s output."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import Envoy, free_port, http, wait_until

from controlplane.locallambda import LocalLambda

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "petstore"


def test_serve_with_external_envoy_and_local_lambda(tmp_path: Path, loop_thread) -> None:
    config = tmp_path / "petstore"
    shutil.copytree(EXAMPLE, config, ignore=shutil.ignore_patterns("__pycache__", "functions"))
    # A session token, as role credentials always carry: it must not reach the log even at debug level.
    store = config / "petstore.yaml"
    store.write_text(
        store.read_text().replace(
            "secret_key: local-petstore-secret-not-for-aws",
            "secret_key: local-petstore-secret-not-for-aws\n  session_token: TOKEN-must-stay-secret",
        )
    )
    log_path = tmp_path / "serve.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (the child writes it until it exits)
    local = LocalLambda(EXAMPLE / "functions", {"AKIDLOCALPETSTORE": "local-petstore-secret-not-for-aws"})
    lport = loop_thread.run(local.start())
    grpc_port, port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.cli",
            "--log-level",
            "debug",
            "serve",
            "--config-dir",
            str(config),
            "--grpc-address",
            f"127.0.0.1:{grpc_port}",
            "--listen-address",
            "127.0.0.1",
            "--listen-port",
            str(port),
            "--local-lambda-url",
            f"http://127.0.0.1:{lport}",
        ],
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        health = health_pb2_grpc.HealthStub(channel)
        wait_until(
            lambda: (
                health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ),
            20,
            what="serve to report SERVING",
        )
        channel.close()
        with Envoy(grpc_port) as envoy:
            envoy.wait_listening(port)
            r = http("GET", f"http://127.0.0.1:{port}/pets/1")
            assert r.status == 200 and r.json()["name"] == "Rex"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        log = log_path.read_text()
        assert "configuration applied" in log and "DEBUG" in log
        for secret in ("TOKEN-must-stay-secret", "local-petstore-secret-not-for-aws"):
            assert secret not in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        loop_thread.run(local.stop())
        log_file.close()
