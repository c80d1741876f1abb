"""How long discovery takes to list a large account, and how many API calls it makes.

Starts the local Lambda endpoint in this process with `--functions` synthetic functions (each with versions
1-3 and aliases live -> 3, prev -> 2) and `--latency` seconds added to every read-API answer (0.1 models
AWS), then runs one full listing through `Lister.list_account` with the product's rate limit and
concurrency bound, and prints what it found, the calls it made, the time it took, the lower bounds that
time is expected to meet, and the size of the status record the listing would write.

    python benchmarks/discovery.py                      # 10,000 functions, 100 ms, 10 calls/s: ~18 min
    python benchmarks/discovery.py --functions 500      # a quick check
    python benchmarks/discovery.py --also-unlimited     # then again at 10,000 calls/s, concurrency 16
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python benchmarks/discovery.py`, this file's folder comes first on sys.path, where this very file
# would shadow the `discovery` package. Take it off and put the repository root first.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import concurrent.futures  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Coroutine  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

from controlplane.locallambda import LocalLambda  # noqa: E402
from controlplane.model.resources import AwsCredentials  # noqa: E402
from discovery.lister import (  # noqa: E402
    PAGE_SIZE,
    Account,
    DiscoveredFunction,
    Lister,
    ListingStats,
    default_client_factory,
)
from discovery.service import DEFAULT_CONCURRENCY, DEFAULT_RATE_PER_S  # noqa: E402
from discovery.worker import MAX_RECORD_BYTES, record_bytes, record_of  # noqa: E402

T = TypeVar("T")

REGION = "us-east-1"
# Keys the local endpoint checks SigV4 signatures against; not AWS keys.
ACCESS_KEY = "AKIDBENCHDISCOVERY00"
SECRET_KEY = "bench-discovery-secret-not-for-aws"
UNLIMITED_RATE = 10_000.0
UNLIMITED_CONCURRENCY = 16
VERSIONS_PER_FUNCTION = 3  # what LocalLambda's synthetic functions have
ALIASES_PER_FUNCTION = 2
PROGRESS_EVERY_S = 60.0


# --- the endpoint's loop --------------------------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a daemon thread, so the endpoint never competes with the lister's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="locallambda-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def cpu_seconds(self) -> float:
        """CPU time the loop's thread has used (Linux and macOS); NaN where it cannot be read."""
        ident = self.thread.ident
        if ident is None or not hasattr(time, "pthread_getcpuclockid"):
            return math.nan
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except OSError:
            return math.nan

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# --- counting the calls ---------------------------------------------------------------------------------


