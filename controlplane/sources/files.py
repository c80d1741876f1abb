"""The file source: a folder of the same YAML documents a user would `kubectl apply`, watched for changes.

A bad file or document is reported with its file, object and field; its last good objects keep serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
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


# libyaml when PyYAML has it: ten times faster on a large folder. A file it refuses is read again with the pure
# Python loader, so error messages stay PyYAML's own wording.
_FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# (st_ino, st_size, st_mtime_ns, st_ctime_ns): a file whose stamp is unchanged, and that no change event names, is
# not read again. os.stat follows symlinks, so a ConfigMap's `..data` swap changes the stamp of every file.
Stamp = tuple[int, int, int, int]
# One document of a file, parsed: where it is, its key if it has one, and the object or the error.
Doc = tuple[str, ObjectKey | None, Resource | None, ConfigError | None]
_MODIFIED = 2  # watchfiles.Change.modified (watchfiles is imported only by watch())


@dataclass
class _ParsedFile:
    """A file's documents parsed into objects, kept while its bytes stay the same."""

    stamp: Stamp | None
    data: bytes | None
    # The file cannot be read or is not YAML: its objects keep their last good versions.
    error: ConfigError | None
    docs: tuple[Doc, ...] = ()


class FileSource:
    """Reads a folder into a Config, remembering the last good version of every object.

    Each file's parsed documents are kept, so a reload parses only the files that changed: unchanged files give
    the very same objects, which lets resolve and translate reuse their work too.
    """

    def __init__(self, config_dir: Path, *, local_endpoint: Endpoint | None = None) -> None:
        self.config_dir = config_dir
        self.local_endpoint = local_endpoint
        self._good: LastGood[Path] = LastGood(local_endpoint=local_endpoint, base_dir=config_dir)
        self.discovery = DiscoveryState(state_path(config_dir))
        self._parsed: dict[Path, _ParsedFile] = {}
        self._listing: list[tuple[Path, str]] | None = None  # each file, and its absolute path
        self._listed: set[str] = set()
        # Upstreams merged with their discovered functions: (as parsed, record, merged), reused while both stay.
        self._merged: dict[ObjectKey, tuple[Upstream, DiscoveryRecord | None, Upstream]] = {}

    def files(self) -> list[Path]:
        if not self.config_dir.is_dir():
            return []
        found: list[tuple[tuple[str, ...], Path]] = []
        root = str(self.config_dir)
        # os.walk does not descend into symlinked folders, as Path.rglob does not; sorted like sorted(rglob()).
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = () if dirpath == root else tuple(os.path.relpath(dirpath, root).split(os.sep))
            dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.startswith(".")]
            for name in filenames:
                if name.startswith(".") or os.path.splitext(name)[1] not in CONFIG_SUFFIXES:
                    continue
                path = os.path.join(dirpath, name)
                if os.path.isfile(path):
                    found.append(((*rel_dir, name), Path(path)))
        found.sort(key=lambda item: item[0])
        return [path for _, path in found]

    def load(self, changes: Collection[tuple[int, str]] | None = None) -> LoadResult:
        """Read the folder.

        `changes` are what a watcher reported, as (watchfiles.Change, path). With them, a file that was not
        reported and whose stamp is unchanged keeps its parsed documents without being read, and the folder is
        listed again only if something other than a listed file was modified. Without them every file is read,
        and parsed again unless its bytes differ from last time."""
        started = time.perf_counter()
        parse_errors: list[ConfigError] = []
        failed: dict[ObjectKey, ConfigError] = {}
        objects: dict[ObjectKey, tuple[Resource, Path]] = {}
        # Keys defined by a document read in this pass (not carried over from the last good version).
        defined: set[ObjectKey] = set()
        if not self.config_dir.is_dir():
            parse_errors.append(ConfigError("config folder does not exist", source=str(self.config_dir)))
        listing = None if changes is None else self._listing
        reported: set[str] | None = None
        if changes is not None:
            reported = {os.path.abspath(p) for c, p in changes if c == _MODIFIED}
            if len(reported) < len(changes) or listing is None or not reported <= self._listed:
                listing = None
        if listing is None:
            # Something was added, removed or renamed (or nobody said what changed): list the folder again.
            listing = self._listing = [(p, os.path.abspath(p)) for p in self.files()]
            self._listed = {a for _, a in listing}
        parsed_now: dict[Path, _ParsedFile] = {}
        for path, abs_path in listing:
            parsed = self._parse(path, abs_path, reported)
            parsed_now[path] = parsed
            if parsed.error is not None:
                parse_errors.append(parsed.error)
                # Keep serving what this file held before it broke.
                for key, entry in self._good.entries.items():
                    if entry[1] == path and key not in objects:
                        objects[key] = entry
                continue
            for where, doc_key, obj, error in parsed.docs:
                if error is not None:
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
        self._parsed = parsed_now
        discovered = self.discovery.read()
        merged: dict[ObjectKey, tuple[Upstream, DiscoveryRecord | None, Upstream]] = {}
        for key, (obj, origin) in list(objects.items()):
            if isinstance(obj, Upstream):
                record = discovered.get((obj.namespace, obj.name))
                seen = self._merged.get(key)
                if seen is not None and seen[0] is obj and seen[1] is record:
                    with_functions = seen[2]
                else:
                    with_functions = with_discovered(obj, record)
                merged[key] = (obj, record, with_functions)
                objects[key] = (with_functions, origin)
        self._merged = merged
        parsed_at = time.perf_counter()
        result = self._good.settle(
            objects, parse_errors, failed=failed, where=lambda p: str(p.relative_to(self.config_dir))
        )
        self._good.report(result, log, str(self.config_dir))
        result.timings["parse"] = parsed_at - started
        return result

    def _parse(self, path: Path, abs_path: str, reported: set[str] | None) -> _ParsedFile:
        """A file's documents: the kept ones when the file is unchanged, else read and parsed."""
        kept = self._parsed.get(path)
        try:
            st = os.stat(abs_path)
            stamp: Stamp | None = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            stamp = None
        if (
            kept is not None
            and reported is not None
            and stamp is not None
            and kept.stamp == stamp
            and abs_path not in reported
        ):
            return kept
        rel = str(path.relative_to(self.config_dir))
        try:
            data = path.read_bytes()
        except OSError as err:
            return _ParsedFile(None, None, ConfigError(_yaml_message(err), source=rel))
        if kept is not None and kept.data == data:
            kept.stamp = stamp
            return kept
        try:
            # As read_text does: UTF-8, and universal newlines.
            text = data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
            try:
                docs = list(yaml.load_all(text, Loader=_FAST_LOADER))
            except yaml.YAMLError:
                docs = list(yaml.safe_load_all(text))  # PyYAML's own message for what libyaml refused
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            return _ParsedFile(stamp, data, ConfigError(_yaml_message(err), source=rel))
        out: list[Doc] = []
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            where = f"{rel} (document {index + 1})" if len(docs) > 1 else rel
            doc_key = object_key(doc)
            try:
                out.append((where, doc_key, parse_document(doc), None))
            except ConfigError as perr:
                error = perr.with_context(source=where, obj=str(doc_key) if doc_key else None)
                out.append((where, doc_key, None, error))
        return _ParsedFile(stamp, data, None, tuple(out))

    async def watch(
        self,
        on_change: Callable[[LoadResult], Awaitable[None]],
        *,
        stop: asyncio.Event,
        debounce_ms: int = 100,
        step_ms: int = 10,
    ) -> None:
        """Load now, then again on every change to the folder, until `stop` is set.

        A change is loaded once nothing new has happened for `step_ms` (so between one and two steps after it),
        or `debounce_ms` after the first change while changes keep coming."""
        import watchfiles

        assert watchfiles.Change.modified == _MODIFIED
        log.debug("loading %s", self.config_dir)
        await on_change(await asyncio.to_thread(self.load))
        self.config_dir.mkdir(parents=True, exist_ok=True) if not self.config_dir.exists() else None
        async for changes in watchfiles.awatch(
            self.config_dir,
            stop_event=stop,
            debounce=debounce_ms,
            step=step_ms,
            recursive=True,
            # No suffix filter: a folder moved in or out, or a ConfigMap's `..data` symlink swap, must reload too.
            watch_filter=None,
        ):
            log.debug("reloading %s: %d change(s)", self.config_dir, len(changes))
            try:
                result = await asyncio.to_thread(self.load, [(int(c), p) for c, p in changes])
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
