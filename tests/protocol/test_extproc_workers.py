"""ext_proc worker processes: each serves the route tables the control plane sends, over real gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from harness import LoopThread, control_plane, free_port, wait_until
from test_extproc import CONFIG, attrs, headers

from controlplane.extproc.workers import ExtProcWorkers, WorkerError
from controlplane.model import parse_document, resolve
from controlplane.model.routes import RouteTarget
from controlplane.translate.envoy import EXTPROC_CLUSTER, TranslateOptions, translate
from controlplane.xds.cache import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, Snapshot


def _route_table() -> tuple[dict[str, RouteTarget], str]:
    objects = [parse_document(d) for d in yaml.safe_load_all(CONFIG)]
    res = resolve([o for o in objects if o is not None])
    assert not res.errors
    return translate(res.config, TranslateOptions()).route_table, "v1"


async def _one_request(port: int, route_name: str) -> pb.ProcessingResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        request = pb.ProcessingRequest(
            request_headers=headers(
                [(":method", "GET"), (":path", "/pets/7"), (":authority", "api.example.com")], True
            ),
            attributes=attrs(route_name),
        )
        call = stub.Process(iter([request]))
        async for response in call:
            return response
    raise AssertionError("no answer")


def test_workers_serve_the_route_tables_they_are_sent() -> None:
    async def scenario() -> None:
        workers = ExtProcWorkers(2)
        try:
            ports = await workers.start()
            assert len(set(ports)) == 2
            table, version = _route_table()
            (name,) = table
            # Before any table: every worker refuses the route (fail closed).
            for port in ports:
                refused = await _one_request(port, name)
                assert refused.immediate_response.status.code == 502
            await workers.update(table, version, default_chain=False)
            for port in ports:
                answer = await _one_request(port, name)
                mutation = answer.request_headers.response.header_mutation
                set_headers = {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}
                assert set_headers[":path"].startswith(
                    "/2015-03-31/functions/123456789012%3Afunction%3Aget-pet"
                )
                assert set_headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/")
                event = json.loads(answer.request_headers.response.body_mutation.body)
                assert event["pathParameters"] == {"petId": "7"}
            # Generations no Envoy uses are forgotten in every worker.
            await workers.update({}, "v2", default_chain=False)
            await workers.retain(set())
            for port in ports:
                assert (await _one_request(port, name)).immediate_response.status.code == 502
        finally:
            await workers.stop()
        assert workers.ports == []

    asyncio.run(scenario())


def test_a_worker_that_cannot_start_fails_the_start() -> None:
    async def scenario() -> None:
        workers = ExtProcWorkers(1, host="203.0.113.1")  # not an address of this machine
        try:
            with pytest.raises(Exception, match="worker 0"):
                await workers.start()
        finally:
            await workers.stop()

    asyncio.run(scenario())


def _serves(answer: pb.ProcessingResponse) -> bool:
    return bool(answer.request_headers.response.header_mutation.set_headers)


async def _refused(port: int, route_name: str) -> bool:
    try:
        await asyncio.wait_for(_one_request(port, route_name), 10)
    except grpc.aio.AioRpcError as err:
        return err.code() == grpc.StatusCode.UNAVAILABLE
    return False


async def _one_serving(workers: ExtProcWorkers) -> tuple[int, dict[str, RouteTarget], str]:
    """Start a single worker and install the test configuration's table: its port, the table, the version."""
    (port,) = await workers.start()
    table, version = _route_table()
    await workers.update(table, version, default_chain=False)
    return port, table, version


def test_a_worn_worker_is_replaced_on_a_new_port_and_the_old_one_serves_until_retired() -> None:
    async def scenario() -> None:
        workers = ExtProcWorkers(1, recycle_after=3)
        try:
            # Two generations an Envoy still routes with: a replacement must get both.
            port, table, version = await _one_serving(workers)
            ((name, target),) = table.items()
            await workers.retain({version})  # an Envoy holds it
            await workers.update(
                {"renamed": replace(target, route_name="renamed")}, "v2", default_chain=False
            )
            await workers.retain({version, "v2"})
            first = workers._procs[0]
            assert await workers.recycle_worn() == 0  # not worn yet
            for _ in range(3):
                await _one_request(port, name)
            assert await workers.recycle_worn() == 1
            (new_port,) = workers.ports
            assert new_port != port and workers.retiring == [port]
            assert workers._procs[0].pid != first.pid
            for route in (name, "renamed"):
                assert _serves(await _one_request(new_port, route)), route
            # The old worker serves on (Envoy may still send it streams) and still gets every change.
            await workers.update({"third": replace(target, route_name="third")}, "v3", default_chain=False)
            await workers.retain({version, "v2", "v3"})
            for p in (port, new_port):
                for route in (name, "renamed", "third"):
                    assert _serves(await _one_request(p, route)), (p, route)
            assert first.is_alive()
            # Told to retire, it goes: its process ends and its port refuses.
            assert await workers.retire() == 1
            assert not first.is_alive() and workers.retiring == []
            assert await _refused(port, name)
            assert _serves(await _one_request(new_port, name))
        finally:
            await workers.stop()

    asyncio.run(scenario())


