"""Benchmark lambdagate's ext_proc path against Envoy's native aws_lambda filter and a plain Envoy proxy.

One command starts every server on 127.0.0.1, drives each path with wrk, prints a markdown table and ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from controlplane.bootstrap import bootstrap_yaml
from controlplane.cli import envoy_binary

LAMBDA_ARN = "arn:aws:lambda:us-east-1:123456789012:function:bench"
LAMBDA_BODY = json.dumps(
    {"statusCode": 200, "headers": {"content-type": "text/plain"}, "body": "ok"}, separators=(",", ":")
)
INVOKE_PREFIX = "/2015-03-31/functions/"
# Fake keys: the stand-in endpoint never checks the signature, it only needs the gateway to have produced one.
FAKE_ACCESS_KEY = "AKIDBENCHMARKFAKE000"
FAKE_SECRET_KEY = "bench-secret-key-not-for-aws"
PLAIN_MARK = "x-bench-plain-proxy"

PATHS: dict[str, str] = {
    "a": "Envoy → endpoint (plain proxy)",
    "b": "Envoy aws_lambda filter (C++ SigV4)",
    "c": "lambdagate (Envoy + ext_proc)",
    "d": "Envoy + do-nothing Python ext_proc (floor)",
}


# --- processes --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Proc:
    """A child in its own process group, so stopping it also stops anything it started."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (open for the child's lifetime; stop() closes it)
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-n:]
        return ""

    def stop(self) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
        else:
            # The leader is gone; anything left in its group still has to go.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
        self._log.close()


class Procs:
    """Every process this run started, stopped in reverse order however the run ends."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        p = Proc(name, argv, self.workdir / f"{name}.log", env)
        self.procs.append(p)
        return p

    def stop(self, proc: Proc) -> None:
        proc.stop()
        with contextlib.suppress(ValueError):
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces; the fields after its closing ')' are fixed.
    return stat[stat.rindex(")") + 2 :].split()


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (ext_proc workers of a control plane)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    out.append(int(entry.name))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and of its live children (ext_proc workers)."""
    total = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = _stat_fields(pid)
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total + sum(cpu_seconds(child) for child in children(pid))


# --- HTTP checks ------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def get(url: str, timeout: float = 5) -> Reply:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as err:
        return Reply(err.code, {k.lower(): v for k, v in err.headers.items()}, err.read())


def wait_for(what: str, check: Callable[[], bool], procs: list[Proc], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        for p in procs:
            if not p.alive():
                raise BenchError(f"{p.name} exited while waiting for {what}:\n{p.log_tail()}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError) as err:  # not listening yet
            last = err
        time.sleep(0.1)
    tails = "\n".join(f"--- {p.name} ---\n{p.log_tail()}" for p in procs)
    raise BenchError(f"timed out waiting for {what} (last: {last!r})\n{tails}")


class BenchError(Exception):
    pass


# --- Envoy configs ----------------------------------------------------------------------------------


def _listener(port: int, routes: list[dict[str, Any]], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                            ".HttpConnectionManager",
                            "stat_prefix": "bench",
                            "route_config": {
                                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]
                            },
                            "http_filters": [
                                *filters,
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                    },
                                },
                            ],
                        },
                    }
                ]
            }
        ],
    }


def _static(admin_port: int, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> str:
    return yaml.safe_dump(
        {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        },
        sort_keys=False,
    )


def fast_lambda_config(port: int, admin_port: int) -> str:
    """The stand-in for Lambda: a canned Invoke answer, no signature check.

    Requests must be Invoke calls carrying an Authorization header (or come from path (a), which marks them),
    so a gateway that does not sign or rewrite shows up as 403s (a failed benchmark), not as a fast wrong number.
    """
    lambda_ok = {
        "status": 200,
        "body": {"inline_string": LAMBDA_BODY},
    }
    ok_headers = [
        {"header": {"key": "content-type", "value": "application/json"}},
        {"header": {"key": "x-amzn-requestid", "value": "bench"}},
    ]
    routes = [
        {
            "match": {"prefix": INVOKE_PREFIX, "headers": [{"name": "authorization", "present_match": True}]},
            "direct_response": lambda_ok,
            "response_headers_to_add": ok_headers,
        },
        # Path (a) marks its requests, so a request reaching here neither signed nor marked is a broken gateway.
        {
            "match": {"prefix": "/", "headers": [{"name": PLAIN_MARK, "present_match": True}]},
            "direct_response": lambda_ok,
            "response_headers_to_add": ok_headers,
        },
        {
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 403,
                "body": {"inline_string": '{"message":"not a signed Invoke"}'},
            },
        },
    ]
    return _static(admin_port, [_listener(port, routes, [])], [])


