"""The keep-warm scheduler against our local Lambda endpoint (signatures checked), with handlers that record the
warm-up events they get. Parallelism is shown without timing: a round's handlers meet at a barrier, which only
opens when all `concurrency` calls are in flight together."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import LoopThread, free_port, serve_local_lambda, wait_until

from controlplane.aws.roles import RoleCache
from controlplane.aws.signing import DefaultChain
from controlplane.locallambda import LocalLambda
from controlplane.model.resources import (
    AwsCredentials,
    Config,
    Endpoint,
    Function,
    KeepWarm,
    Secret,
    Upstream,
)
from controlplane.sources.files import FileSource
from controlplane.warm import WARMUP_SOURCE, needs_default_chain, warm_targets
from controlplane.warm import KeepWarm as Scheduler

AKID = "AKIDKEEPWARMTEST"
SECRET = "keep-warm-test-secret"
WRONG = "not-the-keep-warm-secret"

HANDLERS = """
import json
import threading

RECORD = {record!r}
_lock = threading.Lock()
_barriers = {{}}


def _record(name, event, parties):
    if parties > 1:
        with _lock:
            barrier = _barriers.setdefault(name, threading.Barrier(parties, timeout=8))
        barrier.wait()  # opens only when the round's calls all run at once
    with _lock, open(RECORD, "a") as f:
        f.write(json.dumps({{"fn": name, "event": event}}) + "\\n")
    if event.get("source") == "lambdagate.keep-warm":
        return
    return {{"statusCode": 200, "body": "hello"}}


def trio(event, context):
    return _record("trio", event, 3)


def a(event, context):
    return _record("a", event, 1)


def b(event, context):
    return _record("b", event, 1)


def boom(event, context):
    raise ValueError("this handler does not expect a warm-up")