class CallCounter:
    """Every call the lister's client makes, by operation, and how many ran at once in the worker threads.

    The lister's own `max_in_flight` counts calls that hold its semaphore; this counts calls actually
    running in a thread (on the wire), which asyncio's default executor may cap lower.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.by_operation: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.running = 0
        self.max_running = 0

    def total(self) -> int:
        with self._lock:
            return sum(self.by_operation.values())

    def wrap(self, operation: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def call(**params: Any) -> Any:
            with self._lock:
                self.by_operation[operation] += 1
                self.running += 1
                self.max_running = max(self.max_running, self.running)
            try:
                return method(**params)
            except Exception as err:
                with self._lock:
                    self.errors[f"{operation}: {type(err).__name__}"] += 1
                raise
            finally:
                with self._lock:
                    self.running -= 1

        return call


class CountingClient:
    """A botocore client whose API methods count through a CallCounter (the lister calls them by name)."""

    def __init__(self, client: Any, counter: CallCounter) -> None:
        self._client = client
        self._counter = counter

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name.startswith("list_") or name.startswith("get_"):
            return self._counter.wrap(name, attr)
        return attr


def counting_factory(counter: CallCounter, concurrency: int) -> Callable[[Account], Any]:
    make = default_client_factory(max(10, concurrency))  # what Lister uses when given no factory

    def factory(account: Account) -> Any:
        return CountingClient(make(account), counter)

    return factory


def _progress(counter: CallCounter, expected: int, started: float, done: threading.Event) -> None:
    while not done.wait(PROGRESS_EVERY_S):
        calls = counter.total()
        elapsed = time.monotonic() - started
        print(
            f"  ... {elapsed:5.0f} s: {calls:,} of ~{expected:,} calls ({calls / elapsed:.1f}/s)",
            file=sys.stderr,
            flush=True,
        )


# --- one listing ----------------------------------------------------------------------------------------


@dataclass
class Result:
    functions: int
    latency_s: float
    rate_per_s: float
    concurrency: int
    executor_threads: int
    stats: ListingStats
    names: int
    by_operation: dict[str, int]
    errors: dict[str, int]
    max_running: int
    wall_s: float
    server_cpu_s: float
    process_cpu_s: float
    record_bytes: int

    @property
    def calls(self) -> int:
        return sum(self.by_operation.values())

    @property
    def pages(self) -> int:
        return self.by_operation.get("list_functions", 0)

    def bounds(self) -> dict[str, float]:
        """Lower bounds on the wall time: each alone would make the listing take at least this long."""
        return {
            "rate": self.calls / self.rate_per_s,
            "pages": self.pages * self.latency_s,
            "concurrency": self.calls * self.latency_s / min(self.concurrency, self.executor_threads),
        }


def expected_calls(functions: int) -> tuple[int, int]:
    """(ListFunctions pages, ListAliases calls) for the synthetic catalogue."""
    entries = functions * (1 + VERSIONS_PER_FUNCTION)  # $LATEST and each version, FunctionVersion=ALL
    return max(1, math.ceil(entries / PAGE_SIZE)), functions


def list_once(
    server: LocalLambda,
    loop: LoopThread,
    functions: int,
    latency_s: float,
    rate: float,
    concurrency: int,
) -> Result:
    server.latency_s = latency_s
    counter = CallCounter()
    lister = Lister(
        max_concurrency=concurrency, rate_per_s=rate, client_factory=counting_factory(counter, concurrency)
    )
    account = Account(REGION, server.url, AwsCredentials(ACCESS_KEY, SECRET_KEY))
    pages, aliases = expected_calls(functions)
    print(
        f"listing {functions:,} functions: latency {latency_s * 1000:g} ms, rate {rate:g}/s, "
        f"concurrency {concurrency} (~{pages + aliases:,} calls expected)",
        file=sys.stderr,
        flush=True,
    )

    done = threading.Event()
    wall_started = time.monotonic()
    reporter = threading.Thread(
        target=_progress, args=(counter, pages + aliases, wall_started, done), daemon=True
    )
    reporter.start()
    server_cpu, process_cpu = loop.cpu_seconds(), time.process_time()

    async def listing() -> tuple[list[DiscoveredFunction], ListingStats]:
        return await lister.list_account(account)

    try:
        entries, stats = asyncio.run(listing())
    finally:
        done.set()
    wall = time.monotonic() - wall_started
    server_cpu, process_cpu = loop.cpu_seconds() - server_cpu, time.process_time() - process_cpu
    reporter.join()

    size = record_bytes(record_of(entries))
    return Result(
        functions=functions,
        latency_s=latency_s,
        rate_per_s=rate,
        concurrency=concurrency,
        executor_threads=lister.executor._max_workers,
        stats=stats,
        names=len(entries),
        by_operation=dict(counter.by_operation),
        errors=dict(counter.errors),
        max_running=counter.max_running,
        wall_s=wall,
        server_cpu_s=server_cpu,
        process_cpu_s=process_cpu,
        record_bytes=size,
    )


def check(result: Result) -> list[str]:
    """What does not match the synthetic catalogue: every function, version, alias and call accounted for."""
    n = result.functions
    s = result.stats
    pages, alias_calls = expected_calls(n)
    problems = []
    found = (s.functions, s.versions, s.aliases, result.names)
    want = (
        n,
        n * VERSIONS_PER_FUNCTION,
        n * ALIASES_PER_FUNCTION,
        n * (1 + VERSIONS_PER_FUNCTION + ALIASES_PER_FUNCTION),
    )
    if found != want:
        problems.append(f"found (functions, versions, aliases, names) {found}, expected {want}")
    if s.skipped_invalid or s.skipped_deleted:
        problems.append(f"skipped {s.skipped_invalid} invalid and {s.skipped_deleted} deleted entries")
    if result.calls != s.api_calls:
        problems.append(f"the client made {result.calls} calls but the lister counted {s.api_calls}")
    if s.throttled == 0 and s.retried == 0:
        ops = result.by_operation
        if ops.get("list_functions") != pages or ops.get("list_aliases") != alias_calls:
            problems.append(f"calls {ops}, expected {pages} list_functions and {alias_calls} list_aliases")
    if result.errors:
        problems.append(f"errors: {result.errors}")
    return problems


# --- printing -------------------------------------------------------------------------------------------


def _operation(method: str) -> str:
    return "".join(part.capitalize() for part in method.split("_"))


def report(result: Result) -> str:
    s = result.stats
    bounds = result.bounds()
    bound = max(bounds.values())
    lines = [
        f"functions {s.functions:,}, versions {s.versions:,}, aliases {s.aliases:,}",
        f"routable names {result.names:,} (skipped: {s.skipped_invalid} invalid, {s.skipped_deleted} deleted)",
        f"API calls {result.calls:,}: "
        + ", ".join(f"{_operation(op)} {count:,}" for op, count in sorted(result.by_operation.items())),
        f"  lister's count {s.api_calls:,}, throttled {s.throttled}, retried {s.retried}",
        f"max in flight {s.max_in_flight} (holding the lister's semaphore), {result.max_running} running at once "
        f"in threads (the lister's executor has {result.executor_threads})",
        f"wall time {result.wall_s:.1f} s (lister's own {s.seconds:.1f} s), "
        f"{result.calls / result.wall_s:.2f} calls/s achieved",
        "lower bounds: "
        f"calls / rate = {result.calls:,} / {result.rate_per_s:g} = {bounds['rate']:.1f} s; "
        f"ListFunctions pages x latency = {result.pages} x {result.latency_s:g} = {bounds['pages']:.1f} s; "
        f"calls x latency / min(concurrency {result.concurrency}, executor threads {result.executor_threads}) "
        f"= {bounds['concurrency']:.1f} s",
        f"  wall time is {result.wall_s / bound:.2f}x the largest bound ({bound:.1f} s)"
        if bound > 0
        else "  (no bound: zero latency and unlimited rate)",
        f"CPU: endpoint loop thread {result.server_cpu_s:.1f} s "
        f"({result.server_cpu_s / max(1, result.calls) * 1000:.2f} ms per call), "
        f"whole process {result.process_cpu_s:.1f} s "
        f"({result.process_cpu_s / max(1, result.calls) * 1000:.2f} ms per call, "
        f"{result.process_cpu_s / result.wall_s * 100:.0f}% of one core)",
        f"status record {result.record_bytes:,} bytes, {result.record_bytes / MAX_RECORD_BYTES * 100:.1f}% "
        f"of the {MAX_RECORD_BYTES:,}-byte default cap"
        + (
            " (OVER THE CAP: the listing would be stored as TooLarge)"
            if result.record_bytes > MAX_RECORD_BYTES
            else ""
        ),
    ]
    return "\n".join(lines)


def table(results: list[Result]) -> str:
    rows = [
        "| Functions (names) | Latency | Rate | Concurrency | API calls (ListFunctions + ListAliases) "
        "| Throttled | Wall time | Calls/s | Lower bound | Status record |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        bound = max(r.bounds().values())
        rate = "unlimited" if r.rate_per_s >= UNLIMITED_RATE else f"{r.rate_per_s:g}/s"
        rows.append(
            f"| {r.functions:,} ({r.names:,}) | {r.latency_s * 1000:g} ms | {rate} | {_concurrency(r)} "
            f"| {r.calls:,} ({r.pages:,} + {r.by_operation.get('list_aliases', 0):,}) | {r.stats.throttled} "
            f"| {_duration(r.wall_s)} | {r.calls / r.wall_s:.1f} | {_duration(bound)} "
            f"| {r.record_bytes / 1024:,.0f} KiB of 1,024 |"
        )
    return "\n".join(rows)


def _concurrency(r: Result) -> str:
    if r.executor_threads < r.concurrency:
        return f"{r.concurrency} ({r.executor_threads} threads)"
    return str(r.concurrency)


def _duration(seconds: float) -> str:
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


# --- main -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--functions", type=int, default=10_000, help="synthetic functions (default 10000)")
    ap.add_argument("--latency", type=float, default=0.1, help="seconds per read call (default 0.1, as AWS)")
    ap.add_argument(
        "--rate", type=float, default=DEFAULT_RATE_PER_S, help=f"calls/s (default {DEFAULT_RATE_PER_S:g})"
    )
    ap.add_argument(
        "--concurrency", type=int, default=DEFAULT_CONCURRENCY, help=f"default {DEFAULT_CONCURRENCY}"
    )
    ap.add_argument(
        "--also-unlimited",
        action="store_true",
        help=f"then list again at {UNLIMITED_RATE:g} calls/s and concurrency {UNLIMITED_CONCURRENCY}",
    )
    args = ap.parse_args(argv)
    if args.functions < 1 or args.latency < 0 or args.rate <= 0 or args.concurrency < 1:
        ap.error("--functions, --rate and --concurrency must be positive and --latency not negative")

    runs = [(args.rate, args.concurrency)]
    if args.also_unlimited:
        runs.append((UNLIMITED_RATE, UNLIMITED_CONCURRENCY))

    print(
        f"{platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    results: list[Result] = []
    failed = False
    loop = LoopThread()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-discovery-") as folder:
            started = time.monotonic()
            server = LocalLambda(
                Path(folder), {ACCESS_KEY: SECRET_KEY}, region=REGION, synthetic=args.functions
            )
            loop.run(server.start())
            print(
                f"local endpoint {server.url} with {args.functions:,} synthetic functions, "
                f"started in {time.monotonic() - started:.1f} s",
                file=sys.stderr,
            )
            try:
                for rate, concurrency in runs:
                    result = list_once(server, loop, args.functions, args.latency, rate, concurrency)
                    results.append(result)
                    print()
                    print(
                        f"== {args.functions:,} functions, latency {args.latency * 1000:g} ms, "
                        f"rate {rate:g}/s, concurrency {concurrency}"
                    )
                    print(report(result))
                    problems = check(result)
                    for problem in problems:
                        print(f"CHECK FAILED: {problem}")
                    failed = failed or bool(problems)
                    sys.stdout.flush()
            finally:
                loop.run(server.stop())
    except concurrent.futures.TimeoutError:
        print("ERROR: the local endpoint did not start or stop in time", file=sys.stderr)
        return 1
    finally:
        loop.close()

    print()
    print(table(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
