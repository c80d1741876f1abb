"""The control plane at scale: 1,000 Upstreams and 10,000 routes through `lambdagate serve` to a real Envoy.

`python benchmarks/scale.py` generates the config folder, starts `lambdagate serve` (its own process, as an
operator runs it) and an Envoy bootstrapped to it, and prints:

- cold start: from the control plane starting to load the folder until Envoy has ACKed clusters, listener and
  routes, split into read+parse, resolve, translate, snapshot (serialize + hash), ext_proc's route table and
  push -> ACK;
- one Upstream changed (`--edits` times, one file written each time): from the write until Envoy ACKs the new
  routes, p50 and max, split the same way plus the file watcher's delay;
- the control plane's RSS after the load and after the edits (and its peak).

The phases come from the control plane's own log (`--log-level debug`: the "configuration applied" line carries
the phase timings, the ADS server logs every send and ACK). `--profile DIR` attaches py-spy to the control plane
for the cold start and for the edits and prints where the time went (timings are then inflated).
No timing is asserted anywhere; the script exits 1 only if something does not work (a NACK, a timeout, a
request that Envoy does not route).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (the sibling script's process helpers and the stand-in endpoint)
import yaml  # noqa: E402

from controlplane.bootstrap import bootstrap_yaml  # noqa: E402

SECRET = "scale-aws"
# The phases of the "configuration applied" log line, in the order they run.
PHASES = ("parse", "resolve", "translate", "snapshot", "ext_proc")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) (\w+) ([\w.]+): (.*)$")
APPLIED = re.compile(r"configuration applied: .*; versions (\S+); ([\d.]+) ms \((.*)\)$")
ACKED = re.compile(r"Envoy \S+ ACKed (\w+) version (\w+), ([\d.]+) ms after that snapshot was set")
NACKED = re.compile(r"Envoy \S+ rejected (\w+) version")
ROUTE_SHORT = "RouteConfiguration"
SENT = re.compile(r"sent (\w+) version (\w+) to \S+: (\d+) resource\(s\), (\d+) bytes")


# --- the configuration ------------------------------------------------------------------------------


def endpoint_host(index: int) -> str:
    """Endpoint k on its own loopback address: 127.0.0.1 (the stand-in) for k = 0, then 127.0.0.2, ..."""
    k = index + 1
    return f"127.{k >> 16 & 255}.{k >> 8 & 255}.{k & 255}"


def upstream_doc(
    k: int, functions: int, port: int, endpoints: int, qualifier: str | None = None
) -> dict[str, Any]:
    fns: list[dict[str, Any]] = []
    for j in range(functions):
        spec: dict[str, Any] = {"function_name": f"svc-{k:04d}-fn-{j}"}
        if j == 0 and qualifier:
            spec["qualifier"] = qualifier
        fns.append({"name": f"f{j}", "spec": spec})
    return {
        "apiVersion": "lambdagate.io/v1",
        "kind": "Upstream",
        "metadata": {"name": f"up-{k:04d}"},
        "spec": {
            "region": "us-east-1",
            "secret_ref": SECRET,
            "endpoint": f"http://{endpoint_host(k % endpoints)}:{port}",
            "functions": fns,
        },
    }


def route_path(v: int, i: int, matchers: str = "mixed") -> tuple[dict[str, Any], str]:
    """A third each of path templates (GET), exact paths (POST) and prefixes; distinct in every service, so nothing
    is shared that a real configuration would not share. Returns the matcher and a path that it matches.
    `matchers="prefix"`: prefixes only (no regex, no method), to see what regexes cost Envoy."""
    base = f"/s{v}/r{i}"
    if matchers == "prefix":
        return {"prefix": base + "/"}, base + "/anything"
    if i % 3 == 0:
        return {"path": base + "/items/{id}", "methods": ["GET"]}, base + "/items/42"
    if i % 3 == 1:
        return {"path": base + "/items", "methods": ["POST"]}, base + "/items"
    return {"prefix": base + "/"}, base + "/anything"


def generate(
    root: Path,
    *,
    upstreams: int,
    services: int,
    routes: int,
    port: int,
    endpoints: int,
    matchers: str = "mixed",
) -> dict[str, Any]:
    """One file per object: a Secret, `upstreams` Upstreams with routes/upstreams functions each, and `services`
    VirtualServices (own domain each) whose routes take the functions in order, each function one route."""
    functions = routes // upstreams
    per_service = routes // services
    (root / "upstreams").mkdir(parents=True)
    (root / "virtualservices").mkdir()
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET},
        "stringData": {"access_key": bench.FAKE_ACCESS_KEY, "secret_key": bench.FAKE_SECRET_KEY},
    }
    (root / "secret.yaml").write_text(yaml.safe_dump(secret, sort_keys=False))
    for k in range(upstreams):
        doc = upstream_doc(k, functions, port, endpoints)
        (root / "upstreams" / f"up-{k:04d}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    where: dict[tuple[int, int], tuple[str, str]] = {}  # (upstream, function) -> (host, path)
    for v in range(services):
        items = []
        for i in range(per_service):
            n = v * per_service + i
            k, j = divmod(n, functions)
            matcher, path = route_path(v, i, matchers)
            items.append(
                {"matcher": matcher, "destination": {"upstream": f"up-{k:04d}", "function": f"f{j}"}}
            )
            where[(k, j)] = (f"api-{v:04d}.example.com", path)
        doc = {
            "apiVersion": "lambdagate.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": f"api-{v:04d}"},
            "spec": {"domains": [f"api-{v:04d}.example.com"], "routes": items},
        }
        (root / "virtualservices" / f"api-{v:04d}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return {"functions_per_upstream": functions, "routes_per_service": per_service, "where": where}


# --- the control plane's log ------------------------------------------------------------------------


@dataclass
class Line:
    at: float  # epoch seconds (the log's millisecond resolution)
    level: str
    logger: str
    text: str


class LogReader:
    """Reads the control plane's log as it grows; the run waits on lines rather than polling Envoy."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = ""
        self.lines: list[Line] = []

    def poll(self) -> list[Line]:
        with open(self.path, encoding="utf-8", errors="replace") as f:
            f.seek(self.offset)
            data = f.read()
            self.offset = f.tell()
        text = self.partial + data
        parts = text.split("\n")
        self.partial = parts.pop()
        new = []
        for raw in parts:
            m = LOG_LINE.match(raw)
            if m is None:
                continue
            stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            new.append(Line(stamp, m.group(2), m.group(3), m.group(4)))
        self.lines.extend(new)
        return new

    def wait(self, what: str, found: Any, procs: list[bench.Proc], timeout: float = 60) -> Any:
        """Poll every 2 ms until `found(line)` returns something for a line not seen before."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.poll():
                if NACKED.search(line.text):
                    raise bench.BenchError(f"Envoy rejected a configuration: {line.text}")
                hit = found(line)
                if hit is not None:
                    return hit
            for p in procs:
                if not p.alive():
                    raise bench.BenchError(f"{p.name} exited while waiting for {what}:\n{p.log_tail()}")
            time.sleep(0.002)
        raise bench.BenchError(f"timed out waiting for {what}\n{procs[0].log_tail()}")


@dataclass
class Applied:
    at: float
    versions: dict[str, str]
    total_ms: float
    phases: dict[str, float]


def parse_applied(line: Line) -> Applied | None:
    m = APPLIED.search(line.text)
    if m is None:
        return None
    versions = dict(part.split("=", 1) for part in m.group(1).split(","))
    phases = {}
    for part in m.group(3).split(", "):
        name, value = part.rsplit(" ", 1)
        phases[name] = float(value)
    return Applied(line.at, versions, float(m.group(2)), phases)


# --- measurements -----------------------------------------------------------------------------------


def rss_mb(pid: int) -> dict[str, float]:
    out = {}
    with contextlib.suppress(OSError):
        for row in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = row.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) / 1024
    return out


def envoy_stats(admin: int, pattern: str) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/stats?filter={pattern}", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for row in text.splitlines():
        key, _, value = row.partition(": ")
        out[key] = value.strip().strip('"')
    return out


def request(port: int, host: str, path: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


class Profiler:
    """py-spy attached to the control plane for one stretch of the run (raw, collapsed stacks)."""

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        found = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if found is None:
            raise bench.BenchError("py-spy is not installed (pip install py-spy)")
        argv = [found, "record", "--pid", str(pid), "--rate", "250", "--format", "raw", "--nonblocking"]
        self.popen = subprocess.Popen(
            [*argv, "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(0.5)  # attached before the stretch begins

    def stop(self) -> list[str]:
        self.popen.send_signal(signal.SIGINT)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        return summarize_profile(self.out)


def summarize_profile(path: Path, top: int = 18) -> list[str]:
    """Inclusive and self sample counts per function from py-spy's raw output (`frame;frame;... count`)."""
    if not path.exists():
        return [f"(no profile written to {path})"]
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for row in path.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_short_frame(f) for f in stack.split(";")[1:]]  # the first entry names the thread
        total += n
        for f in set(frames):
            inclusive[f] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        return ["(no samples)"]
    lines = [f"{total} samples; inclusive % / self % per function (event loop and thread plumbing left out):"]
    ranked = [(f, n) for f, n in inclusive.most_common() if not any(g in f for g in GENERIC_FRAMES)]
    for f, n in ranked[:top]:
        lines.append(f"  {100 * n / total:5.1f}  {100 * own[f] / total:5.1f}  {f}")
    lines.append("top self:")
    for f, n in own.most_common(10):
        lines.append(f"  {100 * n / total:5.1f}  {f}")
    return lines


