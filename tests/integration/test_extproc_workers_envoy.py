"""ext_proc worker processes behind a real Envoy: every worker serves, routes changes reach all of them before
Envoy routes with them, and the request path is the same as with one process."""

from __future__ import annotations

import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import Envoy, LoopThread, gateway_with_envoy, http, lay_out, wait_until

SECRET = "workers-secret-value"
FUNCTIONS = {
    "echo": """
        import json

        def handler(event, context):
            return {"statusCode": 200, "body": json.dumps({"path": event["path"], "id": event["pathParameters"]})}
    """,
}
CONFIG = """
apiVersion: v1
kind: Secret
metadata: {name: aws}
stringData: {access_key: AKIDWORKERS, secret_key: workers-secret-value}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: fns}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  functions:
  - {name: echo, spec: {function_name: echo}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  routes:
  - matcher: {path: "/items/{id}"}
    destination: {upstream: fns, function: echo}
"""


def _streams_per_worker(envoy: Envoy) -> dict[str, int]:
    out = {}
    for line in envoy.admin("/clusters").splitlines():
        m = re.fullmatch(r"lambdagate_extproc::(127\.0\.0\.1:\d+)::rq_total::(\d+)", line.strip())
        if m:
            out[m.group(1)] = int(m.group(2))
    return out


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Envoy, object]]:
    loop_thread = LoopThread()
    tmp = tmp_path_factory.mktemp("workers")
    functions, folder = lay_out(tmp, FUNCTIONS, CONFIG)
    try:
        with gateway_with_envoy(
            loop_thread, folder, functions, {"AKIDWORKERS": SECRET}, extproc_workers=2
        ) as (
            url,
            envoy,
        ):
            yield url, envoy, folder
    finally:
        loop_thread.close()


def test_every_worker_serves(stack: tuple[str, Envoy, object]) -> None:
    url, envoy, _ = stack
    for i in range(20):
        r = http("GET", f"{url}/items/{i}")
        assert r.status == 200 and r.json() == {"path": f"/items/{i}", "id": {"id": str(i)}}
    streams = _streams_per_worker(envoy)
    assert len(streams) == 2, streams
    # Round robin over the two: each took a fair share of the 20 streams.
    assert all(n >= 5 for n in streams.values()), streams


def test_a_route_change_reaches_every_worker_before_envoy(stack: tuple[str, Envoy, object]) -> None:
    url, _, folder = stack
    config = folder / "api.yaml"  # type: ignore[operator]
    config.write_text(CONFIG.replace('"/items/{id}"', '"/things/{id}"'))
    wait_until(lambda: http("GET", f"{url}/things/1").status == 200, what="the new route")
    # From the moment Envoy routes it, no worker refuses it (a worker without the route would answer 502).
    statuses = {http("GET", f"{url}/things/{i}").status for i in range(20)}
    assert statuses == {200}
    config.write_text(CONFIG)
    wait_until(lambda: http("GET", f"{url}/items/1").status == 200, what="the route back")


def _extproc_children() -> set[int]:
    # The control plane runs in this process (a LoopThread), so its workers are this process's children.
    return {
        p.pid for p in multiprocessing.active_children() if p.name.startswith("lambdagate-extproc-") and p.pid
    }


def test_worn_workers_are_replaced_without_failing_requests(tmp_path: Path) -> None:
    """Under steady concurrent load, a worker replaced every 30 streams: each newcomer listens on a new port,
    Envoy's ext_proc cluster moves to it, and only then does the old one stop. No request fails."""
    before = _extproc_children()
    loop_thread = LoopThread()
    functions, folder = lay_out(tmp_path, FUNCTIONS, CONFIG)
    try:
        with gateway_with_envoy(
            loop_thread,
            folder,
            functions,
            {"AKIDWORKERS": SECRET},
            extproc_workers=1,
            extproc_recycle_after=30,
        ) as (url, envoy):
            done = threading.Event()
            answers: list[int | str] = []

            def load(k: int) -> None:
                i = 0
                while not done.is_set():
                    i += 1
                    try:
                        r = http("GET", f"{url}/items/{k}-{i}")
                        right = {"path": f"/items/{k}-{i}", "id": {"id": f"{k}-{i}"}}
                        answers.append(r.status if r.status != 200 or r.json() == right else "wrong body")
                    except Exception as err:  # noqa: BLE001 - a reset or refused connection is a failure too
                        answers.append(repr(err))

            threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
            for t in threads:
                t.start()
            # The control plane checks every 5 s; keep the load up until Envoy has seen three replacements.
            ports: list[set[str]] = []
            pids = set(_extproc_children()) - before
            deadline = time.monotonic() + 90
            try:
                while time.monotonic() < deadline and len(set().union(*ports)) < 4:
                    now = set(_streams_per_worker(envoy))
                    if now and (not ports or now != ports[-1]):
                        ports.append(now)
                    pids |= _extproc_children() - before
                    time.sleep(0.1)
                time.sleep(1)  # load on the newest worker too
            finally:
                done.set()
                for t in threads:
                    t.join(15)
            failed = [a for a in answers if a != 200]
            assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:10]}"
            seen = set().union(*ports)
            assert len(seen) >= 4, ports  # three replacements, each on a port of its own
            assert all(len(p) == 1 for p in ports), ports  # one worker: Envoy never balances onto two

            # The old workers exit once Envoy has moved off them; only the newest is left.
            def only_the_newest() -> set[int] | None:
                left = _extproc_children() - before
                return left if len(left) == 1 else None

            alive = wait_until(only_the_newest, timeout=30, what="the old workers to exit")
            assert len(pids) >= 4 and alive < pids, (pids, alive)
    finally:
        loop_thread.close()


def test_a_dead_worker_is_replaced_and_envoy_moves_to_the_replacement(tmp_path: Path) -> None:
    """SIGKILL one of two workers: within a supervision round Envoy's ext_proc cluster lists a new port in its
    place, every request succeeds again on both, and a route added while the worker was dead is served."""
    before = _extproc_children()
    loop_thread = LoopThread()
    functions, folder = lay_out(tmp_path, FUNCTIONS, CONFIG)
    try:
        with gateway_with_envoy(
            loop_thread, folder, functions, {"AKIDWORKERS": SECRET}, extproc_workers=2
        ) as (
            url,
            envoy,
        ):
            assert http("GET", f"{url}/items/1").status == 200
            hosts = set(wait_until(lambda: _streams_per_worker(envoy) or None, what="the ext_proc hosts"))
            assert len(hosts) == 2
            victim = min(_extproc_children() - before)
            os.kill(victim, signal.SIGKILL)
            # A change while a worker is dead: held back until the replacement has it.
            (folder / "api.yaml").write_text(CONFIG.replace('"/items/{id}"', '"/things/{id}"'))

            def replaced() -> set[str] | None:
                now = set(_streams_per_worker(envoy))
                return now if len(now) == 2 and now != hosts else None

            now = wait_until(replaced, timeout=30, what="Envoy to move to the replacement")
            assert len(now & hosts) == 1  # the survivor stays; the dead one's port is gone
            wait_until(lambda: http("GET", f"{url}/things/7").status == 200, timeout=30, what="the new route")
            statuses = [http("GET", f"{url}/things/{i}").status for i in range(20)]  # round robin over both
            assert statuses == [200] * 20
            assert http("GET", f"{url}/items/1").status == 404
            served = _streams_per_worker(envoy)
            assert all(served[h] > 0 for h in now - hosts), served  # the replacement serves
            assert victim not in _extproc_children()
    finally:
        loop_thread.close()
