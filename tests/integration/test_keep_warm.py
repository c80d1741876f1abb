"""keep_warm in the running gateway: the control plane warms a function (every second, two at once) through our
local Lambda endpoint (signatures checked), while requests through Envoy reach the same function as usual."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

from harness import LoopThread, gateway, http, wait_until

AKID = "AKIDWARMGATEWAY"
SECRET = "warm-gateway-secret"

HANDLER = """
import json
import threading

RECORD = {record!r}
_lock = threading.Lock()
# A round's two warm-up calls meet here: it opens only if both are in flight at once.
_pair = threading.Barrier(2, timeout=8)


def handler(event, context):
    warmup = event.get("source") == "lambdagate.keep-warm"
    if warmup:
        _pair.wait()
    with _lock, open(RECORD, "a") as f:
        f.write(json.dumps({{"warmup": warmup, "event": event}}) + "\\n")
    if warmup:
        return
    return {{"statusCode": 200, "body": "hello " + event["path"]}}
"""

CONFIG = f"""
apiVersion: v1
kind: Secret
metadata: {{name: aws}}
stringData: {{access_key: {AKID}, secret_key: {SECRET}}}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {{name: shop}}
spec:
  region: us-east-1
  secret_ref: aws
  endpoint: local
  functions:
  - name: orders
    spec: {{function_name: orders}}
    keep_warm: {{interval: 1s, concurrency: 2}}
---
apiVersion: lambdagate.io/v1
kind: VirtualService
metadata: {{name: api}}
spec:
  routes:
  - matcher: {{prefix: /orders}}
    destination: {{upstream: shop, function: orders}}
"""


def records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_keep_warm_rounds_reach_the_function_while_it_serves(tmp_path: Path, loop_thread: LoopThread) -> None:
    record = tmp_path / "events.jsonl"
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "app.py").write_text(textwrap.dedent(HANDLER.format(record=str(record))))
    (functions / "functions.yaml").write_text(
        "functions:\n- {name: orders, handler: app.handler, timeout: 10}\n"
    )
    config = tmp_path / "config"
    config.mkdir()
    (config / "api.yaml").write_text(CONFIG)

    with gateway(loop_thread, config, functions, {AKID: SECRET}) as base:
        r = http("GET", base + "/orders/1")
        assert (r.status, r.body) == (200, b"hello /orders/1")

        def warmups() -> list[dict[str, Any]]:
            return [x["event"] for x in records(record) if x["warmup"]]

        wait_until(lambda: len(warmups()) >= 6, 30, what="three rounds of warm-ups")
        r = http("POST", base + "/orders", b'{"item": 1}')
        assert (r.status, r.body) == (200, b"hello /orders")

    got = warmups()
    for e in got:
        assert e == {
            "source": "lambdagate.keep-warm",
            "detail-type": "Scheduled Event",
            "lambdagate": {
                "warmup": True,
                "function": "orders",
                "upstream": "default/shop",
                "index": e["lambdagate"]["index"],
                "concurrency": 2,
            },
        }
    # Two per round, both in flight together (the barrier), so the records come in pairs: index 0 and 1.
    pairs = [got[i : i + 2] for i in range(0, len(got) - len(got) % 2, 2)]
    assert len(pairs) >= 3
    assert all(sorted(e["lambdagate"]["index"] for e in p) == [0, 1] for p in pairs)
    # The requests through Envoy were ordinary API Gateway events, answered as usual.
    served = [x["event"] for x in records(record) if not x["warmup"]]
    assert [e["path"] for e in served] == ["/orders/1", "/orders"]
