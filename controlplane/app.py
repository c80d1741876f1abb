"""The control plane process: file source -> translate -> xDS snapshot and ext_proc route table, on one gRPC server.

Readiness (gRPC health) turns SERVING only once the first configuration is loaded; SIGTERM stops gracefully.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from controlplane.aws.signing import DefaultChain
from controlplane.extproc.server import ExtProcServer, RouteTable
from controlplane.model.resources import Endpoint
from controlplane.sources.files import FileSource, LoadResult
from controlplane.sources.kubernetes import KubernetesSource, KubeSettings
from controlplane.translate.envoy import TranslateOptions, Translation, translate
from controlplane.warm import KeepWarm, needs_default_chain
from controlplane.xds.cache import ROUTE_TYPE, Snapshot, SnapshotCache
from controlplane.xds.server import AdsServer

log = logging.getLogger("lambdagate")

GRPC_OPTIONS = [
    # Buffered bodies travel in one message: room for a 6 MB Lambda payload, base64 and the event around it.
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5000),
]


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
        self.server: grpc.aio.Server | None = None
        self.port = 0
        self.loaded = asyncio.Event()
        self.on_config: list[Callable[[LoadResult], None]] = []
        self._stop: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._chain_task: asyncio.Task[None] | None = None
        self._roles_task: asyncio.Task[None] | None = None

    async def apply(self, result: LoadResult) -> None:
        """Install a loaded configuration: ext_proc's routes first, so Envoy never routes to an unknown name."""
        self.last = result
        for hook in self.on_config:
            hook(result)
        options = self.settings.translate
        if options.extproc_port == 0:
            # ext_proc is served on this process's own gRPC port unless told otherwise.
            options = replace(options, extproc_port=self.port)
        try:
            translation = translate(result.config, options)
        except Exception:  # a translate bug must not stop the watcher; the last good snapshot keeps serving
            log.exception("translating the configuration failed; Envoy keeps its current configuration")
            return
        chain_needed = any(t.credentials is None for t in translation.route_table.values())
        if (chain_needed or needs_default_chain(result.config)) and self._stop is not None:
            await self._start_default_chain(self._stop)
        try:
            snapshot = Snapshot.build(translation.resources())
        except ValueError as err:  # a translate bug; keep serving the previous snapshot
            log.error("not pushing an inconsistent snapshot: %s", err)
            return
        roles = [t for t in translation.route_table.values() if t.role_arn]
        if roles:
            for t in roles:
                self.routes.roles.get(t.credentials, t.role_arn or "", t.region)
            await self.routes.roles.assume_new()
            if self._roles_task is None and self._stop is not None:
                self._roles_task = asyncio.create_task(self.routes.roles.keep_fresh(self._stop))
                self._tasks.append(self._roles_task)
        # ext_proc learns the routes before Envoy does, so Envoy never routes to a name ext_proc lacks.
        self.routes.update(translation.route_table, snapshot.versions[ROUTE_TYPE])
        self.translation = translation
        self.keep_warm.update(result.config)
        current = self.cache.snapshot
        if current is not None and current.versions == snapshot.versions:
            return  # only ext_proc's side (credentials, say) changed; Envoy has nothing new
        self.cache.set_snapshot(snapshot)
        log.info(
            "configuration applied: %d upstream(s), %d virtual service(s), %d route(s); versions %s",
            len(result.config.upstreams),
            len(result.config.virtual_services),
            len(translation.route_table),
            ",".join(f"{t.rsplit('.', 1)[-1]}={v}" for t, v in snapshot.versions.items()),
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
        await server.start()
        self.server = server
        log.info("xDS and ext_proc listening on %s:%d", self.settings.grpc_host, self.port)
        return self.port

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set: watch the folder, keep default-chain credentials fresh."""
        if self.server is None:
            await self.start()
        self._stop = stop
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

    def _leads(self) -> bool:
        # With several replicas on Kubernetes, only the Lease holder warms functions (as only it writes status).
        is_leader = getattr(self.source, "is_leader", None)
        return is_leader is None or bool(is_leader())

    def _retain_routes(self) -> None:
        self.routes.retain(self.ads.versions_in_use(ROUTE_TYPE))

    async def _start_default_chain(self, stop: asyncio.Event) -> None:
        # Only when an Upstream has no secret_ref: the chain may end at instance metadata, a network call
        # that nobody with Secrets everywhere should pay for or wait on.
        if self._chain_task is None:
            await asyncio.to_thread(self.default_chain.load)
            self._chain_task = asyncio.create_task(self.default_chain.keep_fresh(stop))
            self._tasks.append(self._chain_task)


def _log_failure(task: asyncio.Task[None]) -> None:
    # Without this a dead source would go unnoticed until shutdown: Envoy keeps its last config, nothing updates.
    if not task.cancelled() and task.exception() is not None:
        log.error("the configuration source stopped: %r", task.exception(), exc_info=task.exception())
