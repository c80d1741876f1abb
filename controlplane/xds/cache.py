"""An immutable xDS snapshot with a version per resource type, and a cache that streams wait on.

Knows nothing of Lambda: resources are protobuf messages keyed by type URL and name.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from google.protobuf.message import Message

CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
# ADS sends in this order so that nothing Envoy receives refers to something it has not got yet.
TYPE_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)


class InconsistentSnapshot(ValueError):
    pass


@dataclass(frozen=True)
class Snapshot:
    resources: Mapping[str, Mapping[str, Message]]
    versions: Mapping[str, str]
    # Serialized form, computed once per snapshot rather than once per stream.
    serialized: Mapping[str, Mapping[str, bytes]] = field(repr=False)

    @classmethod
    def build(cls, resources: Mapping[str, Mapping[str, Message]]) -> Snapshot:
        versions: dict[str, str] = {}
        serialized: dict[str, dict[str, bytes]] = {}
        for type_url, by_name in resources.items():
            digest = hashlib.sha256()
            ser: dict[str, bytes] = {}
            for name in sorted(by_name):
                data = by_name[name].SerializeToString(deterministic=True)
                ser[name] = data
                digest.update(name.encode())
                digest.update(b"\0")
                digest.update(hashlib.sha256(data).digest())
            serialized[type_url] = ser
            # A content hash: the same resources always get the same version, so an unchanged type is never resent.
            versions[type_url] = digest.hexdigest()[:16]
        snap = cls(
            MappingProxyType({k: MappingProxyType(dict(v)) for k, v in resources.items()}),
            MappingProxyType(versions),
            MappingProxyType({k: MappingProxyType(v) for k, v in serialized.items()}),
        )
        snap.check_consistency()
        return snap

    def check_consistency(self) -> None:
        """Every route configuration a listener names must be in the snapshot (go-control-plane's rule)."""
        from envoy.extensions.filters.network.http_connection_manager.v3 import (
            http_connection_manager_pb2 as hcm_pb2,
        )

        routes = self.resources.get(ROUTE_TYPE, {})
        for lname, listener in self.resources.get(LISTENER_TYPE, {}).items():
            for chain in getattr(listener, "filter_chains", []):
                for flt in chain.filters:
                    hcm = hcm_pb2.HttpConnectionManager()
                    if flt.typed_config.Is(hcm.DESCRIPTOR) and flt.typed_config.Unpack(hcm):
                        if hcm.HasField("rds") and hcm.rds.route_config_name not in routes:
                            raise InconsistentSnapshot(
                                f"listener {lname} names route configuration {hcm.rds.route_config_name!r}, "
                                "which the snapshot lacks"
                            )


class SnapshotCache:
    """Holds the current snapshot; streams wait for a newer one."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._serial = 0
        self._changed = asyncio.Event()

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    @property
    def serial(self) -> int:
        return self._serial

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self._serial += 1
        # Wake every waiting stream at once; each then compares versions itself.
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_newer(self, serial: int) -> int:
        while self._serial <= serial:
            await self._changed.wait()
        return self._serial
