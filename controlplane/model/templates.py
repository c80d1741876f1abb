"""Mapping templates (API Gateway's non-proxy integration) in Jinja2's sandbox: compiled and checked at load.

A template that does not compile, or that fails on a sample request, is a configuration error naming the field,
never a 500 at request time.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any, NoReturn

from jinja2 import ChainableUndefined, Template, TemplateSyntaxError, Undefined, meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from controlplane.model.errors import ConfigError

# The names a template may use (README: "Mapping templates"). aws/integration.py builds exactly these.
REQUEST_NAMES = (
    "method",
    "path",
    "resource",
    "path_params",
    "query",
    "multi_query",
    "headers",
    "body",
    "json",
    "stage",
    "stage_variables",
    "request_id",
    "source_ip",
    "authorizer",
    "api_key_id",
)
RESPONSE_NAMES = (*REQUEST_NAMES, "result", "error", "status")
KINDS = {"request": frozenset(REQUEST_NAMES), "response": frozenset(RESPONSE_NAMES)}
# Compiled templates kept: a config's templates many times over, yet bounded when sources churn.
CACHE_SIZE = 4096


class TemplateFailed(ValueError):
    """A template failed while rendering (data-dependent: load-time checks passed)."""


def to_json(value: Any, indent: int | None = None) -> str:
    """The `tojson` (and `json`) filter: JSON text, a missing value (Undefined) included, as null.

    Replaces Jinja's own, which HTML-escapes <, >, & and ' and fails on Undefined; neither suits a payload.
    """
    return json.dumps(value, ensure_ascii=False, indent=indent, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, Undefined):
        return None
    raise TypeError(f"a {type(value).__name__} is not JSON serialisable")


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> Undefined:
        # Jinja's sandbox answers an Undefined that prints as "": fail instead, so load-time checks see it.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed in the sandbox"
        )


class _SampleUndefined(ChainableUndefined):
    """At load, what the sample cannot know (a body's fields, the function's result): every use of it works
    and prints as null, so only what fails for every request is refused, not what depends on the data."""

    __slots__ = ()

    def _same(self, *args: Any, **kwargs: Any) -> Any:  # Any: Undefined declares these as failing
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _same
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _same
    __pow__ = __rpow__ = __pos__ = __neg__ = __abs__ = __round__ = __call__ = _same
    __lt__ = __le__ = __gt__ = __ge__ = _same

    def __str__(self) -> str:
        return "null"

    def __int__(self) -> int:  # type: ignore[override]
        return 0

    def __float__(self) -> float:  # type: ignore[override]
        return 0.0


def _environment(undefined: type[Undefined]) -> _Sandbox:
    env = _Sandbox(undefined=undefined, autoescape=False, keep_trailing_newline=True)
    env.filters["tojson"] = to_json
    env.filters["json"] = to_json
    return env


@functools.cache
def runtime_environment() -> _Sandbox:
    # A missing key is Undefined and renders as "" (or null through tojson) rather than failing the request.
    return _environment(ChainableUndefined)


@functools.cache
def _check_environment() -> _Sandbox:
    return _environment(_SampleUndefined)


@functools.lru_cache(maxsize=CACHE_SIZE)
def compile_template(source: str) -> Template:
    """The template for `source`, compiled once per process: the request path only renders."""
    return runtime_environment().from_string(source)


@functools.lru_cache(maxsize=CACHE_SIZE)
def template_names(source: str) -> frozenset[str]:
    """The context names `source` reads (for building only the parts of a context a template uses)."""
    return frozenset(meta.find_undeclared_variables(runtime_environment().parse(source)))


def render(source: str, context: Mapping[str, Any]) -> str:
    """Render a checked template; raises TemplateFailed with the reason (and line) for the log."""
    try:
        return compile_template(source).render(context)
    except Exception as err:  # noqa: BLE001 (filters raise anything: TypeError, ValueError, OverflowError...)
        raise TemplateFailed(_describe(err)) from None


def _describe(err: BaseException) -> str:
    line = err.lineno if isinstance(err, TemplateSyntaxError) else None
    tb = err.__traceback__
    while tb is not None:
        # Jinja rewrites tracebacks so a template's frames carry its own line numbers.
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    message = getattr(err, "message", None) or str(err) or type(err).__name__
    where = f"line {line}: " if line else ""
    return f"{where}{message} ({type(err).__name__})"


def sample_context(kind: str) -> dict[str, Any]:
    """A representative context: the gateway's own values concrete, what the client or function sends unknown."""
    unknown = _SampleUndefined(name="sample")
    context: dict[str, Any] = {
        "method": "POST",
        "path": "/pets/7",
        "resource": "/pets/{id}",
        "path_params": {"id": "7"},
        "query": {"q": "x"},
        "multi_query": {"q": ["x"]},
        "headers": {"content-type": "application/json", "host": "api.example.com", "user-agent": "curl/8"},
        "body": '{"sample": true}',
        # Concrete, so that printing it without tojson (a Python repr) is caught as not JSON.
        "json": {"sample": True},
        "stage": "$default",
        "stage_variables": {"sample": "value"},
        "request_id": "00000000-0000-4000-8000-000000000000",
        "source_ip": "192.0.2.1",
        "authorizer": {"claims": {}, "scopes": [], "principal_id": "", "context": {}},
        "api_key_id": None,
    }
    if kind == "response":
        context.update(result=unknown, error=unknown, status=200)
    return context


def check_template(source: str, field: str, kind: str) -> None:
    """Raise ConfigError(field=...) unless `source` is a usable `kind` ("request" or "response") template."""
    allowed = KINDS[kind]
    env = _check_environment()
    try:
        # Compiling also checks that every filter and test named exists.
        template = env.from_string(source)
    except TemplateSyntaxError as err:
        _refuse(field, kind, f"does not compile: line {err.lineno}: {err.message}")
    ast = env.parse(source)
    for node in ast.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        _refuse(field, kind, f"line {node.lineno}: a template cannot extend, include or import another")
    unknown = meta.find_undeclared_variables(ast) - allowed
    if unknown:
        line, name = min(
            ((n.lineno, n.name) for n in ast.find_all(nodes.Name) if n.ctx == "load" and n.name in unknown),
            default=(1, min(unknown)),
        )
        _refuse(field, kind, f"line {line}: unknown name {name!r}; it can use {', '.join(sorted(allowed))}")
    compile_template(source)
    try:
        # The sample's unknowns never fail, so what fails here would fail for every request: refused now.
        output = template.render(sample_context(kind))
    except Exception as err:  # noqa: BLE001 (Jinja's errors, or a filter's on the sample's concrete values)
        _refuse(field, kind, f"fails for a sample request: {_describe(err)}")
    if kind == "request":
        try:
            json.loads(output, parse_constant=_no_constant)
        except ValueError as err:
            shown = output.strip()[:200]
            _refuse(
                field,
                kind,
                f"the output is not JSON for a sample request ({err}): {shown!r}; Lambda's Invoke API needs "
                "JSON (print values with | tojson)",
            )


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _refuse(field: str, kind: str, message: str) -> NoReturn:
    raise ConfigError(f"{kind} template: {message}", field=field)
