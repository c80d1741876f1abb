"""What function discovery found for one Upstream, as it is stored: the Upstream's status, or the state file.

The record is compact: one entry per Lambda function with its published versions and its aliases, so 10,000
functions stay well under etcd's object size limit. `routable()` expands it into the logical names routes use:
`fn` ($LATEST), `fn:3` (a version) and `fn:live` (an alias).

`parse_record` reads a stored record leniently: an entry that is not valid is skipped and reported with its
field, and the rest still counts, because status is written by a program and must never take routes down.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from controlplane.model.resources import FUNCTION_NAME_RE, Function, Upstream

# The discovery states an Upstream's status can report.
LISTED = "Listed"  # the last listing succeeded
FAILED = "Failed"  # the last listing failed; the functions are the last known ones
TOO_LARGE = "TooLarge"  # the listing succeeded but is too large to store; the last known functions are kept
STATES = (LISTED, FAILED, TOO_LARGE)

_NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,140}$")
_VERSION_RE = re.compile(r"^[0-9]{1,20}$")
_ALIAS_RE = re.compile(r"^(?!^[0-9]+$)[a-zA-Z0-9_-]{1,128}$")
_MAX_TEXT = 1000


@dataclass(frozen=True)
class ListedFunction:
    """One Lambda function as listed: its published versions and its aliases (alias, version)."""

    function_name: str
    versions: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()

    def logical(self) -> list[Function]:
        fns = [Function(self.function_name, self.function_name)]
        fns += [Function(f"{self.function_name}:{v}", self.function_name, v) for v in self.versions]
        fns += [Function(f"{self.function_name}:{a}", self.function_name, a) for a, _ in self.aliases]
        return fns


@dataclass(frozen=True)
class DiscoveryRecord:
    state: str
    # The AWS (or our) error code of the last failure, such as AccessDeniedException; "" after a success.
    reason: str = ""
    message: str = ""
    functions: tuple[ListedFunction, ...] = ()

    def routable(self) -> tuple[Function, ...]:
        out: list[Function] = []
        for fn in self.functions:
            out.extend(fn.logical())
        return tuple(out)

    def name_count(self) -> int:
        return sum(1 + len(f.versions) + len(f.aliases) for f in self.functions)

    def to_status(self) -> dict[str, Any]:
        """The `discovery` and `functions` fields of status (and of the state file), sorted and stable."""
        discovery: dict[str, Any] = {"state": self.state}
        if self.reason:
            discovery["reason"] = self.reason
        if self.message:
            discovery["message"] = self.message
        discovery["functionCount"] = len(self.functions)
        discovery["names"] = self.name_count()
        functions: list[dict[str, Any]] = []
        for fn in sorted(self.functions, key=lambda f: f.function_name):
            entry: dict[str, Any] = {"function_name": fn.function_name}
            if fn.versions:
                entry["versions"] = sorted(fn.versions, key=_version_key)
            if fn.aliases:
                entry["aliases"] = dict(sorted(fn.aliases))
            functions.append(entry)
        return {"discovery": discovery, "functions": functions}


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (1 << 62, version)


def parse_record(status: Any) -> tuple[DiscoveryRecord | None, list[str]]:
    """A record from a status (or state-file entry) mapping; None if discovery never wrote one.

    Returns the record and the problems found, each naming its field (status.functions[3].versions[0]: ...).
    """
    if not isinstance(status, Mapping):
        return None, []
    problems: list[str] = []
    raw_discovery = status.get("discovery")
    raw_functions = status.get("functions")
    if raw_discovery is None and raw_functions is None:
        return None, []
    state, reason, message = FAILED, "", ""
    if isinstance(raw_discovery, Mapping):
        state = str(raw_discovery.get("state") or "")
        if state not in STATES:
            problems.append(f"status.discovery.state: {state!r} is not one of {', '.join(STATES)}")
            state = FAILED
        reason = _text(raw_discovery.get("reason"))
        message = _text(raw_discovery.get("message"))
    elif raw_discovery is not None:
        problems.append("status.discovery: must be a mapping")
    functions: list[ListedFunction] = []
    if raw_functions is not None and not isinstance(raw_functions, list):
        problems.append("status.functions: must be a list")
        raw_functions = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_functions or ()):
        where = f"status.functions[{i}]"
        fn, problem = _parse_listed(raw, where)
        if problem:
            problems.append(problem)
        if fn is None:
            continue
        if fn.function_name in seen:
            problems.append(f"{where}.function_name: {fn.function_name!r} appears twice; the first counts")
            continue
        seen.add(fn.function_name)
        functions.append(fn)
    return DiscoveryRecord(state, reason, message, tuple(functions)), problems


def _parse_listed(raw: Any, where: str) -> tuple[ListedFunction | None, str | None]:
    if not isinstance(raw, Mapping):
        return None, f"{where}: must be a mapping"
    name = raw.get("function_name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or not FUNCTION_NAME_RE.fullmatch(name):
        return None, f"{where}.function_name: {name!r} is not a Lambda function name"
    problem: str | None = None
    versions: list[str] = []
    raw_versions = raw.get("versions") or []
    for j, v in enumerate(raw_versions if isinstance(raw_versions, list) else ()):
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and _VERSION_RE.fullmatch(v):
            versions.append(v)
        else:
            problem = problem or f"{where}.versions[{j}]: {v!r} is not a version number"
    if not isinstance(raw_versions, list):
        problem = f"{where}.versions: must be a list"
    aliases: list[tuple[str, str]] = []
    raw_aliases = raw.get("aliases") or {}
    if isinstance(raw_aliases, Mapping):
        for alias, target in raw_aliases.items():
            if isinstance(alias, str) and _ALIAS_RE.fullmatch(alias) and isinstance(target, (str, int)):
                aliases.append((alias, str(target)))
            else:
                problem = problem or f"{where}.aliases.{alias}: not an alias name mapped to a version"
    else:
        problem = problem or f"{where}.aliases: must be a mapping of alias to version"
    return ListedFunction(name, tuple(dict.fromkeys(versions)), tuple(sorted(aliases))), problem


def _text(value: Any) -> str:
    return str(value)[:_MAX_TEXT] if isinstance(value, (str, int)) and value != "" else ""


def with_discovered(upstream: Upstream, record: DiscoveryRecord | None) -> Upstream:
    """The Upstream with the discovered functions it may route to (none when it opted out of discovery)."""
    if record is None or not upstream.discovery.enabled:
        return upstream if not upstream.discovered else replace(upstream, discovered=())
    return replace(upstream, discovered=record.routable())
