"""ext_proc worker processes: each serves the route tables the control plane sends, over real gRPC."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from test_extproc import CONFIG, attrs, headers

from controlplane.extproc.workers import ExtProcWorkers
from controlplane.model import parse_document, resolve
from controlplane.model.routes import RouteTarget
from controlplane.translate.envoy import TranslateOptions, translate


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


def test_a_worn_worker_is_replaced_on_the_same_port_with_every_table() -> None:
    async def scenario() -> None:
        workers = ExtProcWorkers(1, recycle_after=3)
        try:
            (port,) = await workers.start()
            table, version = _route_table()
            (name,) = table
            await workers.update(table, version, default_chain=False)
            first_pid = workers._procs[0].pid
            assert await workers.recycle_worn() == 0  # not worn yet
            for _ in range(3):
                await _one_request(port, name)
            assert await workers.recycle_worn() == 1
            assert workers.ports == [port] and workers._procs[0].pid != first_pid
            # The newcomer serves the same routes on the same port.
            answer = await _one_request(port, name)
            assert answer.request_headers.response.header_mutation.set_headers
            assert await workers.recycle_worn() == 0  # its count starts again
        finally:
            await workers.stop()

    asyncio.run(scenario())
