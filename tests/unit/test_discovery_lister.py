"""discovery.lister against real endpoints: our LocalLambda, moto's server, and (for throttling, which
neither produces) a tiny HTTP stand-in."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import zipfile
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from harness import LoopThread, MotoServer, free_port, http, serve_local_lambda, wait_until

from controlplane.locallambda import LocalLambda
from controlplane.model.resources import AwsCredentials
from discovery.lister import (
    Account,
    DiscoveredFunction,
    DiscoveryError,
    Filters,
    Lister,
    ListingStats,
    TokenBucket,
)

AKID = "AKIDDISCOVERYTEST"
SECRET = "discovery-test-secret"
REGION = "us-east-1"
ARN = f"arn:aws:lambda:{REGION}:000000000000:function:"

APP = """
def handler(event, context):
    return "head"


def v1(event, context):
    return "one"
"""

FUNCTIONS_YAML = """
functions:
- name: orders
  handler: app.handler
  description: Takes orders
  tags: {team: shop, env: prod}
  versions:
    "1": app.v1
    "2": {handler: app.handler, description: second}
  aliases:
    live: "2"
    beta: {version: "$LATEST", description: head}
- {name: users, handler: app.handler, description: People, tags: {team: core, env: prod}}
- {name: trail_, handler: app.handler}
"""


def _serve(runner: LoopThread, folder: Path, **kwargs: Any) -> Iterator[LocalLambda]:
    yield from serve_local_lambda(runner, folder, {AKID: SECRET}, **kwargs)


@pytest.fixture(scope="module")
def server(loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalLambda]:
    folder = tmp_path_factory.mktemp("discovery_functions")
    (folder / "app.py").write_text(textwrap.dedent(APP), encoding="utf-8")
    (folder / "functions.yaml").write_text(textwrap.dedent(FUNCTIONS_YAML), encoding="utf-8")
    yield from _serve(loop_thread, folder, region=REGION)


@pytest.fixture(scope="module")
def synthetic_server(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalLambda]:
    yield from _serve(loop_thread, tmp_path_factory.mktemp("discovery_synthetic"), synthetic=120)


def _account(server: LocalLambda, secret: str = SECRET, akid: str = AKID) -> Account:
    return Account(REGION, server.url, AwsCredentials(akid, secret))


def _list(
    lister: Lister, account: Account, filters: Filters | None = None
) -> tuple[list[DiscoveredFunction], ListingStats]:
    return asyncio.run(lister.list_account(account, filters or Filters()))


# --- LocalLambda -----------------------------------------------------------------------------------


def test_lists_latest_versions_and_aliases(server: LocalLambda) -> None:
    found, stats = _list(Lister(), _account(server))
    assert found == [
        DiscoveredFunction("orders", "orders", None, "$LATEST", ARN + "orders", "Takes orders"),
        DiscoveredFunction("orders:1", "orders", "1", "1", ARN + "orders:1", "Takes orders"),
        DiscoveredFunction("orders:2", "orders", "2", "2", ARN + "orders:2", "second"),
        DiscoveredFunction("orders:beta", "orders", "beta", "$LATEST", ARN + "orders:beta", "head"),
        # An alias without a description takes its version's.
        DiscoveredFunction("orders:live", "orders", "live", "2", ARN + "orders:live", "second"),
        DiscoveredFunction("users", "users", None, "$LATEST", ARN + "users", "People"),
    ]
    # `trail_` is a Lambda name but no valid logical name: skipped and counted.
    assert stats.skipped_invalid == 1
    assert (stats.functions, stats.versions, stats.aliases) == (3, 2, 2)
    # One ListFunctions page (FunctionVersion=ALL: versions included), then ListAliases per function.
    assert stats.api_calls == 1 + 3
    assert stats.throttled == 0
    assert 1 <= stats.max_in_flight <= 8
    assert stats.seconds > 0


def test_name_prefix_and_tag_filters(server: LocalLambda) -> None:
    lister = Lister()
    found, stats = _list(lister, _account(server), Filters(name_prefix="us"))
    assert [f.name for f in found] == ["users"]
    assert found[0].tags == ()  # tags are only fetched for tag filters
    assert stats.api_calls == 1 + 1
    assert stats.functions == 1

    found, stats = _list(lister, _account(server), Filters(tags=(("team", "shop"),)))
    assert [f.name for f in found] == ["orders", "orders:1", "orders:2", "orders:beta", "orders:live"]
    assert all(f.tags == (("env", "prod"), ("team", "shop")) for f in found)
    assert stats.api_calls == 1 + 3 + 1  # ListTags for each function, ListAliases for orders

    found, _ = _list(lister, _account(server), Filters(tags=(("env", "prod"), ("team", "core"))))
    assert [f.name for f in found] == ["users"]
    found, stats = _list(lister, _account(server), Filters(name_prefix="orders", tags=(("team", "core"),)))
    assert found == [] and stats.functions == 0
    assert stats.api_calls == 1 + 1


def test_synthetic_catalogue_call_count_and_concurrency(synthetic_server: LocalLambda) -> None:
    found, stats = _list(Lister(rate_per_s=1000), _account(synthetic_server))
    assert len(found) == 120 * (1 + 3 + 2)
    SYNTH_DESCRIPTION = "Synthetic echo function"  # noqa: N806
    assert found[:6] == [
        DiscoveredFunction(
            "synth-00001", "synth-00001", None, "$LATEST", ARN + "synth-00001", SYNTH_DESCRIPTION
        ),
        DiscoveredFunction(
            "synth-00001:1", "synth-00001", "1", "1", ARN + "synth-00001:1", SYNTH_DESCRIPTION
        ),
        DiscoveredFunction(
            "synth-00001:2", "synth-00001", "2", "2", ARN + "synth-00001:2", SYNTH_DESCRIPTION
        ),
        DiscoveredFunction(
            "synth-00001:3", "synth-00001", "3", "3", ARN + "synth-00001:3", SYNTH_DESCRIPTION
        ),
        DiscoveredFunction(
            "synth-00001:live", "synth-00001", "live", "3", ARN + "synth-00001:live", SYNTH_DESCRIPTION
        ),
        DiscoveredFunction(
            "synth-00001:prev", "synth-00001", "prev", "2", ARN + "synth-00001:prev", SYNTH_DESCRIPTION
        ),
    ]
    assert [f.name for f in found] == sorted(f.name for f in found)
    # 480 entries ($LATEST and 3 versions each) in ListFunctions pages of 50; then ListAliases per function.
    assert stats.api_calls == 10 + 120
    assert (stats.functions, stats.versions, stats.aliases) == (120, 360, 240)

    # With the endpoint slow, calls overlap, never past the bound.
    synthetic_server.latency_s = 0.01
    try:
        _, stats = _list(Lister(max_concurrency=4, rate_per_s=1000), _account(synthetic_server))
    finally:
        synthetic_server.latency_s = 0.0
    assert 1 < stats.max_in_flight <= 4
    assert stats.api_calls == 130


def test_wrong_secret_is_a_signature_error(server: LocalLambda) -> None:
    with pytest.raises(DiscoveryError) as excinfo:
        _list(Lister(), _account(server, secret="wrong-secret-value"))
    err = excinfo.value
    assert err.code == "InvalidSignatureException"
    assert "signature" in err.message
    assert "secret access key is wrong" in err.message
    assert "wrong-secret-value" not in str(err)
    assert server.url in err.message


def test_unknown_access_key(server: LocalLambda) -> None:
    with pytest.raises(DiscoveryError) as excinfo:
        _list(Lister(), _account(server, akid="AKIDNOBODYKNOWS"))
    assert excinfo.value.code in ("UnrecognizedClientException", "InvalidSignatureException")
    assert "AKIDNOBODYKNOWS" not in str(excinfo.value)  # access keys are masked too


def test_unreachable_endpoint(server: LocalLambda) -> None:
    account = Account(REGION, "http://127.0.0.1:9", AwsCredentials(AKID, SECRET))
    with pytest.raises(DiscoveryError) as excinfo:
        _list(Lister(), account)
    assert excinfo.value.code == "EndpointConnectionError"
    assert SECRET not in str(excinfo.value)


# --- faults neither LocalLambda nor moto produce: a stand-in HTTP endpoint -------------------------

Answer = tuple[int, dict[str, Any], str | None]  # status, body, x-amzn-ErrorType


class _StandIn:
    """A ThreadingHTTPServer answering each request from `route(method, path)`."""

    def __init__(self, route: Callable[[str], Answer]) -> None:
        self.calls: list[str] = []
        self.authorizations: list[tuple[str, str | None]] = []  # Authorization, X-Amz-Security-Token
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                stand_in.calls.append(self.path)
                stand_in.authorizations.append(
                    (self.headers.get("Authorization", ""), self.headers.get("X-Amz-Security-Token"))
                )
                status, body, code = route(self.path)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code:
                    self.send_header("x-amzn-ErrorType", code)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Account:
        self.thread.start()
        port = self.httpd.server_address[1]
        return Account(REGION, f"http://127.0.0.1:{port}", AwsCredentials(AKID, SECRET))

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


_THROTTLED: Answer = (429, {"message": "Rate exceeded", "Type": "User"}, "TooManyRequestsException")


def test_throttling_is_retried_and_counted() -> None:
    answers = [_THROTTLED, _THROTTLED, (200, {"Functions": []}, None)]
    stand_in = _StandIn(lambda path: answers.pop(0))
    with stand_in as account:
        found, stats = _list(Lister(backoff_base_s=0.001), account)
    assert found == []
    assert stats.throttled == 2
    assert stats.api_calls == 3
    assert len(stand_in.calls) == 3


def test_throttling_past_max_retries_is_an_error() -> None:
    stand_in = _StandIn(lambda path: _THROTTLED)
    with stand_in as account, pytest.raises(DiscoveryError) as excinfo:
        _list(Lister(max_retries=2, backoff_base_s=0.001), account)
    assert excinfo.value.code == "TooManyRequestsException"
    assert "throttled after 3 attempts" in excinfo.value.message
    assert len(stand_in.calls) == 3


def test_function_deleted_mid_listing_is_skipped() -> None:
    def route(path: str) -> Answer:
        if "/functions/gone/" in path:
            return 404, {"Message": "Function not found: " + ARN + "gone"}, "ResourceNotFoundException"
        if "/functions/kept/aliases" in path:
            return 200, {"Aliases": []}, None
        assert "FunctionVersion=ALL" in path
        functions = [
            {"FunctionName": n, "FunctionArn": f"{ARN}{n}:{v}", "Version": v}
            for n in ("gone", "kept")
            for v in ("$LATEST", "1")
        ]
        return 200, {"Functions": functions}, None

    with _StandIn(route) as account:
        found, stats = _list(Lister(), account)
    assert [(f.name, f.arn) for f in found] == [("kept", ARN + "kept"), ("kept:1", ARN + "kept:1")]
    assert stats.skipped_deleted == 1
    assert stats.functions == 1


def test_access_denied_names_the_problem() -> None:
    def route(path: str) -> Answer:
        message = "User: arn:aws:iam::1:user/x is not authorized to perform: lambda:ListFunctions"
        return 403, {"Message": message}, "AccessDeniedException"

    with _StandIn(route) as account, pytest.raises(DiscoveryError) as excinfo:
        _list(Lister(), account)
    assert excinfo.value.code == "AccessDeniedException"
    assert "access denied" in excinfo.value.message
    assert "lambda:ListFunctions" in excinfo.value.message


def test_token_bucket_spaces_calls_after_the_burst() -> None:
    bucket = TokenBucket(10.0, burst=2)
    delays = [bucket.reserve() for _ in range(4)]
    assert delays[:2] == [0.0, 0.0]
    assert delays[2] == pytest.approx(0.1, abs=0.02)
    assert delays[3] == pytest.approx(0.2, abs=0.02)


# --- moto ------------------------------------------------------------------------------------------
# moto 5.2.5's server, with signature checking on (harness.MotoServer), refuses every signed GET (all the
# List* calls) with SignatureDoesNotMatch even for the right key, so the listing runs against a moto server
# without authentication here; a wrong secret against the checking server still shows as an error.


@contextlib.contextmanager
def _moto_without_auth() -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        wait_until(lambda: http("GET", url + "/moto-api/").status == 200, 30, what="moto server")
        config = http(
            "POST",
            url + "/moto-api/config",
            json.dumps({"lambda": {"use_docker": False}}).encode(),
            {"content-type": "application/json"},
        )
        assert config.status in (200, 201), config
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _moto_function(url: str, name: str) -> None:
    import boto3

    options: dict[str, Any] = {
        "endpoint_url": url,
        "region_name": REGION,
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    iam = boto3.client("iam", **options)
    try:
        role = iam.get_role(RoleName="lambda-role")["Role"]["Arn"]
    except Exception:
        role = iam.create_role(RoleName="lambda-role", AssumeRolePolicyDocument="{}")["Role"]["Arn"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("index.py", "def handler(event, context):\n    return event\n")
    boto3.client("lambda", **options).create_function(
        FunctionName=name,
        Runtime="python3.11",
        Role=role,
        Handler="index.handler",
        Code={"ZipFile": buf.getvalue()},
        Description=f"{name} function",
        Publish=True,
    )


def test_moto_server() -> None:
    import boto3

    with _moto_without_auth() as url:
        _moto_function(url, "fn")
        _moto_function(url, "other")
        boto3.client(
            "lambda",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_alias(FunctionName="fn", Name="alias", FunctionVersion="1")
        account = Account(REGION, url, AwsCredentials("testing", "testing"))
        found, stats = _list(Lister(), account)
    by_name = {f.name: f for f in found}
    assert {"fn", "fn:1", "fn:alias", "other", "other:1"} <= set(by_name)
    assert (by_name["fn:alias"].qualifier, by_name["fn:alias"].version) == ("alias", "1")
    assert by_name["fn:1"].arn.endswith(":function:fn:1")
    assert by_name["fn"].description == "fn function"
    assert stats.functions == 2
    assert stats.aliases == 1


def test_moto_wrong_secret() -> None:
    with MotoServer() as moto:
        moto.create_function("fn")  # moto checks signatures only after its first few actions
        wrong = Account(REGION, moto.url, AwsCredentials(moto.access_key, "not-the-secret"))
        with pytest.raises(DiscoveryError) as excinfo:
            _list(Lister(), wrong)
    assert excinfo.value.code == "SignatureDoesNotMatch"
    assert "secret access key is wrong" in excinfo.value.message
    assert "not-the-secret" not in str(excinfo.value)


def test_role_arn_is_assumed_through_sts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The account's keys assume role_arn at moto's STS (signatures checked); Lambda calls sign as the role."""
    with MotoServer() as moto:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto.url)
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
        }
        role = moto.client("iam").create_role(RoleName="reader", AssumeRolePolicyDocument=json.dumps(trust))
        arn = role["Role"]["Arn"]
        stand_in = _StandIn(lambda path: (200, {"Functions": []}, None))
        with stand_in as account:
            account = Account(
                account.region, account.endpoint_url, AwsCredentials(moto.access_key, moto.secret_key), arn
            )
            found, _ = _list(Lister(), account)
            assert found == []
            ((authorization, token),) = stand_in.authorizations
            key = authorization.split("Credential=", 1)[1].split("/", 1)[0]
            assert key.startswith("ASIA") and key != moto.access_key
            assert token

            # Keys STS refuses: a clear error naming the role, and no Lambda call at all.
            wrong = Account(
                account.region, account.endpoint_url, AwsCredentials(moto.access_key, "nope"), arn
            )
            with pytest.raises(DiscoveryError) as excinfo:
                _list(Lister(), wrong)
            assert excinfo.value.code == "SignatureDoesNotMatch"
            assert arn in excinfo.value.message
            assert "nope" not in str(excinfo.value)
            assert len(stand_in.calls) == 1