"""

FUNCTIONS_YAML = """
functions:
- {name: trio, handler: app.trio, timeout: 10}
- {name: a, handler: app.a, timeout: 10}
- {name: b, handler: app.b, timeout: 10}
- {name: boom, handler: app.boom, timeout: 10}
"""


@pytest.fixture(scope="module")
def record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keep_warm_record") / "events.jsonl"


@pytest.fixture(scope="module")
def server(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory, record: Path
) -> Iterator[LocalLambda]:
    folder = tmp_path_factory.mktemp("keep_warm_functions")
    (folder / "app.py").write_text(textwrap.dedent(HANDLERS.format(record=str(record))), encoding="utf-8")
    (folder / "functions.yaml").write_text(FUNCTIONS_YAML, encoding="utf-8")
    yield from serve_local_lambda(loop_thread, folder, {AKID: SECRET})


@pytest.fixture
def scheduler(loop_thread: LoopThread) -> Iterator[Scheduler]:
    warm = Scheduler(DefaultChain(), RoleCache())
    try:
        yield warm
    finally:
        loop_thread.run(warm.stop())


def events(record: Path, fn: str) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    lines = [json.loads(line) for line in record.read_text().splitlines() if line.strip()]
    return [line["event"] for line in lines if line["fn"] == fn]


def upstream(
    server: LocalLambda | None,
    functions: list[Function],
    *,
    name: str = "up",
    secret_ref: str | None = "aws",
    port: int | None = None,
) -> Upstream:
    return Upstream(
        name=name,
        namespace="default",
        region="us-east-1",
        secret_ref=secret_ref,
        endpoint=Endpoint("http", "127.0.0.1", port if port is not None else server.port),  # type: ignore[union-attr]
        functions=tuple(functions),
    )


def config(*upstreams: Upstream) -> Config:
    return Config(
        upstreams=upstreams,
        secrets=(
            Secret("aws", "default", AwsCredentials(AKID, SECRET)),
            Secret("wrong", "default", AwsCredentials(AKID, WRONG)),
        ),
    )


def warm(fn: str, interval_s: float, concurrency: int = 1, name: str | None = None) -> Function:
    return Function(name or fn, fn, None, KeepWarm(interval_s, concurrency))


def apply(loop_thread: LoopThread, scheduler: Scheduler, cfg: Config) -> None:
    async def update() -> None:
        scheduler.update(cfg)

    loop_thread.run(update())


def test_each_round_is_concurrency_parallel_calls_with_the_warmup_event(
    loop_thread: LoopThread, server: LocalLambda, scheduler: Scheduler, record: Path
) -> None:
    apply(loop_thread, scheduler, config(upstream(server, [warm("trio", 0.2, 3), Function("plain", "a")])))
    # Counted once the calls return, a moment after the handlers recorded them.
    wait_until(lambda: scheduler.stats.warmed >= 9, 20, what="three rounds of three")
    got = events(record, "trio")
    for e in got:
        assert e == {
            "source": WARMUP_SOURCE,
            "detail-type": "Scheduled Event",
            "lambdagate": {
                "warmup": True,
                "function": "trio",
                "upstream": "default/up",
                "index": e["lambdagate"]["index"],
                "concurrency": 3,
            },
        }
    # The barrier lets a round through only whole, so the records come in rounds: indexes 0, 1, 2 each.
    rounds = [got[i : i + 3] for i in range(0, len(got) - len(got) % 3, 3)]
    assert all(sorted(e["lambdagate"]["index"] for e in r) == [0, 1, 2] for r in rounds)
    assert scheduler.stats.failed == 0
    assert scheduler.stats.warmed >= 9 and scheduler.stats.by_function["default/up trio"] >= 9
    # A function without keep_warm is never called.
    assert events(record, "a") == []
    assert list(scheduler.targets) == [("default/up", "trio")]


def test_removed_functions_stop_and_interval_changes_take_effect(
    loop_thread: LoopThread, server: LocalLambda, scheduler: Scheduler, record: Path
) -> None:
    apply(loop_thread, scheduler, config(upstream(server, [warm("a", 3600), warm("b", 0.1)])))
    wait_until(
        lambda: len(events(record, "a")) == 1 and len(events(record, "b")) >= 3, 20, what="a once, b often"
    )

    # b removed, a every 0.1 s instead of every hour; the same config again changes nothing.
    cfg = config(upstream(server, [warm("a", 0.1)]))
    apply(loop_thread, scheduler, cfg)
    apply(loop_thread, scheduler, cfg)
    b_then = len(events(record, "b"))
    wait_until(lambda: len(events(record, "a")) >= 6, 20, what="a at its new interval")
    # At most a call already under way when b was removed lands afterwards.
    assert len(events(record, "b")) <= b_then + 1
    assert list(scheduler.targets) == [("default/up", "a")]

    # Everything removed: nothing more is called.
    apply(loop_thread, scheduler, config())
    a_then = len(events(record, "a"))
    loop_thread.run(asyncio.sleep(0.5))
    assert len(events(record, "a")) <= a_then + 1
    assert scheduler.targets == {}


def test_failures_are_counted_and_logged_without_secrets_and_others_go_on(
    loop_thread: LoopThread,
    server: LocalLambda,
    scheduler: Scheduler,
    record: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="lambdagate")
    closed = free_port()
    cfg = config(
        upstream(server, [warm("boom", 0.1, 2), warm("missing", 0.1), warm("b", 0.1)]),
        upstream(server, [warm("a", 0.1, name="signed-wrong")], name="wrong", secret_ref="wrong"),
        upstream(None, [warm("a", 0.1, name="nobody-home")], name="closed", port=closed),
    )
    b_before = len(events(record, "b"))
    apply(loop_thread, scheduler, cfg)
    wait_until(
        lambda: all(
            s in caplog.text
            for s in (
                "default/up function boom (boom): 2 of 2 call(s) failed: 2 x 200 ValueError",
                "default/up function missing (missing): 1 of 1 call(s) failed: 1 x 404 ResourceNotFoundException",
                "default/wrong function signed-wrong (a): 1 of 1 call(s) failed: 1 x 403 InvalidSignatureException",
                "default/closed function nobody-home (a): 1 of 1 call(s) failed: 1 x no answer (ConnectionRefusedError)",
            )
        ),
        20,
        what="every kind of failure logged",
    )
    # The healthy function is warmed all along.
    wait_until(lambda: len(events(record, "b")) >= b_before + 3, 10)
    wait_until(lambda: scheduler.stats.warmed >= 3, 10)
    assert scheduler.stats.failed >= 5
    assert "this handler does not expect" not in caplog.text  # error types only, never messages
    for secret in (SECRET, WRONG):
        assert secret not in caplog.text


def test_default_chain_credentials_and_none_at_all(
    loop_thread: LoopThread,
    server: LocalLambda,
    record: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chain = DefaultChain()
    warmer = Scheduler(chain, RoleCache())
    cfg = config(upstream(server, [warm("b", 0.1, name="by-chain")], secret_ref=None))
    assert needs_default_chain(cfg)
    try:
        # The chain has nothing yet: counted and logged, nothing sent.
        apply(loop_thread, warmer, cfg)
        wait_until(lambda: "no AWS credentials" in caplog.text, 10)
        assert warmer.stats.warmed == 0 and warmer.stats.failed >= 1
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", AKID)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        assert chain.load()
        wait_until(lambda: warmer.stats.warmed >= 2, 10, what="warm-ups signed with the chain's keys")
        assert events(record, "b")[-1]["lambdagate"]["function"] == "by-chain"
    finally:
        loop_thread.run(warmer.stop())


def test_targets_come_from_the_upstreams_spec(tmp_path: Path) -> None:
    (tmp_path / "api.yaml").write_text("""
apiVersion: v1
kind: Secret
metadata: {name: aws, namespace: shop}
stringData: {access_key: AKIDSHOP, secret_key: shop-secret}
---
apiVersion: lambdagate.io/v1
kind: Upstream
metadata: {name: lambdas, namespace: shop}
spec:
  region: eu-west-1
  secret_ref: aws
  endpoint: local
  functions:
  - name: orders
    spec: {function_name: orders-fn, qualifier: live}
    keep_warm: {interval: 5m, concurrency: 2}
  - name: users
    spec: {function_name: users-fn}
""")
    local = Endpoint("http", "127.0.0.1", 9001)
    result = FileSource(tmp_path, local_endpoint=local).load()
    assert not result.rejected, result.rejected
    targets = warm_targets(result.config)
    assert list(targets) == [("shop/lambdas", "orders")]
    t = targets[("shop/lambdas", "orders")]
    assert (t.function_name, t.qualifier, t.interval_s, t.concurrency) == ("orders-fn", "live", 300.0, 2)
    assert (t.region, t.endpoint, t.role_arn) == ("eu-west-1", local, None)
    assert t.credentials == AwsCredentials("AKIDSHOP", "shop-secret")
    assert "shop-secret" not in repr(t)
    assert not needs_default_chain(result.config)