# Frames every stack passes through: the event loop, threads, runpy, the CLI's entry.
GENERIC_FRAMES = ("asyncio/", "threading.py", "concurrent/", "<frozen", "(cli.py)", "FileSource.watch")


def _short_frame(frame: str) -> str:
    # "translate (controlplane/translate/envoy.py:600)" -> "translate (translate/envoy.py)"
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if m is None:
        return frame
    where = m.group(2)
    for marker in ("site-packages/", "controlplane/", "lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    return f"{m.group(1)} ({where})"


@dataclass
class EditResult:
    total_ms: float
    watcher_ms: float
    phases: dict[str, float]
    applied_ms: float
    push_ack_ms: float
    rds_bytes: int = 0


@dataclass
class Report:
    config: dict[str, Any] = field(default_factory=dict)
    cold: dict[str, float] = field(default_factory=dict)
    edits: list[EditResult] = field(default_factory=list)
    rss: dict[str, dict[str, float]] = field(default_factory=dict)
    envoy: dict[str, Any] = field(default_factory=dict)
    profiles: dict[str, list[str]] = field(default_factory=dict)


def edit_acked(line: Line, *, state: dict[str, Any], last_rds: str) -> bool | None:
    """For one edit: note the watcher's line and the applied line, and stop at the ACK of the new routes."""
    if line.text.startswith("reloading ") and "event" not in state:
        state["event"] = line.at
    a = parse_applied(line)
    if a is not None:
        state["applied"] = a
    m = ACKED.search(line.text)
    if m and m.group(1) == ROUTE_SHORT and m.group(2) != last_rds and "applied" in state:
        if m.group(2) == state["applied"].versions.get(ROUTE_SHORT):
            state["ack"] = (line.at, float(m.group(3)), m.group(2))
            return True
    return None


def start_control_plane(
    procs: bench.Procs, config_dir: Path, grpc_port: int, http_port: int, profile: bool
) -> bench.Proc:
    args = [
        "--log-level", "debug", "serve", "--config-dir", str(config_dir),
        "--grpc-address", f"127.0.0.1:{grpc_port}", "--listen-address", "127.0.0.1",
        "--listen-port", str(http_port),
    ]  # fmt: skip
    if profile:
        # Wait for a go file before starting, so that py-spy is attached before the load begins.
        go = procs.workdir / "go"
        prelude = (
            "import os, runpy, sys, time\n"
            f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
            "sys.argv = ['lambdagate', *sys.argv[1:]]\n"
            "runpy.run_module('controlplane.cli', run_name='__main__', alter_sys=True)\n"
        )
        argv = [sys.executable, "-c", prelude, *args]
    else:
        argv = [sys.executable, "-m", "controlplane.cli", *args]
    return procs.start("lambdagate-serve", argv, bench.clean_env())


def run(args: argparse.Namespace, work: Path) -> Report:
    report = Report()
    procs = bench.Procs(work)
    try:
        fast, fast_admin = bench.free_port(), bench.free_port()
        fast_envoy = bench.start_envoy(procs, "fast-lambda", bench.fast_lambda_config(fast, fast_admin))
        config_dir = work / "config"
        t = time.monotonic()
        layout = generate(
            config_dir,
            upstreams=args.upstreams,
            services=args.virtual_services,
            routes=args.routes,
            port=fast,
            endpoints=args.endpoints,
            matchers=args.matchers,
        )
        files = sum(1 for _ in config_dir.rglob("*.yaml"))
        size = sum(p.stat().st_size for p in config_dir.rglob("*.yaml"))
        report.config = {
            "upstreams": args.upstreams,
            "virtual_services": args.virtual_services,
            "routes": args.routes,
            "functions_per_upstream": layout["functions_per_upstream"],
            "routes_per_service": layout["routes_per_service"],
            "endpoints": args.endpoints,
            "files": files,
            "bytes": size,
        }
        print(
            f"generated {files} files ({size / 1e6:.1f} MB) in {time.monotonic() - t:.1f} s: "
            f"{args.upstreams} Upstreams x {layout['functions_per_upstream']} functions, "
            f"{args.virtual_services} VirtualServices x {layout['routes_per_service']} routes, "
            f"{args.endpoints} endpoints",
            file=sys.stderr,
        )
        grpc_port, http_port, admin = bench.free_port(), bench.free_port(), bench.free_port()
        log = LogReader(work / "lambdagate-serve.log")
        cp = start_control_plane(procs, config_dir, grpc_port, http_port, bool(args.profile))
        profiler = None
        if args.profile:
            time.sleep(0.3)
            profiler = Profiler(cp.pid, args.profile / "cold.txt")
            (work / "go").touch()
        spawned = time.time()

        def grpc_up() -> bool:
            with socket.create_connection(("127.0.0.1", grpc_port), timeout=0.5):
                return True

        bench.wait_for("lambdagate's gRPC port", grpc_up, [cp], timeout=60)
        envoy = bench.start_envoy(
            procs, "envoy-gateway", bootstrap_yaml(xds_port=grpc_port, admin_port=admin), bench.clean_env()
        )
        watch = [cp, envoy, fast_envoy]
        applied: Applied = log.wait("the configuration to be applied", parse_applied, watch)
        need = {t.rsplit(".", 1)[-1]: v for t, v in applied.versions.items()}
        acked: dict[str, float] = {}
        ack_at: dict[str, float] = {}

        def all_acked(line: Line) -> bool | None:
            m = ACKED.search(line.text)
            if m and need.get(m.group(1)) == m.group(2):
                acked[m.group(1)] = float(m.group(3))
                ack_at[m.group(1)] = line.at
            return True if set(acked) >= set(need) else None

        log.wait("Envoy to ACK the configuration", all_acked, watch)
        by_text = [(line.text, line.at) for line in log.lines]
        listening = next(at for text, at in by_text if text.startswith("xDS and ext_proc listening"))
        loading = next(at for text, at in by_text if text.startswith("loading "))
        connected = next(at for text, at in by_text if " connected" in text and text.startswith("Envoy "))
        push_ack = max(acked.values())
        report.cold = {
            "process_start_to_listening_ms": 1000 * (listening - spawned),
            "envoy_connected_after_load_start_ms": 1000 * (connected - loading),
            **{f"{k}_ms": applied.phases.get(k, 0.0) for k in PHASES},
            "applied_ms": applied.total_ms,
            "push_ack_ms": push_ack,
            # From starting to read the folder until the last of clusters, listener and routes is ACKed.
            "total_ms": 1000 * (max(ack_at.values()) - loading),
            "process_start_to_acked_ms": 1000 * (max(ack_at.values()) - spawned),
            **{f"ack_{k}_ms": v for k, v in acked.items()},
        }
        sent = [SENT.search(text) for text, _ in by_text]
        rds_sizes = [int(m.group(4)) for m in sent if m and m.group(1) == "RouteConfiguration"]
        cds_sizes = [int(m.group(4)) for m in sent if m and m.group(1) == "Cluster"]
        report.envoy["rds_bytes"] = rds_sizes[-1] if rds_sizes else 0
        report.envoy["cds_bytes"] = cds_sizes[-1] if cds_sizes else 0
        if profiler is not None:
            report.profiles["cold start"] = profiler.stop()
        time.sleep(1.0)  # let the first requests' and Envoy's work settle before reading memory
        report.rss["after load"] = rss_mb(cp.pid)

        where: dict[tuple[int, int], tuple[str, str]] = layout["where"]
        host, path = where[(args.edit_upstream, 0)]
        method = "GET" if "/items/42" in path else ("POST" if path.endswith("/items") else "GET")
        status, body = request(http_port, host, path, method)
        if status != 200 or body != b"ok":
            raise bench.BenchError(f"{method} {host}{path} answered {status} {body[:200]!r}, expected 200 ok")

        # --- one Upstream, changed again and again ---
        target = config_dir / "upstreams" / f"up-{args.edit_upstream:04d}.yaml"
        functions = layout["functions_per_upstream"]
        if args.profile:
            profiler = Profiler(cp.pid, args.profile / "edits.txt")
        last_rds = need["RouteConfiguration"]
        for i in range(args.edits):
            text = yaml.safe_dump(
                upstream_doc(args.edit_upstream, functions, fast, args.endpoints, qualifier=f"v{i + 1}"),
                sort_keys=False,
            )
            log.poll()
            seen = len(log.lines)
            written = time.time()
            target.write_text(text)
            state: dict[str, Any] = {}
            found = functools.partial(edit_acked, state=state, last_rds=last_rds)
            log.wait(f"edit {i + 1} to be ACKed", found, watch, timeout=30)
            ack_at_s, push_ms, last_rds = state["ack"]
            a = state["applied"]
            sizes = [
                int(m.group(4))
                for line in log.lines[seen:]
                if (m := SENT.search(line.text)) and m.group(1) == "RouteConfiguration"
            ]
            report.edits.append(
                EditResult(
                    total_ms=1000 * (ack_at_s - written),
                    watcher_ms=1000 * (state.get("event", a.at) - written),
                    phases={k: a.phases.get(k, 0.0) for k in PHASES},
                    applied_ms=a.total_ms,
                    push_ack_ms=push_ms,
                    rds_bytes=sizes[-1] if sizes else 0,
                )
            )
            time.sleep(args.pause)
        if profiler is not None:
            report.profiles["one Upstream changed"] = profiler.stop()
        time.sleep(1.0)
        report.rss["after edits"] = rss_mb(cp.pid)

        # Envoy holds the last version and still routes the edited Upstream's function.
        stats = envoy_stats(admin, "rds.lambdagate_routes|cluster_manager.active_clusters|cds.update_success")
        report.envoy.update(stats)
        durations = envoy_stats(admin, "update_duration")
        report.envoy.update(durations)
        version = stats.get("http.lambdagate.rds.lambdagate_routes.version_text", "")
        if version != last_rds:
            raise bench.BenchError(
                f"Envoy holds routes {version!r}, the control plane last sent {last_rds!r}"
            )
        status, body = request(http_port, host, path, method)
        if status != 200 or body != b"ok":
            raise bench.BenchError(f"after the edits {method} {host}{path} answered {status} {body[:200]!r}")
        report.rss["envoy"] = rss_mb(envoy.pid)
    finally:
        procs.stop_all()
    return report


# --- report -----------------------------------------------------------------------------------------


def histogram(text: str) -> dict[str, float]:
    """Envoy's histogram summary `P50(interval,cumulative) ...` as {"P50": cumulative, ...}."""
    out = {}
    for name, _interval, cumulative in re.findall(r"(P[\d.]+)\(([^,]*),([^)]*)\)", text):
        with contextlib.suppress(ValueError):
            out[name] = float(cumulative)
    return out


def _p50(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def table(report: Report) -> str:
    c, e = report.cold, report.edits
    rows = [("file watcher (write -> reload starts)", None, [x.watcher_ms for x in e])]
    names = {
        "parse": "read + parse (YAML, model)",
        "resolve": "resolve references",
        "translate": "translate to Envoy protos",
        "snapshot": "snapshot (serialize + hash)",
        "ext_proc": "ext_proc route table",
    }
    for k in PHASES:
        rows.append((names[k], c.get(f"{k}_ms"), [x.phases[k] for x in e]))
    rows.append(("push -> Envoy ACK", c.get("push_ack_ms"), [x.push_ack_ms for x in e]))
    rows.append(
        ("**total** (target: cold < 1,000, change < 100)", c.get("total_ms"), [x.total_ms for x in e])
    )
    out = [
        "| Phase (ms) | Cold start | One Upstream changed, p50 | max |",
        "|---|---:|---:|---:|",
    ]
    for name, cold, edits in rows:
        cold_text = "—" if cold is None else f"{cold:,.1f}"
        out.append(f"| {name} | {cold_text} | {_p50(edits):,.1f} | {max(edits, default=0):,.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--upstreams", type=int, default=1000)
    ap.add_argument("--routes", type=int, default=10_000, help="routes in all (one per function)")
    ap.add_argument(
        "--virtual-services",
        type=int,
        default=1000,
        help="VirtualServices the routes are spread over (default 1000: ten routes each)",
    )
    ap.add_argument(
        "--endpoints",
        type=int,
        default=1,
        help="distinct Lambda endpoints, i.e. clusters (default 1: every Upstream of one region shares AWS's regional "
        "endpoint; 1000: one each)",
    )
    ap.add_argument(
        "--matchers",
        choices=("mixed", "prefix"),
        default="mixed",
        help="mixed: a third each of templates (GET), exact paths (POST), prefixes; prefix: prefixes only",
    )
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument(
        "--edit-upstream", type=int, default=0, help="which Upstream the edits change (default 0)"
    )
    ap.add_argument("--pause", type=float, default=0.3, help="seconds between edits (default 0.3)")
    ap.add_argument(
        "--profile", type=Path, default=None, metavar="DIR", help="py-spy the control plane into DIR"
    )
    ap.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every number here")
    ap.add_argument("--keep", action="store_true", help="keep the generated folder and the logs")
    args = ap.parse_args(argv)
    if args.routes % args.upstreams or args.routes % args.virtual_services:
        ap.error("--routes must be a multiple of --upstreams and of --virtual-services")
    if not 0 <= args.edit_upstream < args.upstreams or not 0 < args.endpoints <= 65000:
        ap.error("--edit-upstream must name an Upstream; --endpoints at most 65000")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, bench._raise_on_term)
    load = os.getloadavg()[0]
    print(
        f"{platform.python_implementation()} {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {load:.2f}" + (" (busy: numbers will be skewed)" if load > 0.5 else ""),
        file=sys.stderr,
    )
    try:
        with bench.workspace(args.keep) as work:
            report = run(args, work)
    except bench.BenchError as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    c = report.config
    print(
        f"\n{c['upstreams']:,} Upstreams, {c['routes']:,} routes ({c['virtual_services']:,} VirtualServices x "
        f"{c['routes_per_service']:,}), {c['endpoints']:,} endpoints = clusters; {c['files']:,} files, "
        f"{c['bytes'] / 1e6:.1f} MB; RouteConfiguration {report.envoy.get('rds_bytes', 0) / 1e6:.2f} MB, "
        f"clusters {report.envoy.get('cds_bytes', 0) / 1e6:.2f} MB\n"
    )
    print(table(report))
    cold = report.cold
    print(
        f"\ncold start: process start -> gRPC listening {cold['process_start_to_listening_ms']:,.0f} ms; "
        f"Envoy connected {cold['envoy_connected_after_load_start_ms']:,.0f} ms after the load began; "
        f"process start -> all ACKed {cold['process_start_to_acked_ms']:,.0f} ms"
    )
    print(
        f"edit: RouteConfiguration sent per change {_p50([x.rds_bytes for x in report.edits]) / 1e6:.2f} MB"
    )
    rds = histogram(report.envoy.get("http.lambdagate.rds.lambdagate_routes.update_duration", ""))
    cds = histogram(report.envoy.get("cluster_manager.cds.update_duration", ""))
    if rds:
        print(
            f"Envoy's own update_duration: routes p50 {rds.get('P50', 0):.0f} ms, max {rds.get('P100', 0):.0f} ms "
            f"(all {int(report.envoy.get('http.lambdagate.rds.lambdagate_routes.update_success', 0))} updates, "
            f"the cold one included); clusters {cds.get('P100', 0):.0f} ms"
        )
    for when, values in report.rss.items():
        name = "Envoy RSS" if when == "envoy" else f"control plane RSS {when}"
        print(f"{name}: {values.get('VmRSS', 0):.0f} MB (peak {values.get('VmHWM', 0):.0f} MB)")
    for name, lines in report.profiles.items():
        print(f"\npy-spy, {name}:")
        print("\n".join(lines))
    if args.json:
        data = {
            "config": c,
            "cold": cold,
            "edits": [vars(x) for x in report.edits],
            "rss_mb": report.rss,
            "envoy": report.envoy,
            "machine": bench.machine(),
        }
        args.json.write_text(json.dumps(data, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
