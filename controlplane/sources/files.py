"""The file source: a folder of the same YAML documents a user would `kubectl apply`, watched for changes.

A bad file or document is reported with its file, object and field; its last good objects keep serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from controlplane.model import ConfigError, ObjectKey
from controlplane.model.discovered import DiscoveryRecord, parse_record, with_discovered
from controlplane.model.parse import Resource, object_key, parse_document
from controlplane.model.resources import Endpoint, Upstream
from controlplane.sources.base import LastGood, LoadResult

__all__ = ["FileSource", "LoadResult"]

log = logging.getLogger("lambdagate.sources.files")

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Sub-folders that hold other things than resources: handlers for the local endpoint, discovery state.
SKIPPED_DIRS = ("functions", ".lambdagate")
# What `lambdagate discover` found for each Upstream of the folder: the file source's stand-in for status.
STATE_DIR = ".lambdagate"
STATE_FILE = "discovery.json"


def state_path(config_dir: Path) -> Path:
    return config_dir / STATE_DIR / STATE_FILE


class DiscoveryState:
    """Reads the discovery state file, keeping the last good reading when it is broken or half-written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: dict[tuple[str, str], DiscoveryRecord] = {}
        self.raw: dict[str, Any] = {}
        self._stamp: tuple[int, int] | None = None
        self._reported: str | None = None

    def read(self) -> dict[tuple[str, str], DiscoveryRecord]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self.records, self.raw, self._stamp = {}, {}, None
            return self.records
        except OSError:
            return self.records
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return self.records
        self._stamp = stamp
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            upstreams = doc.get("upstreams") if isinstance(doc, dict) else None
            if not isinstance(upstreams, dict):
                raise ValueError("'upstreams' must be a mapping of namespace/name to what was found")
        except (OSError, ValueError, UnicodeDecodeError) as err:
            self._report(f"{self.path}: cannot be read ({err}); keeping the functions read before")
            return self.records
        records: dict[tuple[str, str], DiscoveryRecord] = {}
        problems: list[str] = []
        for key, entry in upstreams.items():
            namespace, _, name = str(key).partition("/")
            record, found = parse_record(entry)
            problems += [f"Upstream {key}: {p}" for p in found]
            if record is not None and name:
                records[(namespace, name)] = record
        self._report("; ".join(problems) if problems else None)
        self.records, self.raw = records, upstreams
        return records

    def _report(self, text: str | None) -> None:
        if text != self._reported and text:
            log.error("discovery state %s: %s", self.path, text)
        self._reported = text


class FileSource:
    """Reads a folder into a Config, remembering the last good version of every object."""

    def __init__(self, config_dir: Path, *, local_endpoint: Endpoint | None = None) -> None:
        self.config_dir = config_dir
        self.local_endpoint = local_endpoint
        self._good: LastGood[Path] = LastGood(local_endpoint=local_endpoint)
        self.discovery = DiscoveryState(state_path(config_dir))

    def files(self) -> list[Path]:
        if not self.config_dir.is_dir():
            return []
        out = []
        for path in sorted(self.config_dir.rglob("*")):
            rel = path.relative_to(self.config_dir)
            if any(part in SKIPPED_DIRS or part.startswith(".") for part in rel.parts[:-1]):
                continue
            if path.suffix in CONFIG_SUFFIXES and path.is_file() and not path.name.startswith("."):
                out.append(path)
        return out

    def load(self) -> LoadResult:
        parse_errors: list[ConfigError] = []
        failed: dict[ObjectKey, ConfigError] = {}
        objects: dict[ObjectKey, tuple[Resource, Path]] = {}
        # Keys defined by a document read in this pass (not carried over from the last good version).
        defined: set[ObjectKey] = set()
        if not self.config_dir.is_dir():
            parse_errors.append(ConfigError("config folder does not exist", source=str(self.config_dir)))
        for path in self.files():
            rel = str(path.relative_to(self.config_dir))
            try:
                docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
            except (yaml.YAMLError, UnicodeDecodeError, OSError) as err:
                parse_errors.append(ConfigError(_yaml_message(err), source=rel))
                # Keep serving what this file held before it broke.
                for key, entry in self._good.entries.items():
                    if entry[1] == path and key not in objects:
                        objects[key] = entry
                continue
            for index, doc in enumerate(docs):
                if doc is None:
                    continue
                where = f"{rel} (document {index + 1})" if len(docs) > 1 else rel
                doc_key = object_key(doc)
                try:
                    obj = parse_document(doc)
                except ConfigError as perr:
                    error = perr.with_context(source=where, obj=str(doc_key) if doc_key else None)
                    parse_errors.append(error)
                    if doc_key is not None:
                        failed[doc_key] = error
                        previous = self._good.get(doc_key)
                        if previous is not None and doc_key not in objects:
                            objects[doc_key] = previous
                    continue
                if obj is None:
                    continue
                # A second definition, in another file or the same one, never silently replaces the first.
                if obj.key in objects and (objects[obj.key][1] != path or obj.key in defined):
                    other = objects[obj.key][1].relative_to(self.config_dir)
                    parse_errors.append(
                        ConfigError(
                            f"also defined in {other}; the first definition wins",
                            source=where,
                            obj=str(obj.key),
                        )
                    )
                    continue
                objects[obj.key] = (obj, path)
                defined.add(obj.key)
        discovered = self.discovery.read()
        for key, (obj, origin) in list(objects.items()):
            if isinstance(obj, Upstream):
                objects[key] = (with_discovered(obj, discovered.get((obj.namespace, obj.name))), origin)
        result = self._good.settle(
            objects, parse_errors, failed=failed, where=lambda p: str(p.relative_to(self.config_dir))
        )
        self._good.report(result, log, str(self.config_dir))
        return result

    async def watch(
        self,
        on_change: Callable[[LoadResult], Awaitable[None]],
        *,
        stop: asyncio.Event,
        debounce_ms: int = 100,
    ) -> None:
        """Load now, then again on every change to the folder, until `stop` is set."""
        import watchfiles

        await on_change(await asyncio.to_thread(self.load))
        self.config_dir.mkdir(parents=True, exist_ok=True) if not self.config_dir.exists() else None
        async for _changes in watchfiles.awatch(
            self.config_dir,
            stop_event=stop,
            debounce=debounce_ms,
            step=50,
            recursive=True,
            # No suffix filter: a folder moved in or out, or a ConfigMap's `..data` symlink swap, must reload too.
            watch_filter=None,
        ):
            try:
                result = await asyncio.to_thread(self.load)
            except Exception:  # a reload must never kill the watcher
                log.exception("reloading %s failed", self.config_dir)
                continue
            await on_change(result)


def _yaml_message(err: Exception) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    if mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: invalid YAML: {problem}"
    return f"cannot be read: {problem}"
