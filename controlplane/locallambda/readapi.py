"""The read-only Lambda control-plane APIs over a FunctionRegistry, in AWS's response shapes.

ListFunctions, ListVersionsByFunction, ListAliases, GetFunction and ListTags, answered as the JSON bodies
AWS returns (botocore's lambda 2015-03-31 model). Routing, SigV4 and HTTP stay in the server; this module
turns a function name and query parameters into a response body or an ApiError.

Pages are cut from the registry's sorted name list by bisection, so one call costs O(page), whatever the
number of functions. Markers are opaque (URL-safe base64 of the last key returned) and stable: the next
page starts after that key even if functions were added or removed in between.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from .functions import (
    ACCOUNT_ID,
    DEFAULT_REGION,
    LATEST,
    SYNTHETIC_SOURCE,
    CodeDigest,
    FunctionRegistry,
    FunctionSpec,
    function_arn,
    handler_module,
    split_function_name,
    version_order,
)

# Lambda answers at most 50 items per list call, whatever MaxItems asks for (up to the model's 10,000).
PAGE_LIMIT = 50
MAX_ITEMS_LIMIT = 10_000
RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
MEMORY_SIZE_MB = 128

_T = TypeVar("_T")
RunBlocking = Callable[[Callable[[], _T]], Awaitable[_T]]

_SYNTHETIC_DIGEST: CodeDigest = (
    base64.b64encode(hashlib.sha256(SYNTHETIC_SOURCE).digest()).decode("ascii"),
    len(SYNTHETIC_SOURCE),
)
_BAD_MARKER = "Invalid pagination marker."


class ApiError(Exception):
    """An error answer: HTTP status, AWS error code (x-amzn-ErrorType) and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _invalid(message: str) -> ApiError:
    return ApiError(400, "InvalidParameterValueException", message)


def _last_modified(mtime_ns: int) -> str:
    # Lambda's format: 2024-01-02T03:04:05.678+0000
    stamp = datetime.fromtimestamp(mtime_ns / 1e9, timezone.utc)
    return stamp.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+0000"


