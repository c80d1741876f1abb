"""What every source shares: parsed objects in, a resolved Config out, each object's last good version kept.

A source (files, Kubernetes) reads documents its own way and hands them to `LastGood.settle`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from controlplane.model import Config, ConfigError, ObjectKey, Resolved, resolve
from controlplane.model.parse import Resource
from controlplane.model.resolve import ResolveMemo
from controlplane.model.resources import Endpoint, Secret

Origin = TypeVar("Origin")


@dataclass
class LoadResult:
    resolved: Resolved
    # Errors that stop a file or document from being read at all, before references are checked.
    parse_errors: list[ConfigError] = field(default_factory=list)
    # Every Secret read, used or not (the local Lambda endpoint accepts all their keys).
    secrets: list[Secret] = field(default_factory=list)
    # Every rejected object that can be named, parse and reference errors alike: what status reports.
    rejected: dict[ObjectKey, ConfigError] = field(default_factory=dict)
    # Seconds spent per phase of the load ("parse", "resolve"), for the log line and benchmarks/scale.py.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return self.resolved.config

    @property
    def errors(self) -> list[ConfigError]:
        return self.parse_errors + list(self.resolved.errors.values())


class LastGood(Generic[Origin]):
    """Remembers, per object, its last good version and where it came from (a file, a cluster object)."""

    def __init__(self, *, local_endpoint: Endpoint | None = None) -> None:
        self.local_endpoint = local_endpoint
        self.entries: dict[ObjectKey, tuple[Resource, Origin]] = {}
        self.config: Config | None = None
        self._last_error_text: list[str] = []
        self._memo = ResolveMemo()

    def get(self, key: ObjectKey) -> tuple[Resource, Origin] | None:
        return self.entries.get(key)

    def settle(
        self,
        objects: dict[ObjectKey, tuple[Resource, Origin]],
        parse_errors: list[ConfigError],
        *,
        failed: dict[ObjectKey, ConfigError] | None = None,
        where: Callable[[Origin], str | None] = lambda _origin: None,
    ) -> LoadResult:
        """Resolve references, fall back to last good versions, and remember what is good now.

        `objects` holds this pass's parsed objects plus, for those that failed to parse, their last good
        versions (the caller adds them with `get`); `failed` names the objects that failed to parse.
        """
        started = time.perf_counter()
        resolved = resolve(
            [o for o, _ in objects.values()],
            previous=self.config,
            local_endpoint=self.local_endpoint,
            memo=self._memo,
        )
        for key in list(resolved.errors):
            if key in objects:
                resolved.errors[key] = resolved.errors[key].with_context(source=where(objects[key][1]))
        served: list[Resource] = [
            *resolved.config.upstreams,
            *resolved.config.virtual_services,
            *resolved.config.secrets,
        ]
        accepted = {o.key for o in served}
        failed = failed or {}
        entries: dict[ObjectKey, tuple[Resource, Origin]] = {}
        for key, entry in objects.items():
            if key in resolved.kept_previous or key in failed:
                if key in self.entries:
                    entries[key] = self.entries[key]
            elif key in accepted or (key.kind == "Secret" and key not in resolved.errors):
                # Secrets are not in Config unless used; every parsed one counts as good.
                entries[key] = entry
        self.entries = entries
        self.config = resolved.config
        secrets = [o for o, _ in objects.values() if isinstance(o, Secret)]
        rejected = {**failed, **resolved.errors}
        return LoadResult(
            resolved, parse_errors, secrets, rejected, timings={"resolve": time.perf_counter() - started}
        )

    def report(self, result: LoadResult, log: logging.Logger, what: str) -> None:
        """Log rejections once per change of the set of errors, not on every reload."""
        text = sorted(str(e) for e in result.errors)
        if text == self._last_error_text:
            return
        self._last_error_text = text
        if not text:
            log.info("configuration in %s is valid", what)
        for line in text:
            log.error("rejected: %s", line)
        for key in sorted(result.resolved.kept_previous | (set(result.rejected) & set(self.entries))):
            log.warning("%s: still serving its last good version", key)
