"""The discovery worker against our local Lambda endpoint, storing into the state file of a config folder.

Each test drives `run_once` by hand (no timers): what is listed, shared, filtered, written, kept and removed.
"""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import LoopThread, serve_local_lambda

from controlplane.locallambda import LocalLambda
from controlplane.model.discovered import FAILED, LISTED, TOO_LARGE
from controlplane.model.resources import Endpoint
from controlplane.sources.files import FileSource, state_path
from discovery.lister import Lister
from discovery.worker import DiscoveryWorker, FileStore

AKID = "AKIDWORKERTEST"
SECRET = "worker-test-secret-value"

APP = "def handler(event, context):\n    return event\n"

FUNCTIONS = """
functions:
- name: orders
  handler: app.handler
  tags: {team: shop}
  versions: {"1": app.handler, "2": app.handler}
  aliases: {live: "2"}
- {name: orders-admin, handler: app.handler, tags: {team: ops}}
- {name: users, handler: app.handler, tags: {team: core}}
"""


def config(endpoint: str, *, extra: str = "", orders_discovery: str = "{name_prefix: orders}") -> str:
    return (
        textwrap.dedent(f"""
        apiVersion: v1
        kind: Secret
        metadata: {{name: aws}}
        stringData: {{access_key: {AKID}, secret_key: {SECRET}}}
        ---
        apiVersion: lambdagate.io/v1
        kind: Upstream
        metadata: {{name: orders}}
        spec:
          region: us-east-1
          secret_ref: aws
          endpoint: {endpoint}
          discovery: {orders_discovery}
        ---
        apiVersion: lambdagate.io/v1
        kind: Upstream
        metadata: {{name: everything}}
        spec:
          region: us-east-1
          secret_ref: aws
          endpoint: {endpoint}
        ---
        apiVersion: lambdagate.io/v1
        kind: Upstream
        metadata: {{name: shop, namespace: teams}}
        spec:
          region: us-east-1
          secret_ref: aws
          endpoint: {endpoint}
          discovery: {{tags: {{team: shop}}}}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {{name: aws, namespace: teams}}
        stringData: {{access_key: {AKID}, secret_key: {SECRET}}}
        """)
        + extra
    )


class Setup:
    def __init__(self, folder: Path, functions: Path, server: LocalLambda) -> None:
        self.folder, self.functions, self.server = folder, functions, server
        self.source = FileSource(folder)
        self.worker = DiscoveryWorker(FileStore(folder), Lister(rate_per_s=1000))

    def write_config(self, text: str) -> None:
        (self.folder / "config.yaml").write_text(text, encoding="utf-8")
        result = self.source.load()
        assert [str(e) for e in result.errors] == []
        self.worker.update(result.config)

    def run(self) -> bool:
        return asyncio.run(self.worker.run_once())

    def state(self) -> dict[str, Any]:
        upstreams: dict[str, Any] = json.loads(state_path(self.folder).read_text())["upstreams"]
        return upstreams

    def names(self, key: str) -> list[str]:
        return [f["function_name"] for f in self.state()[key]["functions"]]


@pytest.fixture
def setup(loop_thread: LoopThread, tmp_path: Path) -> Iterator[Setup]:
    functions = tmp_path / "functions"
    functions.mkdir()
    (functions / "app.py").write_text(APP, encoding="utf-8")
    (functions / "functions.yaml").write_text(FUNCTIONS, encoding="utf-8")
    folder = tmp_path / "config"
    folder.mkdir()
    # rescan_s=0: tests change the folder and list right away.
    for server in serve_local_lambda(
        loop_thread, functions, {AKID: SECRET}, region="us-east-1", rescan_s=0.0
    ):
        s = Setup(folder, functions, server)
        s.write_config(config(server.url))
        yield s


