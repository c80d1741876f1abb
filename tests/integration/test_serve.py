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
    local = LocalLambda(EXAMPLE / "functions", {"AKIDLOCALPETSTORE": "local-petstore-secret-not-for-aws"})
    lport = loop_thread.run(local.start())
    grpc_port, port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.cli",
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
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
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
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        loop_thread.run(local.stop())
