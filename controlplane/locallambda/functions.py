"""Python Lambda handlers kept in a folder: discovery, functions.yaml, qualifiers and module loading.

The local Invoke server asks this registry which handler a function name and qualifier resolve to.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import importlib.util
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

import yaml

ACCOUNT_ID = "000000000000"
DEFAULT_REGION = "us-east-1"
DEFAULT_TIMEOUT_S = 3.0
MAX_TIMEOUT_S = 900.0
LATEST = "$LATEST"
CONFIG_FILES = ("functions.yaml", "functions.yml")
MAX_DESCRIPTION = 256
MAX_TAGS = 50
SYNTHETIC_PREFIX = "synth-"
SYNTHETIC_HANDLER = "lambda_function.lambda_handler"
# What a synthetic function "deploys": its CodeSha256 and CodeSize are this text's.
SYNTHETIC_SOURCE = b"def lambda_handler(event, context):\n    return event\n"

FUNCTION_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
QUALIFIER_RE = re.compile(r"\$LATEST|[A-Za-z0-9_-]{1,128}")
_VERSION_RE = re.compile(r"[0-9]{1,10}")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_ATTR_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

Handler = Callable[[Any, Any], Any]
_Stamp = tuple[int, int]
CodeDigest = tuple[str, int]  # base64 SHA-256 of the code, and its size in bytes


class HandlerLoadError(Exception):
    """A handler that cannot be called; answered to the caller like a handler exception."""

    def __init__(self, error_type: str, message: str, *, not_found: bool = False) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        # Set for implicit functions whose module has no handler: the function simply does not exist.
        self.not_found = not_found


@dataclass(frozen=True)
class FunctionSpec:
    """One invokable function: its $LATEST handler, published versions and aliases.

    `versions` is ordered by ascending version number and `aliases` by name, the order the listing APIs
    answer in. `builtin`, when set, is the handler itself (synthetic functions have no module file).
    """

    name: str
    handler: str
    timeout: float = DEFAULT_TIMEOUT_S
    versions: Mapping[str, str] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    explicit: bool = True
    description: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    version_descriptions: Mapping[str, str] = field(default_factory=dict)
    alias_descriptions: Mapping[str, str] = field(default_factory=dict)
    builtin: Handler | None = field(default=None, compare=False)
    # Lambda's reserved concurrency: invocations beyond it in flight are throttled (429); None: unlimited.
    reserved_concurrency: int | None = None


@dataclass(frozen=True)
class Target:
    """The outcome of resolving a function name and qualifier."""

    spec: FunctionSpec
    version: str
    module: str
    attr: str


class LambdaContext:
    """The `context` argument handed to handlers, with the attributes of the AWS Python runtime's."""

    __slots__ = (
        "_deadline",
        "aws_request_id",
        "client_context",
        "function_name",
        "function_version",
        "identity",
        "invoked_function_arn",
        "log_group_name",
        "log_stream_name",
        "memory_limit_in_mb",
    )

    def __init__(
        self,
        *,
        function_name: str,
        function_version: str,
        invoked_function_arn: str,
        aws_request_id: str,
        log_stream_name: str,
        deadline: float,
        memory_limit_in_mb: int = 128,
    ) -> None:
        self.function_name = function_name
        self.function_version = function_version
        self.invoked_function_arn = invoked_function_arn
        self.memory_limit_in_mb = memory_limit_in_mb
        self.aws_request_id = aws_request_id
        self.log_group_name = f"/aws/lambda/{function_name}"
        self.log_stream_name = log_stream_name
        self.identity: Any = None
        self.client_context: Any = None
        self._deadline = deadline

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))

    def __repr__(self) -> str:
        return f"LambdaContext({self.invoked_function_arn!r}, request_id={self.aws_request_id!r})"


def function_arn(region: str | None, name: str, qualifier: str | None = None) -> str:
    arn = f"arn:aws:lambda:{region or DEFAULT_REGION}:{ACCOUNT_ID}:function:{name}"
    return f"{arn}:{qualifier}" if qualifier else arn


