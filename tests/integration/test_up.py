"""`lambdagate up` on the bundled petstore: real Envoy, our control plane, the local Lambda endpoint.

Exercises what a user does: curl the four routes, edit the VirtualService live, break it, stop with SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import free_port, http, wait_until

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "petstore"


def children(pid: int) -> set[int]:
    """All descendants of a process, from /proc."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and int(entry.name) not in out:
                out.add(int(entry.name))
                todo.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def petstore(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path, Path]]:
    config = tmp_path / "petstore"
    shutil.copytree(EXAMPLE, config, ignore=shutil.ignore_patterns("__pycache__"))
    port = free_port()
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlplane.cli",
                "up",
                "--config-dir",
                str(config),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        try:
            wait_until(
                lambda: proc.poll() is None and http("GET", f"http://127.0.0.1:{port}/pets").status == 200,
                60,
                what="lambdagate up to serve /pets",
            )
        except AssertionError as err:
            raise AssertionError(f"{err}\n{log_path.read_text()[-3000:]}") from None
        yield proc, port, config, log_path
    finally:
        # Find the children before the parent goes: afterwards they belong to init.
        kids = children(proc.pid)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in kids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_petstore_routes_live_edit_and_clean_stop(petstore) -> None:
    proc, port, config, log_path = petstore
    base = f"http://127.0.0.1:{port}"

    listing = http("GET", base + "/pets")
    assert listing.status == 200 and [p["name"] for p in listing.json()] == ["Rex", "Tom"]
    created = http(
        "POST",
        base + "/pets",
        json.dumps({"name": "Nemo", "tag": "fish"}).encode(),
        {"content-type": "application/json"},
    )
    assert created.status == 201 and created.json()["name"] == "Nemo"
    pet_id = created.json()["id"]
    got = http("GET", f"{base}/pets/{pet_id}")
    assert got.status == 200 and got.json() == {"id": pet_id, "name": "Nemo", "tag": "fish"}
    assert http("DELETE", f"{base}/pets/{pet_id}").status == 204
    assert http("GET", f"{base}/pets/{pet_id}").status == 404
    assert http("GET", base + "/pets?limit=1").json() == [{"id": "1", "name": "Rex", "tag": "dog"}]
    assert http("PUT", base + "/pets/1").status == 404  # no route for PUT

    # Editing the VirtualService re-routes without a restart: GET /pets now goes to get-pet... via a new path.
    vs_file = config / "petstore.yaml"
    original = vs_file.read_text()
    vs_file.write_text(
        original.replace(
            "- matcher: {path: /pets, methods: [GET]}", "- matcher: {path: /animals, methods: [GET]}"
        )
    )
    wait_until(lambda: http("GET", base + "/animals").status == 200, 5, what="new route /animals")
    assert http("GET", base + "/pets").status == 404

    # A broken edit is reported and the last good routes keep answering.
    vs_file.write_text(vs_file.read_text().replace("function: get-pet", "function: no-such-function"))
    wait_until(lambda: "no-such-function" in log_path.read_text(), 5, what="the rejection in the log")
    text = log_path.read_text()
    assert "petstore.yaml" in text and "VirtualService default/petstore" in text
    assert "spec.routes[2].destination.function" in text
    assert http("GET", base + "/pets/1").status == 200
    assert http("GET", base + "/animals").status == 200
    vs_file.write_text("kind: [broken yaml")
    wait_until(lambda: "invalid YAML" in log_path.read_text(), 5, what="the broken file to be reported")
    assert http("GET", base + "/pets/1").status == 200
    assert "local-petstore-secret-not-for-aws" not in log_path.read_text()

    kids = children(proc.pid)
    assert kids, "up runs Envoy as a child process"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    wait_until(lambda: not any(alive(pid) for pid in kids), 10, what="every child to stop")


def test_envoy_dies_with_a_killed_up(petstore) -> None:
    proc, *_ = petstore
    kids = children(proc.pid)
    assert kids
    proc.kill()  # no cleanup can run: the kernel's parent-death signal must still stop Envoy
    proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in kids), 10, what="Envoy to follow its parent")


def test_a_function_added_to_the_folder_becomes_routable(petstore) -> None:
    """Function discovery in `up`: a new handler is routable without touching the Upstream."""
    import time

    proc, port, config, log_path = petstore
    base = f"http://127.0.0.1:{port}"
    upstream_text = (config / "petstore.yaml").read_text().split("kind: VirtualService")[0]
    (config / "functions" / "hello.py").write_text(
        "def handler(event, context):\n"
        "    return {'statusCode': 200, 'body': 'hello from ' + context.function_name}\n"
    )
    with open(config / "functions" / "functions.yaml", "a") as f:
        f.write("- name: HelloFunction\n  handler: hello.handler\n  aliases: {live: $LATEST}\n")
    added = time.monotonic()
    # A route naming the discovered function, its alias included, in a VirtualService of its own.
    (config / "hello.yaml").write_text(
        "apiVersion: lambdagate.io/v1\nkind: VirtualService\nmetadata: {name: hello}\n"
        "spec:\n  domains: [hello.test]\n  routes:\n"
        "  - matcher: {path: /hello}\n"
        "    destination: {upstream: petstore-lambdas, function: HelloFunction}\n"
        "  - matcher: {path: /hello/live}\n"
        "    destination: {upstream: petstore-lambdas, function: 'HelloFunction:live'}\n"
    )
    headers = {"host": "hello.test"}
    wait_until(lambda: http("GET", base + "/hello", headers=headers).status == 200, 10, what="/hello")
    took = time.monotonic() - added
    assert http("GET", base + "/hello", headers=headers).body == b"hello from HelloFunction"
    assert http("GET", base + "/hello/live", headers=headers).status == 200
    assert took < 5, f"took {took:.1f} s"
    assert (config / "petstore.yaml").read_text().split("kind: VirtualService")[0] == upstream_text
    state = json.loads((config / ".lambdagate" / "discovery.json").read_text())
    found = state["upstreams"]["default/petstore-lambdas"]
    assert found["discovery"]["state"] == "Listed"
    assert {"function_name": "HelloFunction", "aliases": {"live": "$LATEST"}} in found["functions"]
    # The existing routes never stopped.
    assert http("GET", base + "/pets").status == 200

    # Removing it again: gone after one listing, and its routes with it.
    (config / "functions" / "functions.yaml").write_text(
        (config / "functions" / "functions.yaml").read_text().split("- name: HelloFunction")[0]
    )
    wait_until(
        lambda: "HelloFunction" not in (config / ".lambdagate" / "discovery.json").read_text(),
        10,
        what="the deleted function to leave the state file",
    )
    wait_until(lambda: http("GET", base + "/hello", headers=headers).status == 404, 10, what="/hello gone")
    assert http("GET", base + "/pets").status == 200
