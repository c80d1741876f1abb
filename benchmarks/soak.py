"""Memory under steady load: lambdagate's ext_proc path driven for minutes, its RSS sampled as it goes.

`python benchmarks/soak.py [--minutes 10] [--connections 4] [--workers 0] [--recycle-after N]` starts the same
stand-in Lambda endpoint, `lambdagate serve` and Envoy as benchmarks/run.py's path (c), runs wrk for the whole
time, samples the resident memory of the control plane (and its ext_proc workers) every few seconds, and prints
the RSS at the start of the load (after a warm-up minute) and at the end (medians of the first and last minute),
its peak, the change in percent,
and wrk's count of non-2xx answers (with workers, `--recycle-after` makes their replacements frequent).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # noqa: E402
    Procs,
    children,
    lambdagate_config_dir,
    start_fast_lambda,
    start_lambdagate,
    verify,
    workspace,
)


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the ext_proc workers), in MB."""
    total = 0
    for p in (pid, *children(pid)):
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


def window_medians(samples: list[tuple[float, float]], window_s: float) -> tuple[float, float, float]:
    """The median RSS of the first and of the last `window_s` seconds of samples (at most a quarter of the run
    each, at least one sample each), and the window used."""
    first_t, last_t = samples[0][0], samples[-1][0]
    span = min(window_s, (last_t - first_t) / 4)
    head = [m for t, m in samples if t <= first_t + span] or [samples[0][1]]
    tail = [m for t, m in samples if t >= last_t - span] or [samples[-1][1]]
    return statistics.median(head), statistics.median(tail), span


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the measured load (default 10)")
    p.add_argument(
        "--warmup", type=float, default=60.0, help="seconds of load before the first sample counts"
    )
    p.add_argument("--connections", type=int, default=4, help="wrk connections (default 4)")
    p.add_argument("--workers", type=int, default=0, help="ext_proc worker processes (default 0: in-process)")
    p.add_argument("--every", type=float, default=5.0, help="seconds between RSS samples")
    p.add_argument(
        "--window",
        type=float,
        default=60.0,
        help="start and end are the median RSS of the first and last this many seconds of the measured load "
        "(a sample taken while a worker is being replaced, when two are alive, does not decide them)",
    )
    p.add_argument(
        "--recycle-after",
        type=int,
        default=None,
        help="replace a worker after this many streams (--extproc-recycle-after; default: lambdagate's)",
    )
    args = p.parse_args(argv)
    total_s = args.warmup + args.minutes * 60
    with workspace(False) as workdir:
        procs = Procs(workdir)
        try:
            fast_port = start_fast_lambda(procs)
            config = workdir / "soak-config"
            config.mkdir()
            cp, envoy, port = start_lambdagate(
                procs, lambdagate_config_dir(config, fast_port), args.workers, args.recycle_after
            )
            url = f"http://127.0.0.1:{port}/"
            verify("c", url, [cp, envoy])
            wrk = subprocess.Popen(
                ["wrk", "-t1", f"-c{args.connections}", f"-d{int(total_s)}s", url],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            samples: list[tuple[float, float]] = []
            t0 = time.monotonic()
            stop = threading.Event()
            while wrk.poll() is None and not stop.is_set():
                samples.append((time.monotonic() - t0, rss_mb(cp.pid)))
                time.sleep(args.every)
            out = wrk.communicate()[0]
        finally:
            procs.stop_all()
    counted = [(t, m) for t, m in samples if t >= args.warmup]
    if len(counted) < 2:
        print("too few samples; is wrk installed and did the load run?", file=sys.stderr)
        print(out)
        return 1
    start, end, span = window_medians(counted, args.window)
    peak = max(m for _, m in counted)
    change = 100 * (end - start) / start
    rps = next((line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec:")), "?")
    # wrk prints these lines only when there is something to count.
    non2xx = next(
        (line.strip() for line in out.splitlines() if "Non-2xx" in line), "Non-2xx or 3xx responses: 0"
    )
    socket_errors = next((line.strip() for line in out.splitlines() if "Socket errors" in line), "")
    print(
        f"load: wrk -t1 -c{args.connections} for {total_s:.0f} s ({args.warmup:.0f} s warm-up), {rps} req/s; {non2xx}"
        + (f"; {socket_errors}" if socket_errors else "")
    )
    recycle = "" if args.recycle_after is None else f", recycled after {args.recycle_after} streams"
    print(
        f"workers: {args.workers}{recycle}; machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}"
    )
    print()
    print(
        f"| control plane RSS (MB) | start (median of the first {span:.0f} s) | end (median of the last "
        f"{span:.0f} s) | peak | change |"
    )
    print("|---|---:|---:|---:|---:|")
    print(
        f"| lambdagate{' + workers' if args.workers else ''} | {start:.1f} | {end:.1f} | {peak:.1f} | {change:+.1f}% |"
    )
    print()
    print(
        "samples (s, MB): " + ", ".join(f"{t:.0f}:{m:.1f}" for t, m in counted[:: max(1, len(counted) // 12)])
    )
    return 0 if abs(change) <= 10 else 1


if __name__ == "__main__":
    sys.exit(main())