def split_function_name(raw: str, region: str | None) -> tuple[str, str | None] | None:
    """Split a FunctionName (name, name:qualifier, full or partial ARN) into name and qualifier.

    None means the value cannot name any function here (malformed, or an ARN for another region).
    """
    parts = raw.split(":")
    if parts[0] == "arn":
        if len(parts) not in (7, 8) or parts[2] != "lambda" or parts[5] != "function":
            return None
        if region is not None and parts[3] != region:
            return None
        rest = parts[6:]
    elif len(parts) in (3, 4) and parts[1] == "function" and parts[0].isdigit() and len(parts[0]) == 12:
        rest = parts[2:]
    elif len(parts) <= 2:
        rest = parts
    else:
        return None
    name = rest[0]
    qualifier = rest[1] if len(rest) == 2 else None
    if not FUNCTION_NAME_RE.fullmatch(name) or (
        qualifier is not None and not QUALIFIER_RE.fullmatch(qualifier)
    ):
        return None
    return name, qualifier


def version_order(version: str) -> tuple[int, str]:
    """Sort key putting $LATEST first, then published versions by number."""
    return (-1, "") if version == LATEST else (int(version), version)


def handler_module(ref: str) -> str:
    """The module part of a validated 'module.attribute' handler reference."""
    return ref.rpartition(".")[0]


def _echo(event: Any, context: Any) -> Any:
    return event


def synthetic_specs(count: int, tags: Mapping[str, str] | None = None) -> dict[str, FunctionSpec]:
    """`count` echo functions `synth-00001`..., each with versions 1-3 and aliases live -> 3, prev -> 2.

    Names are zero-padded to one width, so their string order is their numeric order.
    """
    versions = MappingProxyType({v: SYNTHETIC_HANDLER for v in ("1", "2", "3")})
    aliases = MappingProxyType({"live": "3", "prev": "2"})
    shared_tags = MappingProxyType(dict(tags or {}))
    width = max(5, len(str(count)))
    specs: dict[str, FunctionSpec] = {}
    for index in range(1, count + 1):
        name = f"{SYNTHETIC_PREFIX}{index:0{width}d}"
        specs[name] = FunctionSpec(
            name=name,
            handler=SYNTHETIC_HANDLER,
            versions=versions,
            aliases=aliases,
            explicit=True,
            description="Synthetic echo function",
            tags=shared_tags,
            builtin=_echo,
        )
    return specs


def _split_handler(ref: str) -> tuple[str, str]:
    module, _, attr = ref.rpartition(".")
    if not _MODULE_RE.fullmatch(module) or not _ATTR_RE.fullmatch(attr):
        raise ValueError(f"handler {ref!r} is not 'module.attribute' with module a file stem in the folder")
    return module, attr


