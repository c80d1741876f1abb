"""A do-nothing ext_proc server in Python (grpc.aio, or with `sync` grpcio's synchronous server), the floor under
path (c) of benchmarks/run.py: `python benchmarks/noop_extproc.py PORT [aio|sync]`.

It answers every phase with CONTINUE, so what it costs is gRPC-in-Python alone, not lambdagate's work.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

CONTINUE = pb.CommonResponse()


def continue_(req: pb.ProcessingRequest) -> pb.ProcessingResponse | None:
    """CONTINUE for the phase the request is in (None for trailers, which Envoy is not told to send)."""
    which = req.WhichOneof("request")
    if which == "request_headers":
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=CONTINUE))
    if which == "request_body":
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=CONTINUE))
    if which == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=CONTINUE))
    if which == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=CONTINUE))
    return None


class NoopProcessor(pb_grpc.ExternalProcessorServicer):
    async def Process(  # noqa: N802 (gRPC's name)
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for req in request_iterator:
            answer = continue_(req)
            if answer is not None:
                yield answer


class SyncNoopProcessor(pb_grpc.ExternalProcessorServicer):
    """The same with grpcio's synchronous server (a thread per stream): a lever weighed in issue 6."""

    def Process(  # noqa: N802 (gRPC's name)
        self, request_iterator: Iterator[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ProcessingResponse]:
        for req in request_iterator:
            answer = continue_(req)
            if answer is not None:
                yield answer


def serve_sync(port: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server = grpc.server(ThreadPoolExecutor(max_workers=64))
    pb_grpc.add_ExternalProcessorServicer_to_server(SyncNoopProcessor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "sync":
        serve_sync(int(sys.argv[1]))
    else:
        asyncio.run(serve(int(sys.argv[1])))