def test_stop_ends_retiring_workers_too() -> None:
    async def scenario() -> None:
        workers = ExtProcWorkers(1, recycle_after=1)
        try:
            port, table, _ = await _one_serving(workers)
            (name,) = table
            await _one_request(port, name)
            old = workers._procs[0]
            assert await workers.recycle_worn() == 1
            new = workers._procs[0]
        finally:
            await workers.stop()
        assert not old.is_alive() and not new.is_alive()
        assert workers.ports == [] and workers.retiring == []

    asyncio.run(scenario())


def test_after_the_first_table_workers_are_sent_only_what_changed() -> None:
    async def scenario() -> None:
        workers = ExtProcWorkers(2)
        sent: list[tuple[object, ...]] = []
        real = workers._all

        async def spy(message: tuple[object, ...], what: str) -> bool:
            sent.append(message)
            return await real(message, what)

        workers._all = spy  # type: ignore[method-assign]
        try:
            ports = await workers.start()
            table, version = _route_table()
            ((name, target),) = table.items()
            await workers.update(table, version, default_chain=False)
            assert [m[0] for m in sent] == ["update"]
            # The same table again (the very same targets), same version: nothing to send.
            await workers.update(dict(table), version, default_chain=False)
            assert len(sent) == 1
            # An equal target that is another object is sent (RouteTarget's equality leaves param_functions out).
            table = {name: replace(target)}
            await workers.update(table, version, default_chain=False)
            assert len(sent) == 2 and sent[-1][0] == "delta" and list(sent[-1][1]) == [name]
            # A change: only the new entry and the removed name travel; every worker rebuilds the whole table.
            second = {
                "added": replace(target, route_name="added"),
                "kept": replace(target, route_name="kept"),
            }
            await workers.update({**table, **second}, "v2", default_chain=False)
            await workers.update(second, "v3", default_chain=False)
            kinds = [(m[0], sorted(m[1]), sorted(m[2])) for m in sent[2:]]
            assert kinds == [("delta", ["added", "kept"], []), ("delta", [], [name])]
            for port in ports:
                assert _serves(await _one_request(port, "added"))
                assert _serves(await _one_request(port, "kept"))
                assert (await _one_request(port, name)).immediate_response.status.code == 502
            # A changed target (new credentials, say) under the same version is sent too.
            moved = replace(second["kept"], region="eu-west-1")
            await workers.update({**second, "kept": moved}, "v3", default_chain=False)
            assert sent[-1][0] == "delta" and sent[-1][1] == {"kept": moved}
        finally:
            await workers.stop()

    asyncio.run(scenario())


@contextlib.contextmanager
def _recycling_plane(loop_thread: LoopThread, tmp_path: Path) -> Iterator[tuple[Any, ExtProcWorkers, str]]:
    """A control plane with one ext_proc worker, replaced after every stream: (control plane, workers, route)."""
    (tmp_path / "api.yaml").write_text(CONFIG)
    with control_plane(loop_thread, tmp_path, listen_port=free_port(), extproc_workers=1) as cp:
        cp.workers.recycle_after = 1
        (name,) = cp.translation.route_table
        yield cp, cp.workers, name


