"""`lambdagate local-lambda` as a user runs it, called by a real boto3 client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from harness import free_port, wait_until

EXAMPLE_FUNCTIONS = Path(__file__).resolve().parents[2] / "examples" / "petstore" / "functions"


def test_local_lambda_command_serves_the_example(tmp_path: Path) -> None:
    port = free_port()
    env = dict(os.environ, LAMBDAGATE_LOCAL_ACCESS_KEY="AKIDCLI", LAMBDAGATE_LOCAL_SECRET_KEY="cli-secret")
    log = open(tmp_path / "ll.log", "wb")  # noqa: SIM115 (the child writes it until it exits)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "controlplane.cli",
            "local-lambda",
            "--functions-dir",
            str(EXAMPLE_FUNCTIONS),
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
    )

    def client(secret: str):
        return boto3.client(
            "lambda",
            endpoint_url=f"http://127.0.0.1:{port}",
            region_name="us-east-1",
            aws_access_key_id="AKIDCLI",
            aws_secret_access_key=secret,
            config=Config(retries={"total_max_attempts": 1}),
        )

    try:
        good = client("cli-secret")
        wait_until(lambda: proc.poll() is None and _listening(port), 20, what="local-lambda to listen")
        out = good.invoke(
            FunctionName="PetsPetIdGetFunction",
            Qualifier="live",
            Payload=json.dumps({"pathParameters": {"petId": "1"}}),
        )
        assert json.loads(json.loads(out["Payload"].read())["body"])["name"] == "Rex"
        assert good.invoke(FunctionName="PetsGetFunction", InvocationType="Event")["StatusCode"] == 202
        with pytest.raises(ClientError) as err:
            client("wrong").invoke(FunctionName="PetsGetFunction")
        assert err.value.response["Error"]["Code"] == "InvalidSignatureException"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert "cli-secret" not in (tmp_path / "ll.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _listening(port: int) -> bool:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
