"""How long a change to the config folder takes to reach Envoy: edit a file, time until the new route answers.

Run `python benchmarks/reload.py [--edits 20]`; it prints p50 and max in milliseconds (the goal is under 2 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (the sibling script's process helpers)


def status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--edits", type=int, default=20)
    args = ap.parse_args(argv)
    with bench.workspace(False) as work:
        procs = bench.Procs(work)
        try:
            fast, fast_admin = bench.free_port(), bench.free_port()
            fast_envoy = bench.start_envoy(procs, "fast-lambda", bench.fast_lambda_config(fast, fast_admin))
            config_dir = bench.lambdagate_config_dir(work, fast)
            cp, envoy, port = bench.start_lambdagate(procs, config_dir)
            base = f"http://127.0.0.1:{port}"
            bench.wait_for("the first route", lambda: status(base + "/") == 200, [cp, envoy, fast_envoy])
            vs = config_dir / "bench.yaml"
            original = vs.read_text()
            times: list[float] = []
            for i in range(args.edits):
                path = f"/edit{i}"
                assert status(base + path) == 200  # the catch-all still serves it
                # Move the catch-all to /edit{i}/ only: the old path starts answering 404 once Envoy has it.
                vs.write_text(original.replace("prefix: /\n", f"prefix: {path}/\n"))
                start = time.monotonic()
                while status(base + path) != 404:
                    if time.monotonic() - start > 10:
                        raise bench.BenchError(f"edit {i} did not reach Envoy in 10 s")
                    time.sleep(0.002)
                times.append((time.monotonic() - start) * 1000)
                vs.write_text(original)
                bench.wait_for("the catch-all to come back", lambda: status(base + "/") == 200, [cp, envoy])
        finally:
            for p in reversed(list(procs.procs)):
                procs.stop(p)
    print(
        f"config edit -> Envoy serving it, over {len(times)} edits: "
        f"p50 {statistics.median(times):.0f} ms, max {max(times):.0f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