def test_the_control_plane_moves_envoy_to_a_replacement_over_eds_and_sends_the_workers_nothing(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    with _recycling_plane(loop_thread, tmp_path) as (cp, workers, name):
        before = cp.cache.snapshot
        (port,) = workers.ports
        # The ext_proc cluster's endpoints come over EDS: a new port is a new membership, not a new cluster.
        assert before.resources[CLUSTER_TYPE][EXTPROC_CLUSTER].type == cluster_pb2.Cluster.EDS
        assert _endpoint_ports(before) == [port]
        sent: list[str] = []
        real = workers._all

        async def spy(message: tuple[object, ...], what: str) -> bool:
            sent.append(str(message[0]))
            return await real(message, what)

        workers._all = spy
        loop_thread.run(_one_request(port, name))
        old = workers._procs[0]
        assert loop_thread.run(workers.recycle_worn()) == 1
        (new_port,) = workers.ports
        # No Envoy connected: nothing to wait for. The old worker is stopped once the new port is published.
        loop_thread.run(cp._retire_workers(ack_timeout_s=5, settle_s=0))
        after = cp.cache.snapshot
        assert _endpoint_ports(after) == [new_port] and new_port != port
        for type_url in (CLUSTER_TYPE, ROUTE_TYPE):  # only the endpoints changed
            assert after.versions[type_url] == before.versions[type_url], type_url
        assert after.versions[ENDPOINT_TYPE] != before.versions[ENDPOINT_TYPE]
        assert "update" not in sent and "delta" not in sent, sent  # the same route table: not sent again
        assert not old.is_alive() and workers.retiring == []
        assert _serves(loop_thread.run(_one_request(new_port, name)))


def _endpoint_ports(snapshot: Snapshot) -> list[int]:
    assignment = snapshot.resources[ENDPOINT_TYPE][EXTPROC_CLUSTER]
    return [lb.endpoint.address.socket_address.port_value for lb in assignment.endpoints[0].lb_endpoints]


def test_the_old_worker_stops_only_once_every_envoy_acked_the_new_endpoints(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    from test_ads import FakeEnvoy

    with _recycling_plane(loop_thread, tmp_path) as (cp, workers, name):
        envoy = FakeEnvoy(cp.port)
        try:
            envoy.send(ENDPOINT_TYPE, names=[EXTPROC_CLUSTER])
            first = envoy.recv()
            envoy.send(ENDPOINT_TYPE, version=first.version_info, nonce=first.nonce, names=[EXTPROC_CLUSTER])
            wait_until(lambda: cp.ads.nodes["fake-envoy"].acked.get(ENDPOINT_TYPE) == first.version_info)

            loop_thread.run(_one_request(workers.ports[0], name))
            old, old_port = workers._procs[0], workers.ports[0]
            assert loop_thread.run(workers.recycle_worn()) == 1
            retiring = loop_thread.spawn(cp._retire_workers(ack_timeout_s=30, settle_s=0))
            pushed = envoy.recv()
            assignment = endpoint_pb2.ClusterLoadAssignment.FromString(pushed.resources[0].value)
            (lb,) = assignment.endpoints[0].lb_endpoints
            assert lb.endpoint.address.socket_address.port_value == workers.ports[0]
            # Envoy has the new port but has not ACKed it: the old worker is kept (still retiring) and serves.
            loop_thread.run(asyncio.sleep(0.5))
            assert not retiring.done() and old.is_alive() and workers.retiring == [old_port]
            assert _serves(loop_thread.run(_one_request(old_port, name)))
            envoy.send(
                ENDPOINT_TYPE, version=pushed.version_info, nonce=pushed.nonce, names=[EXTPROC_CLUSTER]
            )
            retiring.result(30)
            assert not old.is_alive() and workers.retiring == []

            # An Envoy that never ACKs does not keep a worn worker alive: it goes when the wait times out.
            loop_thread.run(_one_request(workers.ports[0], name))
            old = workers._procs[0]
            assert loop_thread.run(workers.recycle_worn()) == 1
            loop_thread.run(cp._retire_workers(ack_timeout_s=0.5, settle_s=0))
            assert envoy.recv().version_info != pushed.version_info
            assert not old.is_alive() and workers.retiring == []
        finally:
            envoy.close()


def test_a_retirement_does_not_depend_on_the_configuration_translating_again(
    loop_thread: LoopThread, tmp_path: Path
) -> None:
    """The new ports reach Envoy by changing only the endpoints of the snapshot it has: a configuration that
    fails to translate at that moment cannot leave Envoy pointed at a stopped worker."""
    with _recycling_plane(loop_thread, tmp_path) as (cp, workers, name):
        (port,) = workers.ports
        loop_thread.run(_one_request(port, name))
        assert loop_thread.run(workers.recycle_worn()) == 1

        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a translate bug")

        cp.translator.translate = broken
        loop_thread.run(cp._retire_workers(ack_timeout_s=1, settle_s=0))
        (new_port,) = workers.ports
        assert _endpoint_ports(cp.cache.snapshot) == [new_port] != [port]
        assert workers.retiring == []
        assert loop_thread.run(_refused(port, name))
        assert _serves(loop_thread.run(_one_request(new_port, name)))


def test_a_stream_in_flight_on_a_retired_worker_finishes(loop_thread: LoopThread, tmp_path: Path) -> None:
    """A slow function: the stream that started on the old worker outlives the old shutdown grace (5 s) and is
    still answered; the worker exits once it is done."""
    with _recycling_plane(loop_thread, tmp_path) as (cp, workers, name):
        (port,) = workers.ports
        old = workers._procs[0]

        async def slow_request() -> str:
            requests: asyncio.Queue[pb.ProcessingRequest | None] = asyncio.Queue()

            async def stream() -> AsyncIterator[pb.ProcessingRequest]:
                while (m := await requests.get()) is not None:
                    yield m

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.ExternalProcessorStub(channel).Process(stream())
                await requests.put(
                    pb.ProcessingRequest(
                        request_headers=headers(
                            [(":method", "GET"), (":path", "/pets/7"), (":authority", "api.example.com")],
                            True,
                        ),
                        attributes=attrs(name),
                    )
                )
                assert _serves(await call.read())
                assert await workers.recycle_worn() == 1
                retire = asyncio.create_task(cp._retire_workers(ack_timeout_s=1, settle_s=0))
                await asyncio.sleep(6.5)  # the function runs; meanwhile the worker is told to stop
                assert not retire.done() and old.is_alive()
                await requests.put(
                    pb.ProcessingRequest(response_headers=headers([(":status", "200")], False))
                )
                answer = await asyncio.wait_for(call.read(), 10)
                await requests.put(None)
                await asyncio.wait_for(retire, 30)
                return str(answer.WhichOneof("response"))

        assert loop_thread.run(slow_request(), timeout=60) == "response_headers"
        assert not old.is_alive() and workers.retiring == []


def test_a_late_reply_is_dropped_and_a_delta_never_patches_another_table(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        workers = ExtProcWorkers(1)
        try:
            (port,) = await workers.start()
            table, version = _route_table()
            (name,) = table
            # What a wait that timed out leaves behind: a message whose reply nobody read. Its "ok" must not be
            # taken for the answer to the next message (an install that has not happened yet).
            await workers._send(workers._conns[0], ("stats",))
            await workers.update(table, version, default_chain=False)
            assert "dropped a late reply" in caplog.text
            assert _serves(await _one_request(port, name))
            # A change made from a table the worker does not hold is refused, and the worker keeps its table.
            with pytest.raises(WorkerError, match=f"reached a worker holding {version}"):
                await workers._all(("delta", {}, [name], "v0", "v2", False), "install routes")
            assert _serves(await _one_request(port, name))
        finally:
            await workers.stop()

    asyncio.run(scenario())


def test_a_worker_that_dies_is_replaced_and_the_change_it_missed_reaches_envoy(
    loop_thread: LoopThread, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker killed for real (SIGKILL): the change that comes while it is dead is not pushed (ext_proc
    first), the supervision round replaces the worker on a new port, and then that change is applied."""
    (tmp_path / "api.yaml").write_text(CONFIG)
    with control_plane(loop_thread, tmp_path, listen_port=free_port(), extproc_workers=1) as cp:
        workers = cp.workers
        (port,) = workers.ports
        (name,) = cp.translation.route_table
        pushed = cp.cache.snapshot.versions
        dead = workers._procs[0]
        dead.kill()
        dead.join(5)
        (tmp_path / "api.yaml").write_text(CONFIG.replace("/pets/{petId}", "/animals/{petId}"))
        wait_until(lambda: "did not take the routes" in caplog.text, timeout=20)
        assert cp.cache.snapshot.versions == pushed  # Envoy keeps the last configuration every worker had
        # Replaced within a supervision round (5 s), then the missed change is applied and the old port retired.
        wait_until(lambda: workers.ports != [port] and workers.retiring == [], timeout=30)
        (new_port,) = workers.ports
        wait_until(lambda: _endpoint_ports(cp.cache.snapshot) == [new_port], timeout=30)
        (renamed,) = wait_until(lambda: [n for n in cp.translation.route_table if n != name], timeout=30)
        assert cp.cache.snapshot.versions[ROUTE_TYPE] != pushed[ROUTE_TYPE]
        assert _serves(loop_thread.run(_one_request(new_port, renamed)))
        assert f"ext_proc worker 0 (port {port}) died" in caplog.text
