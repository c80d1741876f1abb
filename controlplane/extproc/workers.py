"""ext_proc in worker processes: one Python process is one core, so throughput grows by adding processes.

The control plane stays one process (sources, translate, ADS). Each worker is a separate process with its own
gRPC server on its own port, its own RouteTable and credentials; Envoy's ext_proc cluster lists every worker's
port and spreads streams over them round robin. The control plane sends each route table to every worker and
waits for all of them to install it before Envoy hears of the routes (the same "ext_proc first" rule as with
one process), and tells them which route generations Envoy still uses. After the first table a worker is sent only
what changed (entries added or changed, names removed); it rebuilds the full table from its previous one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from controlplane.model.resources import MAX_TIMEOUT_S
from controlplane.model.routes import RouteTarget

log = logging.getLogger("lambdagate.extproc.workers")

# How long the control plane waits for a worker to start or to install a route table.
START_TIMEOUT_S = 30.0
UPDATE_TIMEOUT_S = 30.0
# How long a stopping worker lets its streams in flight finish. Envoy has moved off a retired worker's port before
# it is stopped, so only requests already under way are left: at most Lambda's own limit on a run (the longest
# route timeout there can be) and the response phases. A worker with nothing in flight exits at once.
RETIRE_GRACE_S = MAX_TIMEOUT_S + 15.0
SHUTDOWN_GRACE_S = 5.0


class WorkerError(RuntimeError):
    pass


@dataclass
class _Retiring:
    """A worker a replacement took over from, still serving what Envoy sends its port until it is retired."""

    index: int
    port: int
    proc: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection


class ExtProcWorkers:
    """N ext_proc worker processes, fed route tables over pipes. Use from one asyncio task at a time.

    With `recycle_after`, a worker that has served that many streams is replaced by a fresh process on a new
    port: the new one is given every route table Envoy may still use and takes the old one's place in `ports`;
    the old one keeps serving (and keeps being sent route tables) as "retiring" until `retire()`, which the
    control plane calls once every Envoy has ACKed ext_proc endpoints (EDS) without the old port (Envoy then drains
    its connections to the old one: streams in flight finish, new ones go to the new port). That bounds the native
    memory grpc.aio leaks on streams Envoy resets (grpc issue 43360) without failing a request.
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
        # Every message carries a number its reply echoes: a reply that comes after its wait timed out is
        # recognised and dropped, never read as the answer to the next message.
        self._seq = 0
        # What a replacement worker must be given: the tables of every version still in use, oldest first.
        self._tables: dict[str, dict[str, RouteTarget]] = {}
        self._current = ""
        self._in_use: set[str] = set()
        self._default_chain = False
        # Every worker holds exactly self._tables[self._current] (so a change can be sent as a delta).
        self._synced = False
        # Replaced workers, until retire() (then `_leaving` while they stop).
        self._retiring: list[_Retiring] = []
        self._leaving: list[_Retiring] = []

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
            kind, got = await self._recv(parent, START_TIMEOUT_S, f"worker {index} to start", 0)
            if kind != "port":
                raise WorkerError(f"worker {index} failed to start: {got}")
        except BaseException:
            await self._kill(proc, parent)
            raise
        return proc, parent, got

    @property
    def retiring(self) -> list[int]:
        """Ports of the replaced workers not retired yet."""
        return [r.port for r in self._retiring]

    async def update(self, targets: Mapping[str, RouteTarget], version: str, default_chain: bool) -> None:
        """Install a route table in every worker; returns once all have it (so Envoy may be told).

        Only what changed since the last table is sent; nothing at all when the table and version are the same."""
        table = dict(targets)
        async with self._lock:
            chain = self._default_chain or default_chain
            base = self._tables.get(self._current) if self._synced else None
            message: tuple[Any, ...]
            if base is not None:
                # By identity: translate hands back the very same target for an unchanged route (and equality
                # would miss what RouteTarget leaves out of it, param_functions).
                changed = {k: v for k, v in table.items() if base.get(k) is not v}
                removed = [k for k in base if k not in table]
                if not changed and not removed and version == self._current and chain == self._default_chain:
                    return  # the workers have this very table (a re-apply that only moved their ports, say)
                message = ("delta", changed, removed, self._current, version, chain)
            else:
                message = ("update", table, version, chain)
            self._tables[version] = table
            self._current = version
            self._default_chain = chain
            self._synced = False
            # A retiring worker that missed it gets the next table in full (with everyone: simpler, and rare).
            self._synced = await self._all(message, "install routes")

    async def retain(self, in_use: set[str]) -> None:
        async with self._lock:
            self._in_use = set(in_use)
            self._tables = {v: t for v, t in self._tables.items() if v in self._in_use or v == self._current}
            await self._all(("retain", set(in_use)), "retain route generations")

    async def recycle_worn(self, worn: bool = True) -> int:
        """Replace the workers that died, and (`worn`) those that served `recycle_after` streams or more; returns
        how many were replaced.

        The replaced ones keep serving until `retire()`: first move Envoy off their ports (`retiring`). A dead one
        serves nothing, but goes the same way: Envoy must first be given its replacement's port."""
        replaced = 0
        async with self._lock:
            try:
                for i, conn in enumerate(list(self._conns)):
                    proc = self._procs[i]
                    if not proc.is_alive():
                        log.error(
                            "ext_proc worker %d (port %d) died (exit code %s); replacing it",
                            i,
                            self.ports[i],
                            proc.exitcode,
                        )
                        await self._replace(i, "it died")
                        replaced += 1
                        continue
                    if not (worn and self.recycle_after):
                        continue
                    seq = await self._send(conn, ("stats",))
                    kind, streams = await self._recv(
                        conn, UPDATE_TIMEOUT_S, f"worker {i} to count its streams", seq
                    )
                    if kind == "ok" and streams >= self.recycle_after:
                        await self._replace(i, f"after {streams} streams")
                        replaced += 1
            finally:
                self.recycled += replaced
        return replaced

    async def _replace(self, i: int, why: str) -> None:
        # A new port: the old worker's listener and connections stay as they are until Envoy has moved off them.
        proc, conn, port = await self._spawn(i, 0)
        try:
            # The newcomer first learns every table an Envoy may still route with (the current one last). What
            # is in use goes first: a RouteTable keeps only those generations (and the current one) on update.
            messages: list[tuple[Any, ...]] = [("retain", set(self._in_use))]
            for version in [v for v in self._tables if v != self._current] + [self._current]:
                if version in self._tables:
                    messages.append(("update", self._tables[version], version, self._default_chain))
            for message in messages:
                seq = await self._send(conn, message)
                kind, detail = await self._recv(
                    conn, UPDATE_TIMEOUT_S, f"new worker {i} to install routes", seq
                )
                if kind != "ok":
                    raise WorkerError(f"new worker {i} could not install routes: {detail}")
        except BaseException:
            await self._kill(proc, conn)
            raise
        self._retiring.append(_Retiring(i, self.ports[i], self._procs[i], self._conns[i]))
        self._procs[i], self._conns[i], self.ports[i] = proc, conn, port
        log.info(
            "ext_proc worker %d replaced (%s): port %d now, port %d retiring",
            i,
            why,
            port,
            self._retiring[-1].port,
        )

    async def retire(self, grace_s: float = RETIRE_GRACE_S) -> int:
        """Stop the replaced workers; returns how many. Gracefully: each one's streams in flight finish (for up to
        `grace_s`) and it exits as soon as it has none; this returns once they have exited."""
        async with self._lock:
            leaving, self._retiring = self._retiring, []
            self._leaving.extend(leaving)
            for r in leaving:
                with contextlib.suppress(OSError):
                    await self._send(r.conn, ("stop", grace_s))
        for r in leaving:
            await self._end(r.proc, grace_s + 10.0)
            r.conn.close()
            self._leaving.remove(r)
            log.info("ext_proc worker %d retired (port %d)", r.index, r.port)
        return len(leaving)

    @staticmethod
    async def _end(proc: multiprocessing.process.BaseProcess, timeout: float) -> None:
        await asyncio.to_thread(proc.join, timeout)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5.0)

    @staticmethod
    async def _kill(
        proc: multiprocessing.process.BaseProcess, conn: multiprocessing.connection.Connection
    ) -> None:
        """A worker that failed to start or to take its tables: no grace, and reaped (no zombie left)."""
        proc.kill()
        conn.close()
        await asyncio.to_thread(proc.join, 5.0)

    async def _send(self, conn: multiprocessing.connection.Connection, message: tuple[Any, ...]) -> int:
        self._seq += 1
        await asyncio.to_thread(conn.send, (self._seq, *message))
        return self._seq

    async def _all(self, message: tuple[Any, ...], what: str) -> bool:
        """Send to every worker and wait for all; raises if a current worker fails. Retiring workers get it too
        (Envoy may still send them streams until it has the new ports), but one of them failing only warns (it is
        about to go): returns False then."""
        retiring = list(self._retiring)
        seqs = [await self._send(conn, message) for conn in self._conns]
        sent: list[tuple[_Retiring, int]] = []
        for r in retiring:
            with contextlib.suppress(OSError):
                sent.append((r, await self._send(r.conn, message)))
        # Every current worker's reply is read even when one fails, so none is left unread on its pipe.
        failures = []
        for i, (conn, seq) in enumerate(zip(self._conns, seqs, strict=True)):
            try:
                kind, detail = await self._recv(conn, UPDATE_TIMEOUT_S, f"worker {i} to {what}", seq)
            except WorkerError as err:
                kind, detail = "error", str(err)
            if kind != "ok":
                failures.append(f"worker {i} could not {what}: {detail}")
        if failures:
            raise WorkerError("; ".join(failures))
        every = len(sent) == len(retiring)
        for r, seq in sent:
            try:
                kind, detail = await self._recv(
                    r.conn, UPDATE_TIMEOUT_S, f"retiring worker {r.index} to {what}", seq
                )
            except WorkerError as err:
                kind, detail = "error", str(err)
            if kind != "ok":
                every = False
                log.warning(
                    "retiring ext_proc worker %d (port %d) could not %s: %s", r.index, r.port, what, detail
                )
        return every

    async def _recv(
        self, conn: multiprocessing.connection.Connection, timeout: float, what: str, seq: int
    ) -> tuple[str, Any]:
        """The reply to message `seq`: (kind, detail). Replies to earlier messages (whose wait timed out) are
        dropped."""

        def wait() -> tuple[str, Any]:
            deadline = time.monotonic() + timeout
            while True:
                if not conn.poll(max(0.0, deadline - time.monotonic())):
                    raise WorkerError(f"timed out waiting for {what}")
                got, kind, detail = conn.recv()
                if got == seq:
                    return kind, detail
                log.warning("dropped a late reply from an ext_proc worker (to message %d): %s", got, kind)

        try:
            return await asyncio.to_thread(wait)
        except (EOFError, OSError) as err:
            raise WorkerError(f"lost {what}: {err!r}") from None

    async def stop(self) -> None:
        """Stop every worker: the current ones, those retiring and those still stopping."""
        others = [*self._retiring, *self._leaving]
        procs = [*self._procs, *(r.proc for r in others)]
        conns = [*self._conns, *(r.conn for r in others)]
        for conn in conns:
            with contextlib.suppress(OSError):
                await self._send(conn, ("stop", SHUTDOWN_GRACE_S))
        for proc in procs:
            await self._end(proc, SHUTDOWN_GRACE_S + 5.0)
        for conn in conns:
            conn.close()
        self._procs, self._conns, self.ports = [], [], []
        self._retiring, self._leaving = [], []
        self._synced = False


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
    # No SO_REUSEPORT: a replacement listens on a port of its own (GRPC_OPTIONS turns it off).
    server = grpc.aio.server(options=GRPC_OPTIONS)
    servicer = ExtProcServer(routes, chain)
    external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    try:
        port = server.add_insecure_port(f"{host}:{port}")
        await server.start()
    except Exception as err:  # noqa: BLE001 - told to the parent, which fails its start
        conn.send((0, "error", f"{type(err).__name__}: {err}"))
        return
    conn.send((0, "port", port))
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    chain_started = False
    # The last table installed, and its version: a "delta" message is applied to it.
    last: dict[str, RouteTarget] = {}
    last_version: str | None = None
    grace_s = SHUTDOWN_GRACE_S
    try:
        while True:
            seq, kind, *message = await asyncio.to_thread(conn.recv)
            if kind == "stop":
                grace_s = message[0]
                break
            try:
                if kind in ("update", "delta"):
                    if kind == "update":
                        targets, version, needs_chain = message
                    else:
                        changed, removed, base, version, needs_chain = message
                        if base != last_version:
                            # Never patch a table other than the one the delta was made from.
                            raise WorkerError(
                                f"a change to route table {base} reached a worker holding {last_version}"
                            )
                        targets = dict(last)
                        targets.update(changed)
                        for name in removed:
                            targets.pop(name, None)
                    if needs_chain and not chain_started:
                        chain_started = True
                        await asyncio.to_thread(chain.load)
                        tasks.append(asyncio.create_task(chain.keep_fresh(stop)))
                    fresh = await routes.roles.prepare(targets.values(), stop)
                    if fresh is not None:
                        tasks.append(fresh)
                    routes.update(targets, version)
                    last, last_version = targets, version
                elif kind == "retain":
                    routes.retain(message[0])
                elif kind == "stats":
                    conn.send((seq, "ok", servicer.streams))
                    continue
                conn.send((seq, "ok", None))
            except Exception as err:  # noqa: BLE001 - the parent decides; the worker keeps its last table
                log.exception("worker: %s failed", kind)
                conn.send((seq, "error", f"{type(err).__name__}: {err}"))
    except (EOFError, OSError):
        pass  # the control plane went away: stop serving
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Graceful: streams in flight finish (a retiring worker is stopped once Envoy has moved to its replacement,
        # so these are requests already under way, however long their function runs); then the process exits.
        await server.stop(grace_s)
