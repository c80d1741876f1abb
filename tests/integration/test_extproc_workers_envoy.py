"""ext_proc worker processes behind a real Envoy: every worker serves, routes changes reach all of them before
Envoy routes with them, and the request path is the same as with one process."""

from __future__ import annotations

import re
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


def test_worn_workers_are_replaced_without_failing_requests(tmp_path: Path) -> None:
    """A worker replaced after 10 streams, on the same port, while requests keep coming: none fails."""
    loop_thread = LoopThread()
    functions, folder = lay_out(tmp_path, FUNCTIONS, CONFIG)
    try:
        with gateway_with_envoy(
            loop_thread,
            folder,
            functions,
            {"AKIDWORKERS": SECRET},
            extproc_workers=1,
            extproc_recycle_after=10,
        ) as (url, envoy):
            # The control plane checks every 5 s; 12 s of steady requests spans at least two replacements.
            deadline = time.monotonic() + 12
            statuses = []
            while time.monotonic() < deadline:
                statuses.append(http("GET", f"{url}/items/1").status)
                time.sleep(0.02)
            assert set(statuses) == {200}, statuses
            assert len(_streams_per_worker(envoy)) == 1
            # Each replacement ends the old worker's connection (GOAWAY); Envoy connects again, to the new one.
            connections = sum(
                int(line.rsplit("::", 1)[1])
                for line in envoy.admin("/clusters").splitlines()
                if line.startswith("lambdagate_extproc::") and "::cx_total::" in line
            )
            assert connections >= 3, connections
    finally:
        loop_thread.close()