def _fast_cluster(fast_port: int, lambda_gateway: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": "fast_lambda",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "fast_lambda",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": fast_port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if lambda_gateway:
        # Without this mark the aws_lambda filter (as a downstream filter) lets the request through untouched.
        cluster["metadata"] = {"filter_metadata": {"com.amazonaws.lambda": {"egress_gateway": True}}}
    return cluster


def proxy_config(port: int, admin_port: int, fast_port: int) -> str:
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {"cluster": "fast_lambda"},
            "request_headers_to_add": [{"header": {"key": PLAIN_MARK, "value": "1"}}],
        }
    ]
    return _static(admin_port, [_listener(port, routes, [])], [_fast_cluster(fast_port)])


def native_lambda_config(port: int, admin_port: int, fast_port: int) -> str:
    lambda_filter = {
        "name": "envoy.filters.http.aws_lambda",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.aws_lambda.v3.Config",
            "arn": LAMBDA_ARN,
            "payload_passthrough": False,
            "invocation_mode": "SYNCHRONOUS",
        },
    }
    routes = [{"match": {"prefix": "/"}, "route": {"cluster": "fast_lambda"}}]
    return _static(admin_port, [_listener(port, routes, [lambda_filter])], [_fast_cluster(fast_port, True)])


def noop_extproc_config(port: int, admin_port: int, fast_port: int, extproc_port: int) -> str:
    """Path (d): lambdagate's filter settings (four phases, bodies buffered) with a processor that does nothing."""
    ext_proc = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "noop_extproc"}},
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "response_header_mode": "SEND",
                "response_body_mode": "BUFFERED",
            },
        },
    }
    routes = [
        {
            "match": {"prefix": "/"},
            "route": {"cluster": "fast_lambda"},
            "request_headers_to_add": [{"header": {"key": PLAIN_MARK, "value": "1"}}],
        }
    ]
    extproc_cluster = {
        "name": "noop_extproc",
        "type": "STATIC",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": "noop_extproc",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": extproc_port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    return _static(
        admin_port, [_listener(port, routes, [ext_proc])], [_fast_cluster(fast_port), extproc_cluster]
    )


def lambdagate_config_dir(root: Path, fast_port: int) -> Path:
    d = root / "lambdagate-config"
    d.mkdir()
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "bench-aws"},
            "stringData": {"access_key": FAKE_ACCESS_KEY, "secret_key": FAKE_SECRET_KEY},
        },
        {
            "apiVersion": "lambdagate.io/v1",
            "kind": "Upstream",
            "metadata": {"name": "bench-lambdas"},
            "spec": {
                "type": "aws",
                "region": "us-east-1",
                "secret_ref": "bench-aws",
                "endpoint": f"http://127.0.0.1:{fast_port}",
                "functions": [{"name": "bench", "spec": {"function_name": "bench"}}],
            },
        },
        {
            "apiVersion": "lambdagate.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "bench"},
            "spec": {
                "domains": ["*"],
                "routes": [
                    {
                        "matcher": {"prefix": "/"},
                        "destination": {"upstream": "bench-lambdas", "function": "bench"},
                    }
                ],
            },
        },
    ]
    (d / "bench.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return d


# --- wrk --------------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    threads: int
    connections: int
    duration_s: int
    requests: int
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> % of one core during the run

    @property
    def failed(self) -> bool:
        return self.non_2xx > 0 or any(self.socket_errors.values()) or self.requests == 0


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise BenchError(f"wrk printed a latency I cannot read: {text!r}")
    return round(float(m.group(1)) * _UNITS_MS[m.group(2)], 4)


def parse_wrk(out: str, threads: int, connections: int, duration: int) -> WrkResult:
    pct = {int(p): _ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)\s*$", out, re.MULTILINE)}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    reqs = re.search(r"^\s+(\d+) requests in", out, re.MULTILINE)
    if rps is None or reqs is None or len(pct) != 4:
        raise BenchError(f"could not parse wrk's output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = dict(
        zip(
            ("connect", "read", "write", "timeout"),
            (int(x) for x in errs.groups()) if errs else (0, 0, 0, 0),
            strict=True,
        )
    )
    return WrkResult(
        threads,
        connections,
        duration,
        int(reqs.group(1)),
        float(rps.group(1)),
        pct[50],
        pct[75],
        pct[90],
        pct[99],
        int(non2xx.group(1)) if non2xx else 0,
        socket_errors,
    )


def run_wrk(url: str, threads: int, connections: int, duration: int, watch: list[Proc]) -> WrkResult:
    before = {p.name: cpu_seconds(p.pid) for p in watch}
    t0 = time.monotonic()
    proc = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", url],
        check=False,
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    elapsed = time.monotonic() - t0
    if proc.returncode != 0:
        raise BenchError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    res = parse_wrk(proc.stdout, threads, connections, duration)
    res.cpu = {p.name: round(100 * (cpu_seconds(p.pid) - before[p.name]) / elapsed, 1) for p in watch}
    if res.failed:
        print(
            f"  !! wrk saw failures on {url}: non-2xx={res.non_2xx} socket errors={res.socket_errors}\n"
            f"{proc.stdout}",
            file=sys.stderr,
        )
    return res


# --- the benchmark ----------------------------------------------------------------------------------


@dataclass
class PathResult:
    key: str
    name: str
    check: str
    latency: WrkResult
    throughput: WrkResult
    warmup_failures: int

    @property
    def failed(self) -> bool:
        return self.latency.failed or self.throughput.failed or self.warmup_failures > 0


def start_envoy(procs: Procs, name: str, config: str, env: dict[str, str] | None = None) -> Proc:
    path = procs.workdir / f"{name}.yaml"
    path.write_text(config)
    # One worker: the gateway gets one core of the two, the other is left to wrk, the endpoint and ext_proc.
    return procs.start(
        name,
        [
            envoy_binary(),
            "-c",
            str(path),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--log-level",
            "warning",
        ],
        env,
    )


def start_fast_lambda(procs: Procs) -> int:
    """The stand-in Lambda endpoint every path is measured against; returns its port once it answers."""
    fast_port, fast_admin = free_port(), free_port()
    fast = start_envoy(procs, "envoy-fast-lambda", fast_lambda_config(fast_port, fast_admin), clean_env())
    # Unmarked, unsigned requests get its 403: answering at all is what "up" means here.
    wait_for("the fast Lambda endpoint", lambda: get(f"http://127.0.0.1:{fast_port}/").status == 403, [fast])
    return fast_port


def clean_env() -> dict[str, str]:
    # Paths (a) and (c) must not see AWS keys from the caller's shell; only (b) is given the fake ones.
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def verify(key: str, url: str, procs: list[Proc]) -> str:
    """Wait until the path answers, then check it answers what it should, before any load is put on it."""
    reply: Reply | None = None

    def answered() -> bool:
        nonlocal reply
        reply = get(url)
        if reply.status == 403:
            raise BenchError(
                f"path ({key}): the endpoint refused the request as not a signed Invoke "
                f"(the gateway did not sign or rewrite it): {reply.body[:200]!r}"
            )
        # (c) serves 404/503 until xDS has delivered the routes; keep asking until it answers for real.
        return reply.status == 200

    try:
        wait_for(f"path ({key}) to answer 200 on {url}", answered, procs, timeout=30)
    except BenchError as err:
        if reply is not None and reply.status not in (200, 403):
            raise BenchError(
                f"path ({key}) last answered {reply.status} {reply.body[:300]!r}\n{err}"
            ) from None
        raise
    assert reply is not None
    body = reply.body.decode("utf-8", "replace")
    if key in ("a", "d") and body != LAMBDA_BODY:
        raise BenchError(f"path (a) should pass the endpoint's JSON through unchanged, got {body!r}")
    if key == "c" and body != "ok":
        raise BenchError(f"path (c) should answer 'ok', got {reply.status} {body!r}")
    return f"200 {body!r}"


def measure(key: str, url: str, watch: list[Proc], duration: int, warmup: int) -> PathResult:
    check = verify(key, url, watch)
    print(f"({key}) {PATHS[key]}: verified {check}", file=sys.stderr)
    warm = run_wrk(url, 2, 16, warmup, [])
    print(f"({key}) warm-up {warmup}s: {warm.rps:.0f} req/s", file=sys.stderr)
    lat = run_wrk(url, 1, 1, duration, watch)
    print(f"({key}) 1 connection: p50 {lat.p50_ms:.3f} ms, p99 {lat.p99_ms:.3f} ms", file=sys.stderr)
    thr = run_wrk(url, 2, 16, duration, watch)
    print(f"({key}) 16 connections: {thr.rps:.0f} req/s, CPU {thr.cpu}", file=sys.stderr)
    warm_failures = warm.non_2xx + sum(warm.socket_errors.values())
    return PathResult(key, PATHS[key], check, lat, thr, warm_failures)


def bench_proxy(procs: Procs, fast_port: int, duration: int, warmup: int) -> PathResult:
    port, admin = free_port(), free_port()
    envoy = start_envoy(procs, "envoy-a-proxy", proxy_config(port, admin, fast_port), clean_env())
    try:
        return measure("a", f"http://127.0.0.1:{port}/", [envoy], duration, warmup)
    finally:
        procs.stop(envoy)


def bench_noop(procs: Procs, fast_port: int, duration: int, warmup: int, mode: str = "aio") -> PathResult:
    port, admin, extproc_port = free_port(), free_port(), free_port()
    noop = procs.start(
        "noop-extproc",
        [sys.executable, str(Path(__file__).with_name("noop_extproc.py")), str(extproc_port), mode],
        clean_env(),
    )
    envoy = start_envoy(
        procs, "envoy-d-noop", noop_extproc_config(port, admin, fast_port, extproc_port), clean_env()
    )
    try:
        return measure("d", f"http://127.0.0.1:{port}/", [envoy, noop], duration, warmup)
    finally:
        procs.stop(envoy)
        procs.stop(noop)


def bench_native(procs: Procs, fast_port: int, duration: int, warmup: int) -> PathResult:
    port, admin = free_port(), free_port()
    env = clean_env() | {
        "AWS_ACCESS_KEY_ID": FAKE_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET_KEY,
        # No EC2 here: keep the default chain from polling the instance metadata address.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    envoy = start_envoy(procs, "envoy-b-native", native_lambda_config(port, admin, fast_port), env)
    try:
        return measure("b", f"http://127.0.0.1:{port}/", [envoy], duration, warmup)
    finally:
        procs.stop(envoy)


def start_lambdagate(
    procs: Procs, config_dir: Path, workers: int = 0, recycle_after: int | None = None
) -> tuple[Proc, Proc, int]:
    """`lambdagate serve` in its own process (and GIL), as an operator runs it, and an Envoy bootstrapped to it.

    Returns (control plane, Envoy, Envoy's HTTP port). `recycle_after`: `--extproc-recycle-after` (None: its default).
    """
    port, admin, grpc_port = free_port(), free_port(), free_port()
    cp = procs.start(
        "lambdagate-serve",
        [
            sys.executable,
            "-m",
            "controlplane.cli",
            "--log-level",
            "warning",
            "serve",
            "--config-dir",
            str(config_dir),
            "--grpc-address",
            f"127.0.0.1:{grpc_port}",
            "--listen-address",
            "127.0.0.1",
            "--listen-port",
            str(port),
            *(["--extproc-workers", str(workers)] if workers else []),
            *(["--extproc-recycle-after", str(recycle_after)] if recycle_after is not None else []),
        ],
        clean_env(),
    )

    def grpc_up() -> bool:
        with socket.create_connection(("127.0.0.1", grpc_port), timeout=0.5):
            return True

    try:
        wait_for("lambdagate's gRPC port", grpc_up, [cp])
        envoy = start_envoy(
            procs, "envoy-c-lambdagate", bootstrap_yaml(xds_port=grpc_port, admin_port=admin), clean_env()
        )
    except BaseException:
        procs.stop(cp)
        raise
    return cp, envoy, port


def bench_lambdagate(
    procs: Procs, fast_port: int, duration: int, warmup: int, workers: int = 0
) -> PathResult:
    config = procs.workdir / f"lambdagate-config-{workers}"
    config.mkdir()
    cp, envoy, port = start_lambdagate(procs, lambdagate_config_dir(config, fast_port), workers)
    try:
        return measure("c", f"http://127.0.0.1:{port}/", [envoy, cp], duration, warmup)
    finally:
        procs.stop(envoy)
        procs.stop(cp)


# --- report -----------------------------------------------------------------------------------------


def _cpu_text(r: WrkResult) -> str:
    names = {
        "envoy-a-proxy": "Envoy",
        "envoy-b-native": "Envoy",
        "envoy-c-lambdagate": "Envoy",
        "envoy-d-noop": "Envoy",
        "lambdagate-serve": "lambdagate",
        "noop-extproc": "do-nothing ext_proc",
    }
    return ", ".join(f"{names.get(k, k)} {v:.0f}%" for k, v in r.cpu.items())


def table(results: dict[str, PathResult]) -> str:
    lines = [
        "| Path | p50 latency, 1 conn (ms) | p99 latency, 1 conn (ms) | req/s, 16 conns | CPU at 16 conns (% of a core) |",
        "|---|---:|---:|---:|---|",
    ]
    for key, r in results.items():
        flag = " **FAILED**" if r.failed else ""
        lines.append(
            f"| ({key}) {r.name}{flag} | {r.latency.p50_ms:.3f} | {r.latency.p99_ms:.3f} | "
            f"{r.throughput.rps:,.0f} | {_cpu_text(r.throughput)} |"
        )
    return "\n".join(lines)


def worker_table(curve: dict[int, PathResult], native: PathResult | None) -> str:
    """Path (c) with N ext_proc worker processes: throughput, latency, and CPU of the control plane + workers."""
    base = curve.get(min(curve))
    lines = [
        "| ext_proc workers | req/s, 16 conns | vs fewest workers | vs (b) native | p50, 1 conn (ms) | CPU (% of a core) |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for n, r in sorted(curve.items()):
        vs_base = f"{r.throughput.rps / base.throughput.rps:.2f}x" if base and base.throughput.rps else "-"
        vs_native = f"{100 * r.throughput.rps / native.throughput.rps:.0f}%" if native else "-"
        lines.append(
            f"| {n} | {r.throughput.rps:,.0f} | {vs_base} | {vs_native} | {r.latency.p50_ms:.3f} | "
            f"{_cpu_text(r.throughput)} |"
        )
    return "\n".join(lines)


def ratios(results: dict[str, PathResult]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for new, base in (("c", "b"), ("b", "a"), ("c", "a"), ("c", "d"), ("d", "a")):
        if new in results and base in results:
            n, b = results[new], results[base]
            out[f"{new}_vs_{base}"] = {
                "added_p50_ms": round(n.latency.p50_ms - b.latency.p50_ms, 3),
                "added_p99_ms": round(n.latency.p99_ms - b.latency.p99_ms, 3),
                "throughput_pct": round(100 * n.throughput.rps / b.throughput.rps, 1)
                if b.throughput.rps
                else 0.0,
            }
    return out


def ratio_lines(rs: dict[str, dict[str, float]]) -> str:
    words = {
        "c_vs_b": "(c) lambdagate vs (b) native filter",
        "b_vs_a": "(b) native filter vs (a) plain proxy",
        "c_vs_a": "(c) lambdagate vs (a) plain proxy",
        "c_vs_d": "(c) lambdagate vs (d) do-nothing Python ext_proc: lambdagate's own work",
        "d_vs_a": "(d) do-nothing Python ext_proc vs (a) plain proxy: gRPC in Python alone",
    }
    return "\n".join(
        f"- {words[k]}: {v['added_p50_ms']:+.3f} ms at p50 ({v['added_p99_ms']:+.3f} ms at p99), "
        f"throughput {v['throughput_pct']:.1f}%"
        for k, v in rs.items()
    )


def machine() -> dict[str, Any]:
    # wrk -v exits non-zero after printing its version; only the text matters.
    wrk_version = subprocess.run(["wrk", "-v"], check=False, capture_output=True, text=True).stdout
    envoy_version = subprocess.run(
        [envoy_binary(), "--version"], check=False, capture_output=True, text=True
    ).stdout
    envoy_match = re.search(r"/(\d+\.\d+\.\d+)/", envoy_version)
    wrk_match = re.search(r"wrk (\S+)", wrk_version)
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "envoy": envoy_match.group(1) if envoy_match else envoy_version,
        "wrk": wrk_match.group(1) if wrk_match else wrk_version,
    }


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


# --- entry point ------------------------------------------------------------------------------------


def _raise_on_term(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so the finally blocks stop every server.
    raise KeyboardInterrupt


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lambdagate-bench-"))
    try:
        yield d
    finally:
        if keep:
            print(f"logs and configs kept in {d}", file=sys.stderr)
        else:
            shutil.rmtree(d, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--duration", type=int, default=10, help="seconds per measured wrk run (default 10)")
    p.add_argument("--quick", action="store_true", help="3 s runs and 1 s warm-ups")
    p.add_argument(
        "--warmup", type=int, default=None, help="seconds of warm-up per path (default 3, quick 1)"
    )
    p.add_argument("--paths", default="abcd", help="which paths to run, e.g. 'bc' (default abcd)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the numbers here")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder of configs and logs")
    p.add_argument(
        "--workers",
        default="",
        metavar="N,N,...",
        help="also run path (c) with this many ext_proc worker processes each (e.g. 1,2,4): the worker curve",
    )
    p.add_argument(
        "--noop-server",
        choices=["aio", "sync"],
        default="aio",
        help="path (d)'s do-nothing processor: grpc.aio (default, as lambdagate) or grpcio's synchronous server",
    )
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed; install it with: apt-get install wrk", file=sys.stderr)
        return 2
    duration = 3 if args.quick else args.duration
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    keys = [k for k in "abcd" if k in args.paths]
    signal.signal(signal.SIGTERM, _raise_on_term)

    info = machine()
    # Anything else running steals from the same two cores; say so rather than publish skewed numbers silently.
    info["loadavg_before"] = round(os.getloadavg()[0], 2)
    if info["loadavg_before"] > 0.5:
        print(
            f"warning: 1-minute load average is {info['loadavg_before']} before starting; other work on this "
            f"machine will skew the numbers",
            file=sys.stderr,
        )
    results: dict[str, PathResult] = {}
    curve: dict[int, PathResult] = {}
    error: str | None = None
    with workspace(args.keep) as workdir:
        procs = Procs(workdir)
        try:
            fast_port = start_fast_lambda(procs)
            runners = {"a": bench_proxy, "b": bench_native, "c": bench_lambdagate}
            for key in keys:
                if key == "d":
                    results[key] = bench_noop(procs, fast_port, duration, warmup, args.noop_server)
                else:
                    results[key] = runners[key](procs, fast_port, duration, warmup)
            for n in [int(x) for x in args.workers.split(",") if x.strip()]:
                curve[n] = bench_lambdagate(procs, fast_port, duration, warmup, workers=n)
        except BenchError as err:
            error = str(err)
        finally:
            procs.stop_all()

    rs = ratios(results)
    print()
    print(
        f"Machine: {info['cpus']} cores ({info['cpu_model']}), Envoy {info['envoy']}, wrk {info['wrk']}, "
        f"Python {info['python']}. Everything shares those cores: each gateway Envoy runs --concurrency 1, "
        f"the stand-in Lambda endpoint is another Envoy (--concurrency 1), wrk runs on the same machine and, "
        f"for (c), so does lambdagate's control plane (one Python process). "
        f"1-minute load average before starting: {info['loadavg_before']}."
    )
    print(
        f"Latency: wrk -t1 -c1 -d{duration}s --latency. Throughput: wrk -t2 -c16 -d{duration}s. "
        f"Warm-up: wrk -t2 -c16 -d{warmup}s per path, not counted."
    )
    print()
    print(table(results) if results else "(no path was measured)")
    print()
    print(ratio_lines(rs))
    if curve:
        print()
        print(worker_table(curve, results.get("b")))
    failed = [r for r in [*results.values(), *curve.values()] if r.failed]
    for r in failed:
        print(
            f"\nFAILED ({r.key}): non-2xx {r.latency.non_2xx}+{r.throughput.non_2xx}, socket errors "
            f"{r.latency.socket_errors} / {r.throughput.socket_errors}, warm-up failures {r.warmup_failures}"
        )
    if error:
        print(f"\nERROR: {error}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "duration_s": duration,
                    "warmup_s": warmup,
                    "paths": {k: asdict(v) | {"failed": v.failed} for k, v in results.items()},
                    "ratios": rs,
                    "workers": {str(n): asdict(v) | {"failed": v.failed} for n, v in curve.items()},
                    "error": error,
                    "ok": not failed and error is None and len(results) == len(keys),
                },
                indent=2,
            )
            + "\n"
        )
    return 1 if failed or error else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
