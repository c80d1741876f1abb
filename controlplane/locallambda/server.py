"""A local AWS Lambda Invoke endpoint: a small asyncio HTTP/1.1 server with SigV4 checks.

Runs Python handlers from a folder in worker threads with Lambda's invoke semantics, no AWS needed, and
answers the read-only control-plane APIs (ListFunctions, ListVersionsByFunction, ListAliases, GetFunction,
ListTags) that function discovery calls.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import queue
import re
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import parse_qsl, unquote

from .functions import (
    FunctionRegistry,
    Handler,
    HandlerLoadError,
    LambdaContext,
    Target,
    function_arn,
    split_function_name,
)
from .readapi import ApiError, ReadApi
from .sigv4 import SigV4Error, SigV4Verifier

SYNC_PAYLOAD_LIMIT = 6 * 1024 * 1024
EVENT_PAYLOAD_LIMIT = 1024 * 1024
RESPONSE_PAYLOAD_LIMIT = 6 * 1024 * 1024
LOG_TAIL_BYTES = 4096

_INVOKE_PREFIX = "/2015-03-31/functions/"
_INVOKE_SUFFIX = "/invocations"
_FUNCTIONS_PATH = "/2015-03-31/functions"
_TAGS_PREFIX = "/2017-03-31/tags/"
_MAX_HEAD_BYTES = 64 * 1024
# Bodies past the payload limit are read and discarded up to here so the client gets its 413 instead of
# a reset; anything larger is answered and the connection dropped.
_DRAIN_LIMIT = 64 * 1024 * 1024
# Longer than Envoy's upstream idle timeouts are usually set, so Envoy is the side that closes idle
# keep-alive connections and never races a request against our close.
_IDLE_TIMEOUT_S = 900.0
_MAX_WORKERS = 64
_CHUNK_SIZE_RE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_REASONS = {status.value: status.phrase for status in HTTPStatus}

_tls = threading.local()


class _HttpError(Exception):
    """A request the HTTP layer rejects; the connection is closed after the answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class _Request:
    method: str
    target: str
    path: str
    query: str
    keep_alive: bool
    headers: dict[str, str]
    header_pairs: list[tuple[str, str]]
    body: bytes | None  # None: larger than SYNC_PAYLOAD_LIMIT and discarded


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class _Outcome:
    payload: bytes
    function_error: str | None
    log: list[str] | None
    duration_ms: float


def _error(status: int, code: str, message: str, *, user: bool = True) -> _Response:
    body: dict[str, str] = {"Type": "User", "message": message} if user else {"message": message}
    return _Response(status, json.dumps(body).encode(), [("x-amzn-ErrorType", code)])


def _too_large_message(limit: int) -> str:
    return f"Request must be smaller than {limit} bytes for the InvokeFunction operation"


def _iso_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --- handler output capture ------------------------------------------------------------------------
# Handlers run concurrently in worker threads, so output is attributed by thread: a pass-through proxy
# sits on sys.stdout/sys.stderr and copies writes into the buffer of the invocation the thread runs.


class _ThreadTee:
    """Writes through to the wrapped stream and also into the current thread's capture buffer."""

    def __init__(self, target: TextIO) -> None:
        self.target = target

    def write(self, text: str) -> int:
        capture: list[str] | None = getattr(_tls, "capture", None)
        if capture is None or getattr(_tls, "in_tee", False):
            return self.target.write(text)
        capture.append(text)
        # A tee that ends up wrapping another tee must not record the same text twice.
        _tls.in_tee = True
        try:
            return self.target.write(text)
        finally:
            _tls.in_tee = False

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