def test_one_listing_per_account_filtered_per_upstream(setup: Setup) -> None:
    assert setup.run()
    state = setup.state()
    assert sorted(state) == ["default/everything", "default/orders", "teams/shop"]
    assert state["default/orders"] == {
        "discovery": {"state": LISTED, "functionCount": 2, "names": 5},
        "functions": [
            {"function_name": "orders", "versions": ["1", "2"], "aliases": {"live": "2"}},
            {"function_name": "orders-admin"},
        ],
    }
    assert setup.names("default/everything") == ["orders", "orders-admin", "users"]
    assert setup.names("teams/shop") == ["orders"]
    # Three Upstreams, one account (same endpoint, region and keys): one listing.
    (account,) = setup.worker.accounts.values()
    stats = account.last_stats
    assert stats is not None
    # One ListFunctions page (versions included), then ListTags and ListAliases for each of 3 functions.
    assert stats.api_calls == 1 + 3 + 3

    # The control plane reads the file and routes may name `orders:live`.
    upstream = {u.name: u for u in setup.source.load().config.upstreams}["orders"]
    assert upstream.function("orders:live") is not None
    assert upstream.function("users") is None


def test_writes_only_on_change_and_deleted_functions_go(setup: Setup) -> None:
    assert setup.run()
    path = state_path(setup.folder)
    before = path.stat().st_mtime_ns, path.read_bytes()
    os.utime(path, ns=(1, 1))
    assert setup.run()
    assert path.stat().st_mtime_ns == 1  # the same listing: nothing written
    assert path.read_bytes() == before[1]

    # A function deleted in AWS is gone after one clean listing.
    (setup.functions / "functions.yaml").write_text(
        FUNCTIONS.replace("- {name: users, handler: app.handler, tags: {team: core}}\n", ""), encoding="utf-8"
    )
    assert setup.run()
    assert setup.names("default/everything") == ["orders", "orders-admin"]


def test_failure_keeps_last_known_functions_and_says_why(setup: Setup) -> None:
    assert setup.run()
    setup.server.set_credentials({AKID: "rotated-elsewhere"})
    assert not setup.run()
    entry = setup.state()["default/everything"]
    assert entry["discovery"]["state"] == FAILED
    assert entry["discovery"]["reason"] == "InvalidSignatureException"
    assert "secret access key is wrong" in entry["discovery"]["message"]
    assert SECRET not in json.dumps(setup.state())
    assert [f["function_name"] for f in entry["functions"]] == ["orders", "orders-admin", "users"]
    # The control plane still routes to them.
    upstream = {u.name: u for u in setup.source.load().config.upstreams}["everything"]
    assert upstream.function("users") is not None

    setup.server.set_credentials({AKID: SECRET})
    assert setup.run()
    assert setup.state()["default/everything"]["discovery"]["state"] == LISTED


def test_too_large_keeps_last_known_and_says_how_to_narrow(setup: Setup) -> None:
    assert setup.run()
    setup.worker.max_record_bytes = 150
    assert setup.run()
    entry = setup.state()["default/everything"]
    assert entry["discovery"]["state"] == TOO_LARGE
    assert "spec.discovery.name_prefix" in entry["discovery"]["message"]
    assert [f["function_name"] for f in entry["functions"]] == ["orders", "orders-admin", "users"]
    assert setup.state()["teams/shop"]["discovery"]["state"] == LISTED  # small enough


def test_opt_out_and_deleted_upstreams_leave_the_state_file(setup: Setup) -> None:
    assert setup.run()
    setup.write_config(config(setup.server.url, orders_discovery="{enabled: false}"))
    assert setup.run()
    assert sorted(setup.state()) == ["default/everything", "teams/shop"]

    # An Upstream removed from the folder leaves the file too.
    text = config(setup.server.url, orders_discovery="{enabled: false}")
    setup.write_config(
        text.split("---\napiVersion: lambdagate.io/v1\nkind: Upstream\nmetadata: {name: shop")[0]
    )
    assert setup.run()
    assert sorted(setup.state()) == ["default/everything"]