def _revision_id(*parts: object) -> str:
    """A RevisionId that changes exactly when what it describes changes (AWS's is a random UUID)."""
    digest = hashlib.sha256(json.dumps(parts, default=str).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def encode_marker(kind: str, *key: str) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_marker(marker: str | None, kind: str, arity: int) -> list[str] | None:
    """The key a marker of `kind` carries, None for no marker; a foreign or forged one is a 400."""
    if not marker:
        return None
    try:
        raw = base64.urlsafe_b64decode(marker + "=" * (-len(marker) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _invalid(_BAD_MARKER) from None
    if (
        not isinstance(value, list)
        or len(value) != arity + 1
        or value[0] != kind
        or not all(isinstance(part, str) for part in value)
    ):
        raise _invalid(_BAD_MARKER)
    return value[1:]


def page_size(params: Mapping[str, str]) -> int:
    raw = params.get("MaxItems")
    if raw is None:
        return PAGE_LIMIT
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10:
        raise _invalid(
            f"Value '{raw[:32]}' at 'maxItems' failed to satisfy constraint: Member must be an integer"
        )
    value = int(raw)
    if value < 1:
        raise _invalid(
            f"1 validation error detected: Value '{value}' at 'maxItems' failed to satisfy constraint: "
            "Member must have value greater than or equal to 1"
        )
    if value > MAX_ITEMS_LIMIT:
        raise _invalid(
            f"1 validation error detected: Value '{value}' at 'maxItems' failed to satisfy constraint: "
            f"Member must have value less than or equal to {MAX_ITEMS_LIMIT}"
        )
    return min(value, PAGE_LIMIT)


def _page(items: list[_T], size: int) -> tuple[list[_T], bool]:
    """`items` holds up to size + 1 candidates: the page, and whether anything follows it."""
    return items[:size], len(items) > size


class ReadApi:
    """Answers the read APIs from a registry. `run_blocking` runs file reads off the event loop."""

    def __init__(
        self, registry: FunctionRegistry, region: str | None, run_blocking: RunBlocking[Any]
    ) -> None:
        self._registry = registry
        self._region = region or DEFAULT_REGION
        self._run_blocking = run_blocking

    # --- the operations --------------------------------------------------------------------------------

    async def list_functions(self, params: Mapping[str, str]) -> dict[str, Any]:
        function_version = params.get("FunctionVersion")
        if function_version is not None and function_version != "ALL":
            raise ApiError(
                400,
                "ValidationException",
                f"1 validation error detected: Value '{function_version[:64]}' at 'functionVersion' failed "
                "to satisfy constraint: Member must satisfy enum value set: [ALL]",
            )
        size = page_size(params)
        registry = self._registry
        registry.refresh_if_changed()
        if params.get("MasterRegion"):
            if function_version != "ALL":
                raise _invalid("FunctionVersion must be ALL when MasterRegion is set.")
            return {"Functions": []}  # no Lambda@Edge replicas here
        names, specs = registry.sorted_names, registry.functions
        entries: list[tuple[FunctionSpec, str]] = []
        if function_version == "ALL":
            marker = decode_marker(params.get("Marker"), "functions-all", 2)
            after = (marker[0], _marker_order(marker[1])) if marker else None
            index = registry.names_after(marker[0] if marker else None, inclusive=True)
            while index < len(names) and len(entries) <= size:
                spec = specs[names[index]]
                index += 1
                for version in (LATEST, *spec.versions):
                    if after is not None and spec.name == after[0] and version_order(version) <= after[1]:
                        continue
                    entries.append((spec, version))
                    if len(entries) > size:
                        break
            page, more = _page(entries, size)
            digests = await self._digests(page)
            body: dict[str, Any] = {
                "Functions": [self._configuration(spec, v, v, digests, full=False) for spec, v in page]
            }
            if more:
                last_spec, last_version = page[-1]
                body["NextMarker"] = encode_marker("functions-all", last_spec.name, last_version)
            return body

        marker = decode_marker(params.get("Marker"), "functions", 1)
        start = registry.names_after(marker[0] if marker else None)
        entries = [(specs[name], LATEST) for name in names[start : start + size + 1]]
        page, more = _page(entries, size)
        digests = await self._digests(page)
        body = {"Functions": [self._configuration(spec, v, None, digests, full=False) for spec, v in page]}
        if more:
            body["NextMarker"] = encode_marker("functions", page[-1][0].name)
        return body

    async def list_versions(self, function_name: str, params: Mapping[str, str]) -> dict[str, Any]:
        size = page_size(params)
        spec = self._function(function_name)
        marker = decode_marker(params.get("Marker"), "versions", 1)
        after = _marker_order(marker[0]) if marker else None
        entries: list[tuple[FunctionSpec, str]] = []
        for version in (LATEST, *spec.versions):
            if after is not None and version_order(version) <= after:
                continue
            entries.append((spec, version))
            if len(entries) > size:
                break
        page, more = _page(entries, size)
        digests = await self._digests(page)
        body: dict[str, Any] = {
            "Versions": [self._configuration(spec, v, v, digests, full=False) for spec, v in page]
        }
        if more:
            body["NextMarker"] = encode_marker("versions", page[-1][1])
        return body

    async def list_aliases(self, function_name: str, params: Mapping[str, str]) -> dict[str, Any]:
        size = page_size(params)
        spec = self._function(function_name)
        marker = decode_marker(params.get("Marker"), "aliases", 1)
        wanted_version = params.get("FunctionVersion") or None
        entries: list[str] = []
        for alias, version in spec.aliases.items():  # ordered by name
            if (marker and alias <= marker[0]) or (wanted_version is not None and version != wanted_version):
                continue
            entries.append(alias)
            if len(entries) > size:
                break
        page, more = _page(entries, size)
        body: dict[str, Any] = {"Aliases": [self._alias(spec, alias) for alias in page]}
        if more:
            body["NextMarker"] = encode_marker("aliases", page[-1])
        return body

    async def get_function(self, function_name: str, params: Mapping[str, str]) -> dict[str, Any]:
        split = split_function_name(function_name, self._registry.region)
        query_qualifier = params.get("Qualifier") or None
        if split is None:
            raise self.not_found(function_name, query_qualifier)
        name, qualifier = split
        if query_qualifier:
            if qualifier is not None and qualifier != query_qualifier:
                raise _invalid(
                    "The derived qualifier from the function name does not match the specified qualifier."
                )
            qualifier = query_qualifier
        self._registry.refresh_if_changed()
        spec = self._registry.functions.get(name)
        if spec is None:
            raise self.not_found(name, None)
        version = LATEST if qualifier in (None, LATEST) else qualifier
        assert version is not None
        if version in spec.aliases:
            version = spec.aliases[version]
        elif version != LATEST and version not in spec.versions:
            raise self.not_found(name, qualifier)
        digests = await self._digests([(spec, version)])
        body: dict[str, Any] = {
            "Configuration": self._configuration(spec, version, qualifier, digests, full=True),
            "Code": {"RepositoryType": "S3", "Location": self._code_location(spec, version)},
        }
        if spec.tags:  # AWS leaves Tags out for a function without any
            body["Tags"] = dict(spec.tags)
        return body

    async def list_tags(self, resource: str) -> dict[str, Any]:
        parts = resource.split(":")
        if len(parts) not in (7, 8) or parts[0] != "arn" or parts[2] != "lambda" or parts[5] != "function":
            raise ApiError(
                400,
                "ValidationException",
                f"1 validation error detected: Value '{resource[:256]}' at 'resource' failed to satisfy "
                "constraint: Member must satisfy regular expression pattern: "
                r"arn:(aws[a-zA-Z-]*):lambda:[a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:\d{12}:"
                r"function:[a-zA-Z0-9-_]+(:(\$LATEST|[a-zA-Z0-9-_]+))?",
            )
        if len(parts) == 8:
            raise _invalid(
                "Tags on function aliases and versions are not supported. Please specify a function ARN."
            )
        split = split_function_name(resource, self._registry.region)
        if split is None:
            raise self.not_found(parts[6], None)
        self._registry.refresh_if_changed()
        spec = self._registry.functions.get(split[0])
        if spec is None:
            raise self.not_found(split[0], None)
        return {"Tags": dict(spec.tags)}

    def not_found(self, name: str, qualifier: str | None) -> ApiError:
        # Name and qualifier may be unvalidated client input here; keep the echo bounded.
        arn = function_arn(self._region, name[:256], qualifier[:128] if qualifier else None)
        return ApiError(404, "ResourceNotFoundException", f"Function not found: {arn}")

    # --- shapes ----------------------------------------------------------------------------------------

    def _function(self, function_name: str) -> FunctionSpec:
        """The function an unqualified FunctionName names (ListVersionsByFunction, ListAliases)."""
        split = split_function_name(function_name, self._registry.region)
        if split is None:
            raise self.not_found(function_name, None)
        name, qualifier = split
        if qualifier is not None:
            raise _invalid(f"Unsupported qualifier {qualifier[:128]!r}: specify the function without one.")
        self._registry.refresh_if_changed()
        spec = self._registry.functions.get(name)
        if spec is None:
            raise self.not_found(name, None)
        return spec

    async def _digests(self, page: Iterable[tuple[FunctionSpec, str]]) -> dict[str, CodeDigest]:
        """Code digests of the page's modules; the ones not cached yet are computed off the loop."""
        registry = self._registry
        digests: dict[str, CodeDigest] = {}
        missing: set[str] = set()
        for spec, version in page:
            if spec.builtin is not None:
                continue
            module = handler_module(_handler_ref(spec, version))
            if module in digests or module in missing:
                continue
            cached = registry.cached_code_digest(module)
            if cached is None:
                missing.add(module)
            else:
                digests[module] = cached
        if missing:
            computed: dict[str, CodeDigest] = await self._run_blocking(
                lambda: {module: registry.code_digest(module) for module in sorted(missing)}
            )
            digests.update(computed)
        return digests

    def _configuration(
        self,
        spec: FunctionSpec,
        version: str,
        arn_qualifier: str | None,
        digests: Mapping[str, CodeDigest],
        *,
        full: bool,
    ) -> dict[str, Any]:
        """A FunctionConfiguration. Lists carry the subset AWS lists; `full` adds GetFunction's state fields."""
        ref = _handler_ref(spec, version)
        module = None if spec.builtin is not None else handler_module(ref)
        sha256, size = _SYNTHETIC_DIGEST if module is None else digests[module]
        description = (
            spec.description
            if version == LATEST
            else spec.version_descriptions.get(version, spec.description)
        )
        timeout = max(1, math.ceil(spec.timeout))
        config: dict[str, Any] = {
            "FunctionName": spec.name,
            "FunctionArn": function_arn(self._region, spec.name, arn_qualifier),
            "Runtime": RUNTIME,
            "Role": f"arn:aws:iam::{ACCOUNT_ID}:role/lambdagate-local",
            "Handler": ref,
            "CodeSize": size,
            "Description": description,
            "Timeout": timeout,
            "MemorySize": MEMORY_SIZE_MB,
            "LastModified": _last_modified(
                self._registry.started_ns if module is None else self._registry.mtime_ns(module)
            ),
            "CodeSha256": sha256,
            "Version": version,
            "TracingConfig": {"Mode": "PassThrough"},
            "RevisionId": _revision_id(spec.name, version, ref, sha256, description, timeout),
            "PackageType": "Zip",
            "Architectures": ["x86_64"],
            "EphemeralStorage": {"Size": 512},
            "SnapStart": {"ApplyOn": "None", "OptimizationStatus": "Off"},
            "LoggingConfig": {"LogFormat": "Text", "LogGroup": f"/aws/lambda/{spec.name}"},
        }
        if full:
            config["State"] = "Active"
            config["LastUpdateStatus"] = "Successful"
            runtime_hash = hashlib.sha256(RUNTIME.encode()).hexdigest()
            config["RuntimeVersionConfig"] = {
                "RuntimeVersionArn": f"arn:aws:lambda:{self._region}::runtime:{runtime_hash}"
            }
        return config

    def _alias(self, spec: FunctionSpec, alias: str) -> dict[str, Any]:
        version = spec.aliases[alias]
        description = spec.alias_descriptions.get(alias, "")
        return {
            "AliasArn": function_arn(self._region, spec.name, alias),
            "Name": alias,
            "FunctionVersion": version,
            "Description": description,
            "RevisionId": _revision_id(spec.name, alias, version, description),
        }

    def _code_location(self, spec: FunctionSpec, version: str) -> str:
        if spec.builtin is not None:
            return f"builtin:{spec.name}"
        module = handler_module(_handler_ref(spec, version))
        return (self._registry.folder / f"{module}.py").absolute().as_uri()


def _handler_ref(spec: FunctionSpec, version: str) -> str:
    return spec.handler if version == LATEST else spec.versions[version]


def _marker_order(version: str) -> tuple[int, str]:
    if version == LATEST or (version.isascii() and version.isdigit() and len(version) <= 10):
        return version_order(version)
    raise _invalid(_BAD_MARKER)