class _CaptureLogHandler(logging.Handler):
    """Root-logger handler recording log records of capturing threads in Lambda's log line format."""

    def emit(self, record: logging.LogRecord) -> None:
        capture: list[str] | None = getattr(_tls, "capture", None)
        others, teed = self._other_handlers(record)
        if capture is not None and not teed:
            try:
                message = record.getMessage()
                if record.exc_info:
                    message += "\n" + logging.Formatter().formatException(record.exc_info)
            except Exception:  # noqa: BLE001 - a bad log call must not break the handler
                self.handleError(record)
                return
            stamp = datetime.fromtimestamp(record.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
            capture.append(f"[{record.levelname}]\t{stamp}Z\t{getattr(_tls, 'request_id', '')}\t{message}\n")
        # With this handler on root, logging no longer falls back to lastResort; do that ourselves so
        # installing capture does not silence warnings of an otherwise unconfigured process.
        last_resort = logging.lastResort
        if not others and last_resort is not None and record.levelno >= last_resort.level:
            last_resort.handle(record)

    def _other_handlers(self, record: logging.LogRecord) -> tuple[bool, bool]:
        others = teed = False
        logger: logging.Logger | None = (
            logging.getLogger(record.name) if record.name != "root" else logging.root
        )
        while logger is not None:
            for handler in logger.handlers:
                if handler is not self:
                    others = True
                    if isinstance(getattr(handler, "stream", None), _ThreadTee):
                        teed = True
            if not logger.propagate:
                break
            logger = logger.parent
        return others, teed


class _CaptureInstall:
    """Reference-counted installation of the stdout/stderr tees and the capture log handler."""

    _lock = threading.Lock()
    _users = 0
    _handler: _CaptureLogHandler | None = None

    @classmethod
    def acquire(cls) -> None:
        with cls._lock:
            cls._users += 1
            if cls._handler is None:
                cls._handler = _CaptureLogHandler()
                logging.root.addHandler(cls._handler)
        cls.ensure_streams()

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users > 0:
                return
            if cls._handler is not None:
                logging.root.removeHandler(cls._handler)
                cls._handler = None
            for name in ("stdout", "stderr"):
                stream = getattr(sys, name)
                if isinstance(stream, _ThreadTee):
                    setattr(sys, name, stream.target)

    @staticmethod
    def ensure_streams() -> None:
        # Test runners and embedding apps swap sys.stdout at will; re-wrap whatever is current.
        for name in ("stdout", "stderr"):
            stream = getattr(sys, name)
            if stream is not None and not isinstance(stream, _ThreadTee):
                setattr(sys, name, _ThreadTee(stream))


# --- worker threads --------------------------------------------------------------------------------


class _Job:
    __slots__ = ("abandoned", "finished", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.abandoned = False
        self.finished = False


class _WorkerPool:
    """Daemon threads for handlers, growing on demand up to a bound.

    Unlike ThreadPoolExecutor, a handler that never returns neither blocks interpreter exit (daemon
    threads) nor permanently takes a slot: a timed-out job is abandoned and its thread replaced.
    """

    def __init__(self, max_workers: int, name: str) -> None:
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Lock()
        self._workers = 0
        self._max = max_workers
        self._name = name
        self._closed = False

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("worker pool is shut down")
            self._queue.put(job)
            if self._idle.acquire(blocking=False) or self._workers >= self._max:
                return
            self._workers += 1
            index = self._workers
        threading.Thread(target=self._work, name=f"{self._name}-{index}", daemon=True).start()

    def abandon(self, job: _Job) -> None:
        """Give up on a job that overran: its thread leaves the pool when (if ever) it finishes."""
        with self._lock:
            if not job.abandoned and not job.finished:
                job.abandoned = True
                self._workers -= 1

    def shutdown(self) -> None:
        with self._lock:
            self._closed = True
            workers = self._workers
        for _ in range(workers):
            self._queue.put(None)

    def _work(self) -> None:
        # Lambda runs a handler on its runtime's main thread, where asyncio.get_event_loop() works; frameworks
        # such as Mangum rely on it. Give each worker thread a loop of its own so they behave the same here.
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            self._serve_jobs()
        finally:
            asyncio.set_event_loop(None)
            loop.close()

    def _serve_jobs(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job.fn()
            except BaseException:  # keep the worker alive; jobs report their own errors
                logging.getLogger(__name__).exception("worker job failed")
            with self._lock:
                job.finished = True
                if job.abandoned:
                    return  # the pool already replaced this thread
            self._idle.release()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None = None) -> None:
    if future.done():
        return  # the invocation timed out, or its caller went away
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _post(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None = None,
) -> None:
    """Hand a worker's result to the event loop, if the loop still runs."""
    try:
        loop.call_soon_threadsafe(_settle, future, result, error)
    except RuntimeError:
        pass  # the loop is closed: the server was stopped while the handler ran


# --- the server ------------------------------------------------------------------------------------


class LocalLambda:
    """The Lambda Invoke API for the handlers in `functions_dir`, served over plain HTTP on loopback.

    `credentials` maps access key ids to secret keys accepted in SigV4 signatures. With `region` set,
    only credentials scoped to that region are accepted and ARNs must name it.

    `latency_s` delays every answer of the read APIs (ListFunctions and the rest, not Invoke) by that
    long, to model AWS's control-plane latency in benchmarks. `synthetic` adds that many generated
    functions `synth-00001`..., each echoing its event, with versions 1-3 and aliases live -> 3 and
    prev -> 2, tagged with `synthetic_tags`; a function of the folder with the same name wins.
    """

    def __init__(
        self,
        functions_dir: Path,
        credentials: dict[str, str],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        region: str | None = None,
        log: logging.Logger | None = None,
        latency_s: float = 0.0,
        synthetic: int = 0,
        synthetic_tags: dict[str, str] | None = None,
        rescan_s: float = 1.0,
    ) -> None:
        """`rescan_s`: how often at most the folder is checked for changed handlers and functions.yaml."""
        if isinstance(synthetic, bool) or not isinstance(synthetic, int) or synthetic < 0:
            raise ValueError(f"synthetic must be a non-negative integer, not {synthetic!r}")
        self._host = host
        self._port = port
        self._region = region
        self._log = log or logging.getLogger("lambdagate.locallambda")
        self.latency_s = latency_s
        self._registry = FunctionRegistry(
            Path(functions_dir),
            self._log,
            region=region,
            synthetic=synthetic,
            synthetic_tags=synthetic_tags,
            check_interval=rescan_s,
        )
        self._read_api = ReadApi(self._registry, region, self._run_in_pool)
        self._verifier = SigV4Verifier(credentials, service="lambda", region=region)
        self._server: asyncio.AbstractServer | None = None
        self._pool: _WorkerPool | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Invocations in flight per function, for reserved concurrency.
        self._in_flight: dict[str, int] = {}
        self._sys_path_entry: str | None = None
        self._stream_id = uuid.uuid4().hex

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def latency_s(self) -> float:
        """Seconds every read-API answer is held back (0: none); may be changed while serving."""
        return self._latency_s

    @latency_s.setter
    def latency_s(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"latency_s must be a finite number of seconds >= 0, not {value!r}")
        self._latency_s = float(value)

    def set_credentials(self, credentials: dict[str, str]) -> None:
        """Accept exactly these keys from now on (access key id -> secret key)."""
        self._verifier.set_credentials(credentials)

    def reload(self) -> None:
        """Rescan the functions folder and re-import handler modules on their next invocation."""
        self._registry.reload()

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("LocalLambda already started")
        self._registry.reload()
        # Handlers import their sibling modules the way they do on Lambda, where the code folder is on
        # sys.path. Appended, so a folder file never shadows the standard library.
        folder = str(self._registry.folder.resolve())
        if folder not in sys.path:
            sys.path.append(folder)
            self._sys_path_entry = folder
        self._pool = _WorkerPool(_MAX_WORKERS, f"locallambda-{self._stream_id[:6]}")
        _CaptureInstall.acquire()
        try:
            self._server = await asyncio.start_server(
                self._serve_connection, self._host, self._port, limit=_MAX_HEAD_BYTES
            )
        except BaseException:
            await self._cleanup()
            raise
        self._port = self._server.sockets[0].getsockname()[1]
        self._log.info("local Lambda listening on %s for %s", self.url, self._registry.folder)
        return self._port

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task, writer in list(self._connections.items()):
            writer.close()
            task.cancel()
        for task in list(self._background):
            task.cancel()
        pending = [*self._connections, *self._background]
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await server.wait_closed()
        await self._cleanup()
        self._log.info("local Lambda on port %d stopped", self._port)

    async def __aenter__(self) -> LocalLambda:  # noqa: PYI034 - typing.Self needs Python 3.11
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _cleanup(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
            _CaptureInstall.release()
        if self._sys_path_entry is not None:
            try:
                sys.path.remove(self._sys_path_entry)
            except ValueError:
                pass
            self._sys_path_entry = None

    # --- HTTP ------------------------------------------------------------------------------------------

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        loop = asyncio.get_running_loop()
        transport = writer.transport
        try:
            while True:
                idle = loop.call_later(_IDLE_TIMEOUT_S, transport.close)
                try:
                    request = await self._read_request(reader, writer)
                except _HttpError as exc:
                    response = _error(exc.status, exc.code, exc.message)
                    response.headers.append(("x-amzn-RequestId", str(uuid.uuid4())))
                    writer.write(self._encode(response, False))
                    await writer.drain()
                    return
                finally:
                    idle.cancel()
                if request is None:
                    return
                try:
                    response = await self._dispatch(request)
                except Exception:  # noqa: BLE001 - a bug here must cost one request, not the server
                    self._log.exception("local Lambda failed to answer %s %s", request.method, request.path)
                    response = _error(500, "ServiceException", "Internal error.", user=False)
                    request.keep_alive = False
                writer.write(self._encode(response, request.keep_alive))
                await writer.drain()
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial.strip():
                raise _HttpError(400, "BadRequest", "Incomplete request head.") from None
            return None
        except asyncio.LimitOverrunError:
            raise _HttpError(431, "RequestHeaderFieldsTooLarge", "Request head too large.") from None
        lines = head.decode("latin-1").lstrip("\r\n").split("\r\n")
        request_line = lines[0].split(" ")
        if len(request_line) != 3 or not request_line[2].startswith("HTTP/1."):
            raise _HttpError(400, "BadRequest", "Malformed request line.")
        method, target, version = request_line
        if not target.startswith("/") or "#" in target:
            raise _HttpError(400, "BadRequest", "Only origin-form request targets are supported.")

        headers: dict[str, str] = {}
        pairs: list[tuple[str, str]] = []
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep or not name or name[-1] in " \t" or line[0] in " \t":
                raise _HttpError(400, "BadRequest", "Malformed header line.")
            name = name.lower()
            value = value.strip(" \t")
            pairs.append((name, value))
            headers[name] = f"{headers[name]},{value}" if name in headers else value

        connection = headers.get("connection", "").lower()
        keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = await self._read_body(reader, headers)
        path, _, query = target.partition("?")
        return _Request(method, target, path, query, keep_alive, headers, pairs, body)

    async def _read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes | None:
        transfer_encoding = headers.get("transfer-encoding")
        if transfer_encoding is not None:
            if "content-length" in headers:
                # Both framings at once is the classic request-smuggling setup; refuse it.
                raise _HttpError(400, "BadRequest", "Both Transfer-Encoding and Content-Length sent.")
            if transfer_encoding.lower() != "chunked":
                raise _HttpError(501, "NotImplemented", "Only chunked transfer coding is supported.")
            return await self._read_chunked(reader)
        length_text = headers.get("content-length")
        if length_text is None:
            return b""
        if not (length_text.isascii() and length_text.isdigit()) or len(length_text) > 18:
            raise _HttpError(400, "BadRequest", "Invalid Content-Length.")
        length = int(length_text)
        if length <= SYNC_PAYLOAD_LIMIT:
            return await reader.readexactly(length)
        if length > _DRAIN_LIMIT:
            raise _HttpError(413, "RequestTooLargeException", _too_large_message(SYNC_PAYLOAD_LIMIT))
        while length:
            length -= len(await reader.readexactly(min(length, 1 << 16)))
        return None

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes | None:
        chunks: list[bytes] = []
        total = 0
        while True:
            try:
                size_line = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError:
                raise _HttpError(400, "BadRequest", "Chunk size line too long.") from None
            size_text = size_line[:-2].split(b";", 1)[0].strip()
            if not _CHUNK_SIZE_RE.fullmatch(size_text):
                raise _HttpError(400, "BadRequest", "Invalid chunk size.")
            size = int(size_text, 16)
            if size == 0:
                break
            total += size
            if total > _DRAIN_LIMIT:
                raise _HttpError(413, "RequestTooLargeException", _too_large_message(SYNC_PAYLOAD_LIMIT))
            data = await reader.readexactly(size)
            if total <= SYNC_PAYLOAD_LIMIT:
                chunks.append(data)
            if await reader.readexactly(2) != b"\r\n":
                raise _HttpError(400, "BadRequest", "Chunk not terminated by CRLF.")
        try:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass  # trailer fields carry nothing Invoke uses
        except asyncio.LimitOverrunError:
            raise _HttpError(400, "BadRequest", "Trailer line too long.") from None
        return b"".join(chunks) if total <= SYNC_PAYLOAD_LIMIT else None

    @staticmethod
    def _encode(response: _Response, keep_alive: bool) -> bytes:
        status = response.status
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}", "Content-Type: application/json"]
        head.extend(f"{name}: {value}" for name, value in response.headers)
        if status != 204:
            head.append(f"Content-Length: {len(response.body)}")
        if not keep_alive:
            head.append("Connection: close")
        head.append("\r\n")
        return "\r\n".join(head).encode("latin-1") + response.body

    # --- Invoke ----------------------------------------------------------------------------------------

    async def _dispatch(self, request: _Request) -> _Response:
        request_id = str(uuid.uuid4())
        route = self._read_route(request) if request.method == "GET" else None
        if route is not None:
            response = await self._read(request, *route)
        else:
            response = await self._invoke_route(request, request_id)
        response.headers.append(("x-amzn-RequestId", request_id))
        return response

    # --- the read APIs ---------------------------------------------------------------------------------

    @staticmethod
    def _read_route(request: _Request) -> tuple[str, str] | None:
        """(operation, its raw path argument) for the read APIs' paths; None for anything else."""
        path = request.path
        if path in (_FUNCTIONS_PATH, _FUNCTIONS_PATH + "/"):
            return "ListFunctions", ""
        if path.startswith(_INVOKE_PREFIX):
            parts = path[len(_INVOKE_PREFIX) :].split("/")
            if not parts[0]:
                return None
            if len(parts) == 1:
                return "GetFunction", parts[0]
            if len(parts) == 2 and parts[1] == "versions":
                return "ListVersionsByFunction", parts[0]
            if len(parts) == 2 and parts[1] == "aliases":
                return "ListAliases", parts[0]
            return None
        if path.startswith(_TAGS_PREFIX):
            resource = path[len(_TAGS_PREFIX) :]
            return ("ListTags", resource) if resource and "/" not in resource else None
        return None

    async def _read(self, request: _Request, operation: str, raw_argument: str) -> _Response:
        if self._latency_s > 0:
            await asyncio.sleep(self._latency_s)
        if request.body is None:
            return _error(413, "RequestTooLargeException", _too_large_message(SYNC_PAYLOAD_LIMIT))
        try:
            self._verifier.verify(request.method, request.target, request.header_pairs, request.body)
        except SigV4Error as exc:
            self._log.info("rejected %s %s: %s", operation, request.path[:200], exc.code)
            return _error(exc.status, exc.code, exc.message, user=False)
        params = dict(parse_qsl(request.query, keep_blank_values=True)) if request.query else {}
        argument = unquote(raw_argument)
        api = self._read_api
        try:
            if operation == "ListFunctions":
                body = await api.list_functions(params)
            elif operation == "GetFunction":
                body = await api.get_function(argument, params)
            elif operation == "ListVersionsByFunction":
                body = await api.list_versions(argument, params)
            elif operation == "ListAliases":
                body = await api.list_aliases(argument, params)
            else:
                body = await api.list_tags(argument)
        except ApiError as exc:
            return _error(exc.status, exc.code, exc.message)
        return _Response(200, json.dumps(body, separators=(",", ":")).encode())

    async def _invoke_route(self, request: _Request, request_id: str) -> _Response:
        path = request.path
        raw_name = path[len(_INVOKE_PREFIX) : -len(_INVOKE_SUFFIX)]
        if (
            request.method != "POST"
            or not path.startswith(_INVOKE_PREFIX)
            or not path.endswith(_INVOKE_SUFFIX)
            or not raw_name
            or "/" in raw_name
        ):
            return _error(
                404, "UnknownOperationException", f"Unknown operation {request.method} {path[:200]}"
            )
        if request.body is None:
            return _error(413, "RequestTooLargeException", _too_large_message(SYNC_PAYLOAD_LIMIT))
        try:
            self._verifier.verify(request.method, request.target, request.header_pairs, request.body)
        except SigV4Error as exc:
            self._log.info("rejected invoke %s: %s", path[:200], exc.code)
            return _error(exc.status, exc.code, exc.message, user=False)

        headers = request.headers
        invocation_type = headers.get("x-amz-invocation-type", "RequestResponse")
        if invocation_type not in ("RequestResponse", "Event", "DryRun"):
            return _error(
                400, "InvalidParameterValueException", f"Unsupported InvocationType: {invocation_type[:64]}"
            )
        log_type = headers.get("x-amz-log-type", "None")
        if log_type not in ("None", "Tail"):
            return _error(400, "InvalidParameterValueException", f"Unsupported LogType: {log_type[:64]}")

        function_name = unquote(raw_name)
        split = split_function_name(function_name, self._region)
        query_qualifier = self._query_qualifier(request.query)
        if split is None:
            return self._not_found(function_name, query_qualifier)
        name, qualifier = split
        if query_qualifier:
            if qualifier is not None and qualifier != query_qualifier:
                return _error(
                    400,
                    "InvalidParameterValueException",
                    "The derived qualifier from the function name does not match the specified qualifier.",
                )
            qualifier = query_qualifier

        registry = self._registry
        registry.refresh_if_changed()
        target = registry.resolve(name, qualifier)
        if target is None:
            return self._not_found(name, qualifier)
        handler = registry.cached_handler(target)
        if handler is None:
            handler = await self._run_in_pool(lambda: registry.load_handler(target))
        if isinstance(handler, HandlerLoadError) and handler.not_found:
            return self._not_found(name, qualifier)

        body = request.body
        limit = EVENT_PAYLOAD_LIMIT if invocation_type == "Event" else SYNC_PAYLOAD_LIMIT
        if len(body) > limit:
            return _error(413, "RequestTooLargeException", _too_large_message(limit))
        try:
            event = json.loads(body) if body.strip() else {}
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(
                400, "InvalidRequestContentException", f"Could not parse request body into json: {exc}"
            )

        if invocation_type == "DryRun":
            return _Response(204)
        reserved = target.spec.reserved_concurrency
        running = self._in_flight.get(target.spec.name, 0)
        if reserved is not None and running >= reserved and invocation_type == "RequestResponse":
            # What Lambda answers when the function's reserved concurrency is used up.
            throttled = _Response(
                429,
                json.dumps(
                    {
                        "Reason": "ReservedFunctionConcurrentInvocationLimitExceeded",
                        "Type": "User",
                        "message": "Rate Exceeded.",
                        "retryAfterSeconds": 1,
                    }
                ).encode(),
                [("x-amzn-ErrorType", "TooManyRequestsException"), ("Retry-After", "1")],
            )
            return throttled
        if invocation_type == "Event":
            task = asyncio.get_running_loop().create_task(
                self._invoke_async(target, handler, event, request_id, qualifier)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return _Response(202)

        self._in_flight[target.spec.name] = running + 1
        try:
            outcome = await self._invoke(
                target,
                handler,
                event,
                request_id,
                qualifier,
                log_type == "Tail",
                headers.get("x-amzn-trace-id"),
            )
        finally:
            self._in_flight[target.spec.name] -= 1
        response = _Response(200, outcome.payload, [("X-Amz-Executed-Version", target.version)])
        if outcome.function_error is not None:
            response.headers.append(("X-Amz-Function-Error", outcome.function_error))
        if outcome.log is not None:
            response.headers.append(("X-Amz-Log-Result", self._log_tail(request_id, target, outcome)))
        return response

    @staticmethod
    def _query_qualifier(query: str) -> str | None:
        if not query:
            return None
        for key, value in parse_qsl(query, keep_blank_values=True):
            if key == "Qualifier":
                return value or None
        return None

    def _not_found(self, name: str, qualifier: str | None) -> _Response:
        # Name and qualifier may be unvalidated client input here; keep the echo bounded.
        arn = function_arn(self._region, name[:256], qualifier[:128] if qualifier else None)
        return _error(404, "ResourceNotFoundException", f"Function not found: {arn}")

    async def _run_in_pool(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the loop
                _post(loop, future, None, exc)
                return
            _post(loop, future, result)

        assert self._pool is not None
        self._pool.submit(_Job(run))
        return await future

    async def _invoke_async(
        self,
        target: Target,
        handler: Handler | HandlerLoadError,
        event: Any,
        request_id: str,
        qualifier: str | None,
    ) -> None:
        outcome = await self._invoke(target, handler, event, request_id, qualifier, False)
        if outcome.function_error is not None:
            self._log.error(
                "asynchronous invocation %s of %s failed: %s",
                request_id,
                target.spec.name,
                outcome.payload[:1024].decode("utf-8", "replace"),
            )

    async def _invoke(
        self,
        target: Target,
        handler: Handler | HandlerLoadError,
        event: Any,
        request_id: str,
        qualifier: str | None,
        tail: bool,
        trace: str | None = None,
    ) -> _Outcome:
        loop = asyncio.get_running_loop()
        timeout = target.spec.timeout
        capture: list[str] | None = [] if tail else None
        if tail:
            _CaptureInstall.ensure_streams()
        context = LambdaContext(
            function_name=target.spec.name,
            function_version=target.version,
            invoked_function_arn=function_arn(self._region, target.spec.name, qualifier),
            aws_request_id=request_id,
            log_stream_name=f"{time.strftime('%Y/%m/%d', time.gmtime())}/[{target.version}]{self._stream_id}",
            deadline=time.monotonic() + timeout,
        )
        # Resolves to None when the timeout fires first.
        future: asyncio.Future[_Outcome | None] = loop.create_future()
        job = _Job(lambda: None)

        def run() -> None:
            if job.abandoned:
                return  # timed out while still queued behind busy workers
            _post(loop, future, _run_handler(handler, event, context, capture, trace))

        job.fn = run
        assert self._pool is not None
        self._pool.submit(job)
        expiry = loop.call_later(timeout, _settle, future, None)
        try:
            outcome = await future
        finally:
            expiry.cancel()
        if outcome is not None:
            return outcome
        self._pool.abandon(job)
        message = f"{_iso_now()} {request_id} Task timed out after {timeout:.2f} seconds"
        if capture is not None:
            capture.append(message + "\n")
        payload = json.dumps({"errorMessage": message, "errorType": "Sandbox.Timedout"}).encode()
        return _Outcome(payload, "Unhandled", capture, timeout * 1000)

    def _log_tail(self, request_id: str, target: Target, outcome: _Outcome) -> str:
        duration = outcome.duration_ms
        text = "".join(
            [
                f"START RequestId: {request_id} Version: {target.version}\n",
                *(outcome.log or ()),
                f"END RequestId: {request_id}\n",
                (
                    f"REPORT RequestId: {request_id}\tDuration: {duration:.2f} ms\t"
                    f"Billed Duration: {max(1, math.ceil(duration))} ms\tMemory Size: 128 MB\t"
                    f"Max Memory Used: 128 MB\t\n"
                ),
            ]
        )
        return base64.b64encode(text.encode("utf-8")[-LOG_TAIL_BYTES:]).decode("ascii")


def _run_handler(
    handler: Handler | HandlerLoadError,
    event: Any,
    context: LambdaContext,
    capture: list[str] | None,
    trace: str | None = None,
) -> _Outcome:
    """Call the handler in the current (worker) thread and turn whatever happens into an Outcome."""
    if trace:
        # Lambda's Python runtime hands the Invoke call's X-Amzn-Trace-Id to the handler in this variable. One
        # process serves many invocations here, so under concurrency the last writer wins (best effort).
        os.environ["_X_AMZN_TRACE_ID"] = trace
    _tls.capture = capture
    _tls.request_id = context.aws_request_id
    started = time.perf_counter()
    try:
        if isinstance(handler, HandlerLoadError):
            payload = _error_payload(handler.error_type, handler.message, [], context.aws_request_id)
            if capture is not None:
                capture.append(f"[ERROR] {handler.error_type}: {handler.message}\n")
            return _Outcome(payload, "Unhandled", capture, 0.0)
        try:
            result = handler(event, context)
        except BaseException as exc:  # noqa: BLE001 - every failure of user code is a function error
            # Skip our own frame: the trace should start in the handler, as on Lambda.
            frames = traceback.extract_tb(exc.__traceback__)[1:]
            stack = traceback.format_list(frames)
            error_type = "Runtime.ExitError" if isinstance(exc, SystemExit) else type(exc).__name__
            message = str(exc)
            if capture is not None:
                capture.append(
                    f"[ERROR] {error_type}: {message}\nTraceback (most recent call last):\n{''.join(stack)}"
                )
            duration = (time.perf_counter() - started) * 1000
            return _Outcome(
                _error_payload(error_type, message, stack, context.aws_request_id),
                "Unhandled",
                capture,
                duration,
            )
        duration = (time.perf_counter() - started) * 1000
        try:
            payload = json.dumps(result).encode()
        except (TypeError, ValueError) as exc:
            message = f"Unable to marshal response: {exc}"
            if capture is not None:
                capture.append(f"[ERROR] Runtime.MarshalError: {message}\n")
            return _Outcome(
                _error_payload("Runtime.MarshalError", message, [], context.aws_request_id),
                "Unhandled",
                capture,
                duration,
            )
        if len(payload) > RESPONSE_PAYLOAD_LIMIT:
            message = (
                "Response payload size exceeded maximum allowed payload size "
                f"({RESPONSE_PAYLOAD_LIMIT} bytes)."
            )
            payload = _error_payload("Function.ResponseSizeTooLarge", message, [], context.aws_request_id)
            return _Outcome(payload, "Unhandled", capture, duration)
        return _Outcome(payload, None, capture, duration)
    finally:
        _tls.capture = None
        _tls.request_id = None


def _error_payload(error_type: str, message: str, stack: list[str], request_id: str) -> bytes:
    return json.dumps(
        {"errorMessage": message, "errorType": error_type, "requestId": request_id, "stackTrace": stack}
    ).encode()
