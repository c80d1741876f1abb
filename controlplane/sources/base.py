"""What every source shares: parsed objects in, a resolved Config out, each object's last good version kept.

A source (files, Kubernetes) reads documents its own way and hands them to `LastGood.settle`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from controlplane.model import Config, ConfigError, ObjectKey, Resolved, resolve
from controlplane.model.parse import Resource, check_jwks
from controlplane.model.resolve import ResolveMemo
from controlplane.model.resources import Endpoint, Secret, VirtualService

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

    def __init__(self, *, local_endpoint: Endpoint | None = None, base_dir: Path | None = None) -> None:
        self.local_endpoint = local_endpoint
        # Relative `jwks.file` paths are read from here (the config folder); absolute ones anywhere.
        self.base_dir = base_dir
        self._jwks: dict[ObjectKey, tuple[VirtualService, tuple[str, ...], VirtualService]] = {}
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
        failed = dict(failed or {})
        for key, (obj, origin) in list(objects.items()):
            if isinstance(obj, VirtualService) and key not in failed:
                try:
                    objects[key] = (self._read_jwks(obj), origin)
                except ConfigError as err:
                    failed[key] = err.with_context(source=where(origin))
                    parse_errors = [*parse_errors, failed[key]]
                    kept = self.get(key)
                    if kept is None:
                        del objects[key]
                    else:
                        objects[key] = kept
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

    def _read_jwks(self, vs: VirtualService) -> VirtualService:
        """A JWT authorizer's `jwks.file`, read into `jwks.inline` at every load (Envoy may run elsewhere)."""
        files = [a for a in vs.authorizers if a.jwt is not None and a.jwt.jwks.file is not None]
        if not files:
            return vs
        texts = []
        for a in files:
            assert a.jwt is not None and a.jwt.jwks.file is not None
            field_path = f"spec.authorizers.{a.name}.jwks.file"
            path = Path(a.jwt.jwks.file)
            if not path.is_absolute() and self.base_dir is not None:
                path = self.base_dir / path
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as err:
                why = err.strerror if isinstance(err, OSError) else "not UTF-8"
                raise ConfigError(f"cannot read {path}: {why}", obj=str(vs.key), field=field_path) from None
            try:
                check_jwks(text, field_path)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err.message}", obj=str(vs.key), field=field_path) from None
            texts.append(text)
        seen = self._jwks.get(vs.key)
        if seen is not None and seen[0] is vs and seen[1] == tuple(texts):
            return seen[2]  # the same object as before: nothing downstream does its work again
        by_name = dict(zip((a.name for a in files), texts, strict=True))
        authorizers = tuple(
            dataclasses.replace(
                a,
                jwt=dataclasses.replace(a.jwt, jwks=dataclasses.replace(a.jwt.jwks, inline=by_name[a.name])),
            )
            if a.jwt is not None and a.name in by_name
            else a
            for a in vs.authorizers
        )
        out = dataclasses.replace(vs, authorizers=authorizers)
        self._jwks[vs.key] = (vs, tuple(texts), out)
        return out

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
