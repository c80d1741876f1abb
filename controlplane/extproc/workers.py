"""ext_proc in worker processes: one Python process is one core, so throughput grows by adding processes.

The control plane stays one process (sources, translate, ADS). Each worker is a separate process with its own
gRPC server on its own port, its own RouteTable and credentials; Envoy's ext_proc cluster lists every worker's
port and spreads streams over them round robin. The control plane sends each route table to every worker and
waits for all of them to install it before Envoy hears of the routes (the same "ext_proc first" rule as with
one process), and tells them which route generations Envoy still uses.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
from collections.abc import Mapping
from typing import Any

from controlplane.model.routes import RouteTarget

log = logging.getLogger("lambdagate.extproc.workers")

# How long the control plane waits for a worker to start or to install a route table.
START_TIMEOUT_S = 30.0
UPDATE_TIMEOUT_S = 30.0


class WorkerError(RuntimeError):
    pass


class ExtProcWorkers:
    """N ext_proc worker processes, fed route tables over pipes. Use from one asyncio task at a time."""

    def __init__(self, count: int, host: str = "127.0.0.1", log_level: int = logging.INFO) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.count = count
        self.host = host
        self.log_level = log_level
        self.ports: list[int] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._lock = asyncio.Lock()

    async def start(self) -> list[int]:
        """Start the workers; returns the port each one serves ext_proc on."""
        async with self._lock:
            return await self._start()

    async def _start(self) -> list[int]:
        # spawn, not fork: the control plane runs grpc and threads, which a forked child must not inherit.
        ctx = multiprocessing.get_context("spawn")
        for i in range(self.count):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=worker_main,
                args=(child, self.host, self.log_level),
                name=f"lambdagate-extproc-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._procs.append(proc)
            self._conns.append(parent)
        for i, conn in enumerate(self._conns):
            kind, port = await self._recv(conn, START_TIMEOUT_S, f"worker {i} to start")
            if kind != "port":
                raise WorkerError(f"worker {i} failed to start: {port}")
            self.ports.append(port)
        log.info("%d ext_proc worker(s) listening on %s ports %s", self.count, self.host, self.ports)
        return self.ports

    async def update(self, targets: Mapping[str, RouteTarget], version: str, default_chain: bool) -> None:
        """Install a route table in every worker; returns once all have it (so Envoy may be told)."""
        await self._all(("update", dict(targets), version, default_chain), "install routes")

    async def retain(self, in_use: set[str]) -> None:
        await self._all(("retain", set(in_use)), "retain route generations")

    async def _all(self, message: tuple[Any, ...], what: str) -> None:
        async with self._lock:
            for conn in self._conns:
                await asyncio.to_thread(conn.send, message)
            for i, conn in enumerate(self._conns):
                kind, detail = await self._recv(conn, UPDATE_TIMEOUT_S, f"worker {i} to {what}")
                if kind != "ok":
                    raise WorkerError(f"worker {i} could not {what}: {detail}")

    async def _recv(self, conn: multiprocessing.connection.Connection, timeout: float, what: str) -> Any:
        def wait() -> Any:
            if not conn.poll(timeout):
                raise WorkerError(f"timed out waiting for {what}")
            return conn.recv()

        try:
            return await asyncio.to_thread(wait)
        except (EOFError, OSError) as err:
            raise WorkerError(f"lost {what}: {err!r}") from None

    async def stop(self) -> None:
        for conn in self._conns:
            try:
                conn.send(("stop",))
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self.ports = [], [], []


def worker_main(conn: multiprocessing.connection.Connection, host: str, log_level: int) -> None:
    """A worker process: an ext_proc gRPC server, fed by the control plane over `conn`."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        asyncio.run(_serve(conn, host))
    except KeyboardInterrupt:
        pass


async def _serve(conn: multiprocessing.connection.Connection, host: str) -> None:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

    from controlplane.aws.roles import RoleCache
    from controlplane.aws.signing import DefaultChain
    from controlplane.extproc.server import GRPC_OPTIONS, ExtProcServer, RouteTable

    chain = DefaultChain()
    routes = RouteTable(RoleCache(chain))
    server = grpc.aio.server(options=GRPC_OPTIONS)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(ExtProcServer(routes, chain), server)
    try:
        port = server.add_insecure_port(f"{host}:0")
        await server.start()
    except Exception as err:  # noqa: BLE001 - told to the parent, which fails its start
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("port", port))
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    chain_started = roles_started = False
    try:
        while True:
            message = await asyncio.to_thread(conn.recv)
            kind = message[0]
            if kind == "stop":
                break
            try:
                if kind == "update":
                    _, targets, version, needs_chain = message
                    if needs_chain and not chain_started:
                        chain_started = True
                        await asyncio.to_thread(chain.load)
                        tasks.append(asyncio.create_task(chain.keep_fresh(stop)))
                    roles = [t for t in targets.values() if t.role_arn]
                    for t in roles:
                        routes.roles.get(t.credentials, t.role_arn or "", t.region)
                    if roles:
                        await routes.roles.assume_new()
                        if not roles_started:
                            roles_started = True
                            tasks.append(asyncio.create_task(routes.roles.keep_fresh(stop)))
                    routes.update(targets, version)
                elif kind == "retain":
                    routes.retain(message[1])
                conn.send(("ok", None))
            except Exception as err:  # noqa: BLE001 - the parent decides; the worker keeps its last table
                log.exception("worker: %s failed", kind)
                conn.send(("error", f"{type(err).__name__}: {err}"))
    except (EOFError, OSError):
        pass  # the control plane went away: stop serving
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.stop(1.0)
