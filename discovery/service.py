"""`lambdagate discover`: the worker fed by a folder or the cluster, with leader election on Kubernetes."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

from controlplane.model.resources import Endpoint
from controlplane.sources.base import LoadResult
from discovery.lister import Lister
from discovery.worker import DEFAULT_INTERVAL_S, MAX_RECORD_BYTES, DiscoveryWorker, FileStore, StatusStore

log = logging.getLogger("lambdagate.discovery")

LEASE_NAME = "lambdagate-discovery"
# AWS's default quota for Lambda's control-plane API is 15 requests per second per account and region,
# shared with every deploy tool. Two thirds of it leaves them room.
DEFAULT_RATE_PER_S = 10.0
DEFAULT_CONCURRENCY = 8

_DURATION_RE = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str) -> float:
    """`5m`, `90s`, `1h30m` or plain seconds `300`; at least one second."""
    m = _DURATION_RE.fullmatch(text)
    if m is None or not any(m.groups()):
        raise ValueError(f"{text!r} is not a duration such as 5m, 90s or 1h")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total < 1:
        raise ValueError(f"{text!r} is shorter than one second")
    return total


@dataclass
class DiscoverOptions:
    config_dir: Path | None = None
    kubernetes: object | None = None  # controlplane.sources.kubernetes.KubeSettings
    local_endpoint: Endpoint | None = None
    interval_s: float = DEFAULT_INTERVAL_S
    once: bool = False
    rate_per_s: float = DEFAULT_RATE_PER_S
    max_concurrency: int = DEFAULT_CONCURRENCY
    max_record_bytes: int = MAX_RECORD_BYTES


def make_lister(options: DiscoverOptions) -> Lister:
    return Lister(max_concurrency=options.max_concurrency, rate_per_s=options.rate_per_s)


async def run_discover(options: DiscoverOptions, stop: asyncio.Event) -> int:
    if options.kubernetes is not None:
        return await _run_kubernetes(options, stop)
    assert options.config_dir is not None
    from controlplane.sources.files import FileSource

    source = FileSource(options.config_dir, local_endpoint=options.local_endpoint)
    worker = DiscoveryWorker(
        FileStore(options.config_dir),
        make_lister(options),
        interval_s=options.interval_s,
        max_record_bytes=options.max_record_bytes,
    )
    if options.once:
        result = await asyncio.to_thread(source.load)
        worker.update(result.config)
        return 0 if await worker.run_once() else 1

    async def on_change(result: LoadResult) -> None:
        worker.update(result.config)

    watcher = asyncio.create_task(source.watch(on_change, stop=stop))
    try:
        await worker.run(stop)
    finally:
        stop.set()
        await asyncio.gather(watcher, return_exceptions=True)
    return 0


async def _run_kubernetes(options: DiscoverOptions, stop: asyncio.Event) -> int:
    from controlplane.sources.kubernetes import KubeClient, KubernetesSource, KubeSettings

    settings = options.kubernetes
    assert isinstance(settings, KubeSettings)
    client = await asyncio.to_thread(KubeClient, settings)
    # The worker writes only its own status fields; the control plane writes the rest.
    source = KubernetesSource(
        replace(settings, write_status=False, lease_namespace=None),
        local_endpoint=options.local_endpoint,
        client=client,
    )
    elector = None
    if settings.lease_namespace and not options.once:
        from controlplane.sources.lease import LeaseElector

        elector = LeaseElector(client, settings.lease_namespace, LEASE_NAME, settings.identity)
        elector.start()
    worker = DiscoveryWorker(
        StatusStore(source),
        make_lister(options),
        interval_s=options.interval_s,
        max_record_bytes=options.max_record_bytes,
        is_leader=elector.is_leader if elector is not None else None,
    )
    loaded = asyncio.Event()

    async def on_change(result: LoadResult) -> None:
        worker.update(result.config)
        loaded.set()

    watch_stop = asyncio.Event()
    watcher = asyncio.create_task(source.watch(on_change, stop=watch_stop))
    try:
        if options.once:
            waiter = asyncio.create_task(loaded.wait())
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not loaded.is_set():
                log.error("reading the cluster failed")
                return 1
            return 0 if await worker.run_once() else 1
        await worker.run(stop)
        return 0
    finally:
        watch_stop.set()
        await asyncio.gather(watcher, return_exceptions=True)
        if elector is not None:
            await asyncio.to_thread(elector.stop)