class FunctionRegistry:
    """The functions of one folder, rescanned when its files change and imported lazily.

    Scanning and resolving run on the event loop and only touch in-memory state; importing user code
    happens in `load_handler`, which is meant for a worker thread.
    """

    def __init__(
        self,
        folder: Path,
        log: logging.Logger,
        *,
        region: str | None = None,
        check_interval: float = 1.0,
        synthetic: int = 0,
        synthetic_tags: Mapping[str, str] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.region = region
        self._log = log
        self._check_interval = check_interval
        self._next_check = 0.0
        self._stamps: dict[str, _Stamp] = {}
        # Functions of the folder take precedence over synthetic ones of the same name.
        self._synthetic = synthetic_specs(synthetic, synthetic_tags) if synthetic > 0 else {}
        self._specs: dict[str, FunctionSpec] = dict(self._synthetic)
        self._names: list[str] = sorted(self._specs)
        self._digests: dict[str, tuple[_Stamp | None, CodeDigest]] = {}
        self.started_ns = time.time_ns()
        self._modules: dict[str, tuple[_Stamp | None, ModuleType | HandlerLoadError]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        # Hash the folder into module names so two folders with a `pets.py` each never share sys.modules.
        self._module_prefix = (
            "_lambdagate_fn_" + hashlib.sha1(str(self.folder.resolve()).encode()).hexdigest()[:12]
        )

    @property
    def functions(self) -> Mapping[str, FunctionSpec]:
        return self._specs

    @property
    def sorted_names(self) -> list[str]:
        """Every function name in ascending order; replaced, never mutated, when the functions change."""
        return self._names

    def names_after(self, marker: str | None, *, inclusive: bool = False) -> int:
        """Index in `sorted_names` of the first name after `marker` (or at it, when `inclusive`)."""
        if marker is None:
            return 0
        find = bisect.bisect_left if inclusive else bisect.bisect_right
        return find(self._names, marker)

    def mtime_ns(self, module: str) -> int:
        """When a function's code or configuration last changed: its module's or the config's mtime."""
        names = (*CONFIG_FILES, module + ".py")
        stamps = self._stamps
        return max((stamps[name][0] for name in names if name in stamps), default=self.started_ns)

    def cached_code_digest(self, module: str) -> CodeDigest | None:
        """The module file's digest if already computed for its current stamp, without I/O; else None."""
        entry = self._digests.get(module)
        if entry is None or entry[0] != self._stamps.get(module + ".py"):
            return None
        return entry[1]

    def code_digest(self, module: str) -> CodeDigest:
        """Base64 SHA-256 and size of a module file (of nothing, if it is missing). Blocking."""
        stamp = self._stamps.get(module + ".py")
        try:
            data = (self.folder / f"{module}.py").read_bytes() if stamp is not None else b""
        except OSError:
            data = b""
        digest = (base64.b64encode(hashlib.sha256(data).digest()).decode("ascii"), len(data))
        self._digests[module] = (stamp, digest)
        return digest

    def reload(self) -> None:
        """Rescan the folder now and forget every imported module so the next call re-imports."""
        self._modules = {}
        self._next_check = time.monotonic() + self._check_interval
        self._apply(self._scan(), force=True)

    def refresh_if_changed(self) -> None:
        """Rescan if the throttle interval has passed and any file's mtime or size changed."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._check_interval
        stamps = self._scan()
        if stamps != self._stamps:
            self._apply(stamps, force=False)

    def resolve(self, name: str, qualifier: str | None) -> Target | None:
        spec = self._specs.get(name)
        if spec is None:
            return None
        version = LATEST if qualifier in (None, "", LATEST) else qualifier
        if version != LATEST and not _VERSION_RE.fullmatch(version):
            alias_target = spec.aliases.get(version)
            if alias_target is None:
                return None
            version = alias_target
        ref = spec.handler if version == LATEST else spec.versions.get(version)
        if ref is None:
            return None
        module, attr = _split_handler(ref)
        return Target(spec, version, module, attr)

    def cached_handler(self, target: Target) -> Handler | HandlerLoadError | None:
        """The handler if its module is already imported and current, without doing any I/O; else None."""
        if target.spec.builtin is not None:
            return target.spec.builtin
        entry = self._modules.get(target.module)
        if entry is None or entry[0] != self._stamps.get(target.module + ".py"):
            return None
        return self._pick(entry[1], target)

    def load_handler(self, target: Target) -> Handler | HandlerLoadError:
        """Import (or re-import) the target's module if needed and return its handler. Blocking."""
        if target.spec.builtin is not None:
            return target.spec.builtin
        with self._module_lock(target.module):
            stamp = self._stamps.get(target.module + ".py")
            entry = self._modules.get(target.module)
            if entry is None or entry[0] != stamp:
                entry = (stamp, self._import(target.module, stamp))
                self._modules[target.module] = entry
        return self._pick(entry[1], target)

    def _pick(self, loaded: ModuleType | HandlerLoadError, target: Target) -> Handler | HandlerLoadError:
        if isinstance(loaded, HandlerLoadError):
            return loaded
        attribute = getattr(loaded, target.attr, None)
        if callable(attribute):
            handler: Handler = attribute
            return handler
        return HandlerLoadError(
            "Runtime.HandlerNotFound",
            f"Handler '{target.attr}' missing on module '{target.module}'",
            not_found=not target.spec.explicit,
        )

    def _module_lock(self, module: str) -> threading.Lock:
        with self._locks_guard:
            lock = self._locks.get(module)
            if lock is None:
                lock = self._locks[module] = threading.Lock()
            return lock

    def _import(self, module: str, stamp: _Stamp | None) -> ModuleType | HandlerLoadError:
        path = self.folder / f"{module}.py"
        if stamp is None:
            return HandlerLoadError(
                "Runtime.ImportModuleError", f"Unable to import module '{module}': No module named '{module}'"
            )
        safe = re.sub(r"\W", "_", module)
        name = f"{self._module_prefix}_{safe}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None:
            return HandlerLoadError("Runtime.ImportModuleError", f"Unable to import module '{module}'")
        mod = importlib.util.module_from_spec(spec)
        try:
            # Compile from source rather than through the loader: .pyc validation has one-second mtime
            # resolution, which would serve stale code after quick successive edits.
            code = compile(path.read_bytes(), str(path), "exec", dont_inherit=True)
            sys.modules[name] = mod
            exec(code, mod.__dict__)  # noqa: S102 - running the user's handler module is the point
        except SyntaxError as exc:
            sys.modules.pop(name, None)
            self._log.error("syntax error in Lambda module %s", path, exc_info=True)
            return HandlerLoadError(
                "Runtime.UserCodeSyntaxError", f"Syntax error in module '{module}': {exc}"
            )
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything, even SystemExit
            sys.modules.pop(name, None)
            self._log.error("failed to import Lambda module %s", path, exc_info=True)
            return HandlerLoadError("Runtime.ImportModuleError", f"Unable to import module '{module}': {exc}")
        self._log.debug("imported Lambda module %s as %s", path, name)
        return mod

    def _scan(self) -> dict[str, _Stamp]:
        stamps: dict[str, _Stamp] = {}
        try:
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    if entry.name.endswith(".py") or entry.name in CONFIG_FILES:
                        try:
                            st = entry.stat()
                        except OSError:
                            continue
                        stamps[entry.name] = (st.st_mtime_ns, st.st_size)
        except OSError as exc:
            self._log.warning("cannot scan Lambda functions folder %s: %s", self.folder, exc)
        return stamps

    def _apply(self, stamps: dict[str, _Stamp], *, force: bool) -> None:
        config = next((c for c in CONFIG_FILES if c in stamps), None)
        old_config = next((c for c in CONFIG_FILES if c in self._stamps), None)
        # Specs depend only on the config file, or on the set of file names in implicit mode; module
        # contents are re-imported lazily by comparing stamps.
        specs_stale = (
            force
            or config != old_config
            or (config is not None and stamps[config] != self._stamps.get(config))
            or (config is None and stamps.keys() != self._stamps.keys())
        )
        self._stamps = stamps
        if not specs_stale:
            return
        if config is not None:
            specs = self._load_config(self.folder / config)
        else:
            specs = self._implicit_specs(stamps)
        self._log.info("Lambda functions in %s: %s", self.folder, ", ".join(sorted(specs)) or "(none)")
        if self._synthetic:
            self._log.info("plus %d synthetic functions", len(self._synthetic.keys() - specs.keys()))
            specs = {**self._synthetic, **specs}
        # Sorted once per change, so listing a page is a bisection and a slice.
        self._names = sorted(specs)
        self._specs = specs

    def _implicit_specs(self, stamps: Mapping[str, _Stamp]) -> dict[str, FunctionSpec]:
        specs: dict[str, FunctionSpec] = {}
        for file_name in stamps:
            stem = file_name[:-3]
            if (
                file_name.endswith(".py")
                and not stem.startswith("_")
                and FUNCTION_NAME_RE.fullmatch(stem)
                and _MODULE_RE.fullmatch(stem)
            ):
                specs[stem] = FunctionSpec(name=stem, handler=f"{stem}.handler", explicit=False)
        return specs

    def _load_config(self, path: Path) -> dict[str, FunctionSpec]:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            self._log.error("cannot read %s, no functions are served: %s", path, exc)
            return {}
        entries = doc.get("functions") if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            self._log.error("%s must be a mapping with a 'functions' list; no functions are served", path)
            return {}
        specs: dict[str, FunctionSpec] = {}
        for index, entry in enumerate(entries):
            try:
                spec = _parse_spec(entry)
            except (TypeError, ValueError) as exc:
                self._log.error("%s: functions[%d] skipped: %s", path, index, exc)
                continue
            if spec.name in specs:
                self._log.error("%s: functions[%d] skipped: duplicate name %r", path, index, spec.name)
                continue
            specs[spec.name] = spec
        return specs


def _parse_spec(entry: object) -> FunctionSpec:
    if not isinstance(entry, dict):
        raise TypeError("entry must be a mapping")
    unknown = set(entry) - {
        "name",
        "handler",
        "timeout",
        "versions",
        "aliases",
        "description",
        "tags",
        "reserved_concurrency",
    }
    if unknown:
        raise ValueError(f"unknown keys {sorted(map(str, unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not FUNCTION_NAME_RE.fullmatch(name):
        raise ValueError(f"name {name!r} must match {FUNCTION_NAME_RE.pattern}")
    handler = entry.get("handler")
    if not isinstance(handler, str):
        raise TypeError(f"{name}: handler must be a string 'module.attribute'")
    _split_handler(handler)
    timeout = entry.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise ValueError(f"{name}: timeout must be a number of seconds in (0, {MAX_TIMEOUT_S:g}]")
    description = _description(entry.get("description"), f"{name}: description")
    tags = _tags(entry.get("tags"), name)
    reserved = entry.get("reserved_concurrency")
    if reserved is not None and (isinstance(reserved, bool) or not isinstance(reserved, int) or reserved < 0):
        raise ValueError(f"{name}: reserved_concurrency must be a whole number >= 0")

    versions: dict[str, str] = {}
    version_descriptions: dict[str, str] = {}
    raw_versions = entry.get("versions") or {}
    if not isinstance(raw_versions, dict):
        raise TypeError(f"{name}: versions must be a mapping of version number to handler")
    for key, value in raw_versions.items():
        version = str(key)
        ref, text = _with_description(value, "handler", f"{name}: version {key!r}")
        if isinstance(key, bool) or not _VERSION_RE.fullmatch(version) or not isinstance(ref, str):
            raise ValueError(f"{name}: version {key!r} must be a number mapped to 'module.attribute'")
        _split_handler(ref)
        if version in versions:
            raise ValueError(f"{name}: version {version} is declared twice")
        versions[version] = ref
        if text is not None:
            version_descriptions[version] = text

    aliases: dict[str, str] = {}
    alias_descriptions: dict[str, str] = {}
    raw_aliases = entry.get("aliases") or {}
    if not isinstance(raw_aliases, dict):
        raise TypeError(f"{name}: aliases must be a mapping of alias to version")
    for key, value in raw_aliases.items():
        alias = str(key)
        raw_target, text = _with_description(value, "version", f"{name}: alias {alias!r}")
        target = str(raw_target)
        if _VERSION_RE.fullmatch(alias) or alias == LATEST or not QUALIFIER_RE.fullmatch(alias):
            raise ValueError(f"{name}: {alias!r} is not a valid alias name")
        if target != LATEST and target not in versions:
            raise ValueError(f"{name}: alias {alias!r} points at unknown version {target!r}")
        aliases[alias] = target
        if text is not None:
            alias_descriptions[alias] = text
    return FunctionSpec(
        name=name,
        handler=handler,
        timeout=float(timeout),
        # Listed in these orders: versions by number, aliases by name.
        versions=dict(sorted(versions.items(), key=lambda item: version_order(item[0]))),
        aliases=dict(sorted(aliases.items())),
        explicit=True,
        description=description,
        tags=tags,
        reserved_concurrency=reserved,
        version_descriptions=version_descriptions,
        alias_descriptions=alias_descriptions,
    )


def _with_description(value: object, key: str, where: str) -> tuple[object, str | None]:
    """A version's handler or an alias's version, given plainly or as {<key>: ..., description: ...}."""
    if not isinstance(value, dict):
        return value, None
    unknown = set(value) - {key, "description"}
    if unknown or key not in value:
        raise ValueError(f"{where} must be a value or a mapping with '{key}' and an optional 'description'")
    return value[key], _description(value.get("description"), f"{where} description")


def _description(value: object, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_DESCRIPTION:
        raise ValueError(f"{where} must be a string of at most {MAX_DESCRIPTION} characters")
    return value


def _tags(value: object, name: str) -> dict[str, str]:
    """Tags as Lambda accepts them: at most 50, keys of 1-128 characters not starting 'aws:', values to 256."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TypeError(f"{name}: tags must be a mapping of tag key to value")
    if len(value) > MAX_TAGS:
        raise ValueError(f"{name}: at most {MAX_TAGS} tags are allowed")
    tags: dict[str, str] = {}
    for key, raw in value.items():
        # YAML reads `tier: 1` as a number; tags are strings, so scalars are taken as written.
        if isinstance(key, bool) or not isinstance(key, (str, int)) or isinstance(raw, bool):
            raise ValueError(f"{name}: tag {key!r}: keys and values must be strings (quote true/false)")
        if raw is None:
            raw = ""
        if not isinstance(raw, (str, int, float)):
            raise ValueError(f"{name}: tag {key!r}: the value must be a string")
        tag_key, tag_value = str(key), str(raw)
        if not 1 <= len(tag_key) <= 128 or tag_key.lower().startswith("aws:") or len(tag_value) > 256:
            raise ValueError(
                f"{name}: tag {tag_key!r}: keys need 1-128 characters and must not start with 'aws:', "
                "values at most 256"
            )
        tags[tag_key] = tag_value
    return tags
