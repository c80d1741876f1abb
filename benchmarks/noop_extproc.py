"""A do-nothing ext_proc server in Python (grpc.aio), the floor under path (c) of benchmarks/run.py.

It answers every phase with CONTINUE, so what it costs is gRPC-in-Python alone, not lambdagate's work.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

CONTINUE = pb.CommonResponse()


class NoopProcessor(pb_grpc.ExternalProcessorServicer):
    async def Process(  # noqa: N802 (gRPC's name)
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        async for req in request_iterator:
            which = req.WhichOneof("request")
            if which == "request_headers":
                yield pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=CONTINUE))
            elif which == "request_body":
                yield pb.ProcessingResponse(request_body=pb.BodyResponse(response=CONTINUE))
            elif which == "response_headers":
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=CONTINUE))
            elif which == "response_body":
                yield pb.ProcessingResponse(response_body=pb.BodyResponse(response=CONTINUE))


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalProcessorServicer_to_server(NoopProcessor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
