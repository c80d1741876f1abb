"""The control plane process: file source -> translate -> xDS snapshot and ext_proc route table, on one gRPC server.

Readiness (gRPC health) turns SERVING only once the first configuration is loaded; SIGTERM stops gracefully.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane.addresses import is_ip
from controlplane.aws.signing import DefaultChain
from controlplane.extproc.server import GRPC_OPTIONS, ExtProcServer, RouteTable
from controlplane.extproc.workers import ExtProcWorkers
from controlplane.model.resources import Endpoint
from controlplane.sources.files import FileSource, LoadResult
from controlplane.sources.kubernetes import KubernetesSource, KubeSettings
from controlplane.translate.envoy import (
    EXTPROC_CLUSTER,
    TranslateOptions,
    Translation,
    Translator,
    one_endpoint,
)
from controlplane.warm import KeepWarm, needs_default_chain
from controlplane.xds.cache import CLUSTER_TYPE, ENDPOINT_TYPE, ROUTE_TYPE, Snapshot, SnapshotCache
from controlplane.xds.server import AdsServer

log = logging.getLogger("lambdagate")


@dataclass
class Settings:
    # Exactly one source: a folder, or the Kubernetes API.
    config_dir: Path | None = None
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 18000
    translate: TranslateOptions = TranslateOptions()
    local_endpoint: Endpoint | None = None
    grace_s: float = 5.0
    kubernetes: KubeSettings | None = None
    # ext_proc in this many worker processes (0: in this process, on the control plane's gRPC port).
    extproc_workers: int = 0
    # Replace a worker after this many streams (0: never); bounds grpc.aio's native leak (see extproc/workers.py).
    extproc_recycle_after: int = 0
    # No garbage collection until the first configuration is applied, then gc.freeze(); None: when the control
    # plane runs on the main thread, i.e. owns the process (`lambdagate serve` and `up`), not when embedded (tests).
    freeze_gc: bool | None = None


class ControlPlane:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = SnapshotCache()
        self.default_chain = DefaultChain()
        self.routes = RouteTable()
        # Roles without a Secret are assumed with the default chain, and again when it has new credentials.
        self.routes.roles.chain = self.default_chain
        self.ads = AdsServer(self.cache, on_state=self._retain_routes)
        self.extproc = ExtProcServer(self.routes, self.default_chain)
        self.health = health.aio.HealthServicer()
        self.source: FileSource | KubernetesSource
        if settings.kubernetes is not None:
            self.source = KubernetesSource(settings.kubernetes, local_endpoint=settings.local_endpoint)
        elif settings.config_dir is not None:
            self.source = FileSource(settings.config_dir, local_endpoint=settings.local_endpoint)
        else:
            raise ValueError("a config folder or Kubernetes settings are required")
        self.keep_warm = KeepWarm(
            self.default_chain,
            self.routes.roles,
            ca_bundle=settings.translate.ca_bundle,
            active=self._leads,
        )
        self.last: LoadResult | None = None
        self.translation: Translation | None = None
        # Remembers each VirtualService's translation: a change translates only the services it touches.
        self.translator = Translator()
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.loaded = asyncio.Event()
        self.on_config: list[Callable[[LoadResult], None]] = []
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._chain_task: asyncio.Task[None] | None = None
        self._gc_paused = False
        # Workers listen where Envoy reaches this process's own gRPC port (loopback when that is a wildcard).
        worker_host = "127.0.0.1" if settings.grpc_host in ("0.0.0.0", "", "::") else settings.grpc_host
        self.workers = (
            ExtProcWorkers(
                settings.extproc_workers, worker_host, recycle_after=settings.extproc_recycle_after
            )
            if settings.extproc_workers
            else None
        )
        self._retain_task: asyncio.Task[None] | None = None
        self._pending_retain: set[str] | None = None
        # One apply at a time: the source's changes and the re-apply that moves Envoy to a replaced worker's port.
        self._applying = asyncio.Lock()
        self._translated_ports: tuple[int, ...] | None = None
        # The last configuration did not reach the workers (so not Envoy either): re-applied once they are whole.
        self._workers_behind = False

    async def apply(self, result: LoadResult) -> None:
        """Install a loaded configuration: ext_proc's routes first, so Envoy never routes to an unknown name."""
        try:
            async with self._applying:
                await self._apply(result)
        finally:
            if self._gc_paused:
                # The first configuration is most of what this process will ever hold. Left to the collector,
                # every full collection walks it again (80 ms with 10,000 routes, every few changes, measured);
                # frozen, it is never walked, and is still freed by reference counting when a change replaces it.
                self._gc_paused = False
                if self.loaded.is_set():
                    gc.freeze()
                gc.enable()

    async def _apply(self, result: LoadResult) -> None:
        self.last = result
        for hook in self.on_config:
            hook(result)
        options = self.settings.translate
        if self.workers is not None:
            # The workers' current ports are set after translation (see _extproc_endpoints): the translation keeps
            # the first ports, so replacing a worker leaves it (and the route table the workers hold) unchanged.
            if self._translated_ports is None:
                self._translated_ports = tuple(self.workers.ports)
            options = replace(options, extproc_host=self.workers.host, extproc_ports=self._translated_ports)
        elif options.extproc_port == 0:
            # ext_proc is served on this process's own gRPC port unless told otherwise.
            options = replace(options, extproc_port=self.port)
        started = time.perf_counter()
        timings = dict(result.timings)
        try:
            translation = self.translator.translate(result.config, options)
        except Exception:  # a translate bug must not stop the watcher; the last good snapshot keeps serving
            log.exception("translating the configuration failed; Envoy keeps its current configuration")
            return
        timings["translate"] = time.perf_counter() - started
        chain_needed = any(t.credentials is None for t in translation.route_table.values())
        if (chain_needed or needs_default_chain(result.config)) and self._stop is not None:
            await self._start_default_chain(self._stop)
        started = time.perf_counter()
        resources = translation.resources()
        if self.workers is not None:
            _extproc_endpoints(resources, self.workers.host, self.workers.ports)
        try:
            snapshot = Snapshot.build(
                resources, serialized=translation.serialized, previous=self.cache.snapshot
            )
        except ValueError as err:  # a translate bug; keep serving the previous snapshot
            log.error("not pushing an inconsistent snapshot: %s", err)
            return
        timings["snapshot"] = time.perf_counter() - started
        fresh = await self.routes.roles.prepare(translation.route_table.values(), self._stop)
        if fresh is not None:
            self._tasks.append(fresh)
        started = time.perf_counter()
        # ext_proc learns the routes before Envoy does, so Envoy never routes to a name ext_proc lacks.
        if self.workers is not None:
            try:
                await self.workers.update(
                    translation.route_table, snapshot.versions[ROUTE_TYPE], chain_needed
                )
            except Exception as err:  # noqa: BLE001 - a worker that lacks the routes must not see them routed
                log.error(
                    "ext_proc workers did not take the routes (%s); Envoy keeps its current configuration",
                    err,
                )
                self._workers_behind = True
                return
            self._workers_behind = False
        self.routes.update(translation.route_table, snapshot.versions[ROUTE_TYPE])
        timings["ext_proc"] = time.perf_counter() - started
        self.translation = translation
        self.keep_warm.update(result.config)
        current = self.cache.snapshot
        if current is not None and current.versions == snapshot.versions:
            return  # only ext_proc's side (credentials, say) changed; Envoy has nothing new
        self.cache.set_snapshot(snapshot)
        log.info(
            "configuration applied: %d upstream(s), %d virtual service(s), %d route(s); versions %s; %.1f ms (%s)",
            len(result.config.upstreams),
            len(result.config.virtual_services),
            len(translation.route_table),
            ",".join(f"{t.rsplit('.', 1)[-1]}={v}" for t, v in snapshot.versions.items()),
            1000 * sum(timings.values()),
            ", ".join(f"{k} {1000 * v:.1f}" for k, v in timings.items()),
        )
        if not self.loaded.is_set():
            self.loaded.set()
            await self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    async def start(self) -> int:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.ads, server)
        external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(self.extproc, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = server.add_insecure_port(f"{self.settings.grpc_host}:{self.settings.grpc_port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {self.settings.grpc_host}:{self.settings.grpc_port}")
        if self.workers is not None:
            # Before the server starts: nothing (an Envoy's ADS stream) may talk to the workers before they are up.
            await self.workers.start()
        await server.start()
        self.server = server
        log.info("xDS and ext_proc listening on %s:%d", self.settings.grpc_host, self.port)
        return self.port

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: watch the folder, keep default-chain credentials fresh."""
        if self.server is None:
            await self.start()
        self._stop = stop
        freeze = self.settings.freeze_gc
        if freeze or (freeze is None and threading.current_thread() is threading.main_thread()):
            # No collection while the first configuration is read and built (it allocates what stays: collecting
            # then finds nothing, 110 ms of 1,000 files' load); apply() turns it back on and freezes what stays.
            gc.disable()
            self._gc_paused = True
        if self.workers is not None:
            # Dead workers are always replaced; worn ones when recycling is on.
            worn = bool(self.workers.recycle_after)
            self._tasks.append(asyncio.create_task(self._recycle_workers(stop, worn=worn)))
        watcher = asyncio.create_task(self.source.watch(self.apply, stop=stop))
        watcher.add_done_callback(_log_failure)
        self._tasks.append(watcher)
        try:
            await stop.wait()
        finally:
            await self.health.enter_graceful_shutdown()
            await self.keep_warm.stop()
            tasks, self._tasks = self._tasks, []
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.server is not None:
                await self.server.stop(self.settings.grace_s)
            if self.workers is not None:
                await self.workers.stop()

    def _leads(self) -> bool:
        # With several replicas on Kubernetes, only the Lease holder warms functions (as only it writes status).
        is_leader = getattr(self.source, "is_leader", None)
        return is_leader is None or bool(is_leader())

    def _retain_routes(self) -> None:
        in_use = self.ads.versions_in_use(ROUTE_TYPE)
        self.routes.retain(in_use)
        if self.workers is not None and self.workers.ports:
            # The workers forget what no Envoy uses too; off the ADS path, one at a time, latest wins.
            self._pending_retain = in_use
            if self._retain_task is None or self._retain_task.done():
                self._retain_task = asyncio.create_task(self._retain_workers())

    async def _recycle_workers(
        self,
        stop: asyncio.Event,
        every_s: float = 5.0,
        ack_timeout_s: float = 30.0,
        settle_s: float = 1.0,
        worn: bool = True,
    ) -> None:
        """Every `every_s`: replace dead (and, with `worn`, worn) workers, then move Envoy to the replacements."""
        assert self.workers is not None
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                return
            try:
                await self.workers.recycle_worn(worn)
            except Exception as err:  # noqa: BLE001 - the old worker keeps serving; try again later
                log.warning("ext_proc workers: replacing a worker failed: %s", err)
            if self._workers_behind and self.last is not None:
                # A change the workers failed to take (a worker had died, say) was never pushed: now it can be.
                log.info("ext_proc workers: applying the configuration they did not take")
                await self.apply(self.last)
            if self.workers.retiring:
                await self._retire_workers(ack_timeout_s, settle_s)

    async def _retire_workers(self, ack_timeout_s: float, settle_s: float) -> None:
        """Move Envoy off the replaced workers' ports, then stop them. Lossless: the ext_proc cluster's endpoints
        come over EDS, so a new port only changes its membership; Envoy drains its connections to the removed
        host (streams in flight finish) and opens new streams on the new port. Until Envoy has been sent the new
        ports, the replaced workers keep serving, and this is tried again at the next round."""
        assert self.workers is not None
        retiring = self.workers.retiring
        try:
            published = await self._publish_worker_ports()
        except Exception as err:  # noqa: BLE001 - a bug here must not stop recycling; the old workers serve on
            log.warning("ext_proc workers: publishing their new port(s) failed (%s); trying again later", err)
            return
        if published is None:
            log.warning(
                "ext_proc workers: Envoy's configuration still lists port(s) %s; they keep serving, trying again "
                "later",
                retiring,
            )
            return
        if published == "":
            pass  # no configuration lists ext_proc yet: no Envoy can be using the old ports
        elif await self.ads.wait_all_acked(published, ack_timeout_s):
            # Envoy's main thread ACKs, then hands the new membership to its worker threads.
            await asyncio.sleep(settle_s)
        else:
            log.warning(
                "ext_proc workers: not every Envoy ACKed the ext_proc endpoints without port(s) %s within %.0f s; "
                "stopping them anyway",
                retiring,
                ack_timeout_s,
            )
        await self.workers.retire()

    async def _publish_worker_ports(self) -> str | None:
        """Give Envoy the workers' current ports: the snapshot Envoy has, with only the ext_proc endpoints changed
        (nothing is translated again, and the workers are sent nothing). Returns the type whose ACK says Envoy
        has them; "" when no snapshot lists the ext_proc cluster (nothing to wait for); None when the snapshot
        would still list a retiring port (a bug: the retiring workers must then stay)."""
        assert self.workers is not None
        async with self._applying:
            current = self.cache.snapshot
            if current is None:
                return ""
            resources = {t: dict(by_name) for t, by_name in current.resources.items()}
            _extproc_endpoints(resources, self.workers.host, self.workers.ports)
            snapshot = Snapshot.build(resources, previous=current)
            listed, type_url = _extproc_ports(snapshot)
            if not listed:
                return ""
            if listed & set(self.workers.retiring):
                return None
            if snapshot.versions != current.versions:
                self.cache.set_snapshot(snapshot)
                log.info("ext_proc workers: Envoy sent their ports %s", self.workers.ports)
            return type_url

    async def _retain_workers(self) -> None:
        assert self.workers is not None
        while self._pending_retain is not None:
            in_use, self._pending_retain = self._pending_retain, None
            try:
                await self.workers.retain(in_use)
            except Exception as err:  # noqa: BLE001 - older generations just live longer
                if self._stop is not None and self._stop.is_set():
                    return  # shutting down: Envoy's stream closed as the workers were being stopped
                log.warning("ext_proc workers: forgetting old route generations failed: %s", err)

    async def _start_default_chain(self, stop: asyncio.Event) -> None:
        # Only when an Upstream has no secret_ref: the chain may end at instance metadata, a network call
        # that nobody with Secrets everywhere should pay for or wait on.
        if self._chain_task is None:
            await asyncio.to_thread(self.default_chain.load)
            self._chain_task = asyncio.create_task(self.default_chain.keep_fresh(stop))
            self._tasks.append(self._chain_task)


def _extproc_endpoints(resources: dict[str, dict[str, Any]], host: str, ports: list[int]) -> None:
    """Point the ext_proc cluster at the workers' current ports (the translation may list earlier ones).

    Over EDS (ADS) when the host is an IP address, as is the case unless `--grpc-address` names a host: a worker
    replaced on a new port then changes only the cluster's membership, and Envoy drains the removed host (its
    streams in flight finish). A changed STATIC cluster is a new cluster to Envoy, and replacing the old one resets
    every ext_proc stream in flight on it (the thread-local cluster's async client resets its streams when
    destroyed): measured, 9 and 12 requests answered 500 in 8,000-11,000 across 4 replacements. EDS endpoints must
    be IP addresses, so a host name keeps its STRICT_DNS cluster, with the ports in it (and that loss)."""
    clusters = resources.get(CLUSTER_TYPE, {})
    translated = clusters.get(EXTPROC_CLUSTER)
    if translated is None:
        return
    assignment = one_endpoint(EXTPROC_CLUSTER, host, *ports)
    if translated.type == cluster_pb2.Cluster.EDS:  # already converted (a snapshot being re-published)
        resources[ENDPOINT_TYPE] = {**resources.get(ENDPOINT_TYPE, {}), EXTPROC_CLUSTER: assignment}
        return
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(translated)
    if translated.type == cluster_pb2.Cluster.STATIC and is_ip(host):
        cluster.ClearField("load_assignment")
        cluster.type = cluster_pb2.Cluster.EDS
        cluster.eds_cluster_config.eds_config.CopyFrom(
            config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=config_source_pb2.V3
            )
        )
        resources[ENDPOINT_TYPE] = {**resources.get(ENDPOINT_TYPE, {}), EXTPROC_CLUSTER: assignment}
    else:
        cluster.load_assignment.CopyFrom(assignment)
    resources[CLUSTER_TYPE] = {**clusters, EXTPROC_CLUSTER: cluster}


def _extproc_ports(snapshot: Snapshot | None) -> tuple[set[int], str]:
    """The ports the snapshot gives the ext_proc cluster, and the type that carries them (EDS or CDS)."""
    if snapshot is None:
        return set(), CLUSTER_TYPE
    assignment = snapshot.resources.get(ENDPOINT_TYPE, {}).get(EXTPROC_CLUSTER)
    type_url = ENDPOINT_TYPE
    if assignment is None:
        cluster = snapshot.resources.get(CLUSTER_TYPE, {}).get(EXTPROC_CLUSTER)
        assignment = cluster.load_assignment if cluster is not None else None
        type_url = CLUSTER_TYPE
    if assignment is None:
        return set(), type_url
    ports = {
        lb.endpoint.address.socket_address.port_value
        for locality in assignment.endpoints
        for lb in locality.lb_endpoints
    }
    return ports, type_url


def _log_failure(task: asyncio.Task[None]) -> None:
    # Without this a dead source would go unnoticed until shutdown: Envoy keeps its last config, nothing updates.
    if not task.cancelled() and task.exception() is not None:
        log.error("the configuration source stopped: %r", task.exception(), exc_info=task.exception())
