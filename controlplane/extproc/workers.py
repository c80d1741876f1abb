"""ext_proc in worker processes: one Python process is one core, so throughput grows by adding processes.

The control plane stays one process (sources, translate, ADS). Each worker is a separate process with its own
gRPC server on its own port, its own RouteTable and credentials; Envoy's ext_proc cluster lists every worker's
port and spreads streams over them round robin. The control plane sends each route table to every worker and
waits for all of them to install it before Envoy hears of the routes (the same "ext_proc first" rule as with
one process), and tells them which route generations Envoy still uses.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    """N ext_proc worker processes, fed route tables over pipes. Use from one asyncio task at a time.

    With `recycle_after`, a worker that has served that many streams is replaced by a fresh process on the same
    port (SO_REUSEPORT): the new one is given every route table Envoy may still use, then the old one stops
    gracefully (Envoy's connection gets GOAWAY and reconnects to the new listener). That bounds the native memory
    grpc.aio leaks on streams Envoy resets (grpc issue 43360).
    """

    def __init__(
        self, count: int, host: str = "127.0.0.1", log_level: int = logging.INFO, recycle_after: int = 0
    ) -> None:
        if count < 1:
            raise ValueError("at least one worker")
        self.count = count
        self.host = host
        self.log_level = log_level
        self.recycle_after = recycle_after
        self.recycled = 0
        self.ports: list[int] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._lock = asyncio.Lock()
        # What a replacement worker must be given: the tables of every version still in use, oldest first.
        self._tables: dict[str, dict[str, RouteTarget]] = {}
        self._current = ""
        self._in_use: set[str] = set()
        self._default_chain = False

    async def start(self) -> list[int]:
        """Start the workers; returns the port each one serves ext_proc on."""
        async with self._lock:
            for i in range(self.count):
                proc, conn, port = await self._spawn(i, 0)
                self._procs.append(proc)
                self._conns.append(conn)
                self.ports.append(port)
        log.info("%d ext_proc worker(s) listening on %s ports %s", self.count, self.host, self.ports)
        return self.ports

    async def _spawn(
        self, index: int, port: int
    ) -> tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection, int]:
        # spawn, not fork: the control plane runs grpc and threads, which a forked child must not inherit.
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=worker_main,
            args=(child, self.host, self.log_level, port),
            name=f"lambdagate-extproc-{index}",
            daemon=True,
        )
        proc.start()
        child.close()
        try:
            kind, got = await self._recv(parent, START_TIMEOUT_S, f"worker {index} to start")
            if kind != "port":
                raise WorkerError(f"worker {index} failed to start: {got}")
        except BaseException:
            proc.kill()
            parent.close()
            raise
        return proc, parent, got

    async def update(self, targets: Mapping[str, RouteTarget], version: str, default_chain: bool) -> None:
        """Install a route table in every worker; returns once all have it (so Envoy may be told)."""
        table = dict(targets)
        async with self._lock:
            self._tables[version] = table
            self._current = version
            self._default_chain = self._default_chain or default_chain
            await self._all(("update", table, version, default_chain), "install routes")

    async def retain(self, in_use: set[str]) -> None:
        async with self._lock:
            self._in_use = set(in_use)
            self._tables = {v: t for v, t in self._tables.items() if v in self._in_use or v == self._current}
            await self._all(("retain", set(in_use)), "retain route generations")

    async def recycle_worn(self) -> int:
        """Replace the workers that served `recycle_after` streams or more; returns how many were replaced."""
        if not self.recycle_after:
            return 0
        replaced = 0
        async with self._lock:
            for i, conn in enumerate(list(self._conns)):
                await asyncio.to_thread(conn.send, ("stats",))
                kind, streams = await self._recv(conn, UPDATE_TIMEOUT_S, f"worker {i} to count its streams")
                if kind == "ok" and streams >= self.recycle_after:
                    await self._replace(i)
                    replaced += 1
        self.recycled += replaced
        return replaced

    async def _replace(self, i: int) -> None:
        proc, conn, _ = await self._spawn(i, self.ports[i])
        # The newcomer first learns every table an Envoy may still route with, then the old worker goes.
        for version in [v for v in self._tables if v != self._current] + [self._current]:
            if version not in self._tables:
                continue
            conn.send(("update", self._tables[version], version, self._default_chain))
            kind, detail = await self._recv(conn, UPDATE_TIMEOUT_S, f"new worker {i} to install routes")
            if kind != "ok":
                proc.kill()
                raise WorkerError(f"new worker {i} could not install routes: {detail}")
        old_proc, old_conn = self._procs[i], self._conns[i]
        self._procs[i], self._conns[i] = proc, conn
        with contextlib.suppress(OSError):
            old_conn.send(("stop",))
        await asyncio.to_thread(old_proc.join, 10.0)
        if old_proc.is_alive():
            old_proc.kill()
        old_conn.close()
        log.info(
            "ext_proc worker %d replaced after %d streams (port %d)", i, self.recycle_after, self.ports[i]
        )

    async def _all(self, message: tuple[Any, ...], what: str) -> None:
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
            with contextlib.suppress(OSError):
                conn.send(("stop",))
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 5.0)
            if proc.is_alive():
                proc.kill()
                await asyncio.to_thread(proc.join, 5.0)
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self.ports = [], [], []


def worker_main(
    conn: multiprocessing.connection.Connection, host: str, log_level: int, port: int = 0
) -> None:
    """A worker process: an ext_proc gRPC server, fed by the control plane over `conn`."""
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s[%(process)d]: %(message)s")
    try:
        asyncio.run(_serve(conn, host, port))
    except KeyboardInterrupt:
        pass


async def _serve(conn: multiprocessing.connection.Connection, host: str, port: int) -> None:
    import grpc
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

    from controlplane.aws.roles import RoleCache
    from controlplane.aws.signing import DefaultChain
    from controlplane.extproc.server import GRPC_OPTIONS, ExtProcServer, RouteTable

    chain = DefaultChain()
    routes = RouteTable(RoleCache(chain))
    # SO_REUSEPORT: a replacement binds the same port while this one is still draining.
    options = [(k, v) for k, v in GRPC_OPTIONS if k != "grpc.so_reuseport"] + [("grpc.so_reuseport", 1)]
    server = grpc.aio.server(options=options)
    servicer = ExtProcServer(routes, chain)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(f"{host}:{port}")
        await server.start()
    except Exception as err:  # noqa: BLE001 - told to the parent, which fails its start
        conn.send(("error", f"{type(err).__name__}: {err}"))
        return
    conn.send(("port", port))
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    chain_started = False
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
                    fresh = await routes.roles.prepare(targets.values(), stop)
                    if fresh is not None:
                        tasks.append(fresh)
                    routes.update(targets, version)
                elif kind == "retain":
                    routes.retain(message[1])
                elif kind == "stats":
                    conn.send(("ok", servicer.streams))
                    continue
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
        # Graceful: streams in flight finish; Envoy's connection gets GOAWAY and moves to the replacement.
        await server.stop(5.0)