def test_new_upstreams_are_due_at_once_others_wait_for_the_interval(setup: Setup) -> None:
    now = [1000.0]
    setup.worker.clock = lambda: now[0]
    setup.worker.interval_s = 300.0
    assert asyncio.run(setup.worker.run_once(only_due=True))
    listed = {a: s.last_stats for a, s in setup.worker.accounts.items()}
    assert all(stats is not None for stats in listed.values())
    (account,) = listed
    assert setup.worker.accounts[account].due == 1300.0

    now[0] = 1100.0
    rounds = setup.worker.rounds
    assert asyncio.run(setup.worker.run_once(only_due=True))
    assert setup.worker.accounts[account].last_stats is listed[account]  # not listed again
    assert setup.worker.rounds == rounds + 1

    # Changed filters make the account due now.
    setup.write_config(config(setup.server.url, orders_discovery="{name_prefix: users}"))
    assert setup.worker.accounts[account].due == 0.0
    assert asyncio.run(setup.worker.run_once(only_due=True))
    assert setup.names("default/orders") == ["users"]


def test_local_endpoint_accounts_use_the_short_interval(setup: Setup) -> None:
    local = Endpoint("http", "127.0.0.1", setup.server.port)
    source = FileSource(setup.folder, local_endpoint=local)
    (setup.folder / "config.yaml").write_text(config("local"), encoding="utf-8")
    now = [50.0]
    worker = DiscoveryWorker(FileStore(setup.folder), Lister(rate_per_s=1000), clock=lambda: now[0])
    worker.update(source.load().config)
    assert asyncio.run(worker.run_once())
    (state,) = worker.accounts.values()
    assert state.due == 50.0 + worker.local_interval_s
    assert json.loads(state_path(setup.folder).read_text())["upstreams"]["default/orders"]["functions"]


def test_run_loop_picks_up_a_new_function(setup: Setup, loop_thread: LoopThread) -> None:
    """The timer-driven loop: a function added to the endpoint shows up within the interval."""
    setup.worker.interval_s = 0.2
    stop = asyncio.Event()

    async def scenario() -> list[str]:
        task = asyncio.create_task(setup.worker.run(stop))
        try:
            await asyncio.sleep(0.3)
            (setup.functions / "functions.yaml").write_text(
                FUNCTIONS + "- {name: zebra, handler: app.handler}\n", encoding="utf-8"
            )
            for _ in range(100):
                await asyncio.sleep(0.05)
                if "zebra" in setup.names("default/everything"):
                    break
            return setup.names("default/everything")
        finally:
            stop.set()
            await task

    assert asyncio.run(scenario()) == ["orders", "orders-admin", "users", "zebra"]


def test_discover_once_cli(setup: Setup) -> None:
    """`lambdagate discover --once`: lists, writes the state file, exits 0; 1 when a listing failed."""
    import subprocess
    import sys

    (setup.folder / "config.yaml").write_text(config("local"), encoding="utf-8")
    argv = [sys.executable, "-m", "controlplane.cli", "discover", "--config-dir", str(setup.folder), "--once"]
    argv += ["--local-lambda-url", setup.server.url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert setup.names("default/everything") == ["orders", "orders-admin", "users"]
    assert "default/everything: discovery Listed: 3 function(s), 6 routable name(s)" in done.stderr

    setup.server.set_credentials({AKID: "rotated"})
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "InvalidSignatureException" in setup.state()["default/everything"]["discovery"]["reason"]
    assert SECRET not in done.stderr

    bad = subprocess.run(argv[:-2] + ["--interval", "soon"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a duration" in bad.stderr


@pytest.mark.parametrize(
    ("text", "seconds"), [("5m", 300.0), ("90s", 90.0), ("1h30m", 5400.0), ("300", 300.0), ("2.5s", 2.5)]
)
def test_durations(text: str, seconds: float) -> None:
    from discovery.service import parse_duration

    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "0s", "0.5s", "-1m"])
def test_bad_durations(text: str) -> None:
    from discovery.service import parse_duration

    with pytest.raises(ValueError):
        parse_duration(text)
