"""Web identity (IRSA) credentials from the default chain, against moto's STS (behind tests/aws_front.py, which
plays AWS's part for the unsigned AssumeRoleWithWebIdentity; every signed call is checked by moto itself), and
EKS Pod Identity's token file against a stand-in agent (moto has none)."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import pytest
from aws_front import AwsFront, moto_with_web_identity
from botocore.credentials import ReadOnlyCredentials
from harness import LoopThread, MotoServer, wait_until

from controlplane.aws import signing
from controlplane.aws.roles import RoleCache
from controlplane.aws.signing import DefaultChain

REGION = "us-east-1"
SESSION = "lambdagate-test"
TOKENS = ("eyJ.token-one.sig", "eyJ.token-two.sig", "eyJ.token-three.sig")


@pytest.fixture(scope="module")
def aws() -> Iterator[tuple[MotoServer, AwsFront]]:
    with moto_with_web_identity() as (moto, front):
        front.accept = set(TOKENS)
        yield moto, front


@pytest.fixture
def token_file(aws: tuple[MotoServer, AwsFront], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The environment EKS gives a pod with IRSA, pointed at moto's STS through the front."""
    _, front = aws
    path = tmp_path / "token"
    write_token(path, TOKENS[0])
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(path))
    monkeypatch.setenv("AWS_ROLE_ARN", front.setup.role_arn)
    monkeypatch.setenv("AWS_ROLE_SESSION_NAME", SESSION)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", front.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    return path


def write_token(path: Path, token: str) -> None:
    """As kubelet does: the new token appears at once (a new file swapped in)."""
    tmp = path.with_suffix(".new")
    tmp.write_text(token)
    os.replace(tmp, path)


def caller_arn(moto: MotoServer, creds: ReadOnlyCredentials) -> str:
    """Who moto says signed a GetCallerIdentity (signature checked) with these keys."""
    sts = boto3.client(
        "sts",
        endpoint_url=moto.url,
        region_name=REGION,
        aws_access_key_id=creds.access_key,
        aws_secret_access_key=creds.secret_key,
        aws_session_token=creds.token,
    )
    return str(sts.get_caller_identity()["Arn"])


def web_identity_calls(front: AwsFront) -> list[str | None]:
    return [s.token for s in front.calls("AssumeRoleWithWebIdentity")]


def test_credentials_come_from_assume_role_with_web_identity(
    aws: tuple[MotoServer, AwsFront], token_file: Path
) -> None:
    moto, front = aws
    before = len(front.seen)
    chain = DefaultChain()
    assert chain.load()
    creds = chain.current()
    assert chain.method == "assume-role-with-web-identity"
    assert chain.token_file == str(token_file)
    # One AssumeRoleWithWebIdentity with the file's token, answered by moto with temporary keys.
    assert [s.token for s in front.seen[before:]] == [TOKENS[0]]
    assert creds.access_key.startswith("ASIA") and creds.token
    assert caller_arn(moto, creds) == f"arn:aws:sts::123456789012:assumed-role/web-identity/{SESSION}"
    assert not chain.needs_refresh()  # an hour left: nothing to do until the token changes
    assert not chain.token_changed()


def test_rewriting_the_token_file_gives_new_credentials_before_expiry(
    aws: tuple[MotoServer, AwsFront], token_file: Path, loop_thread: LoopThread
) -> None:
    moto, front = aws
    chain = DefaultChain(token_check_s=0.05)
    assert chain.load()
    first = chain.current()
    stop = asyncio.Event()
    task = loop_thread.spawn(chain.keep_fresh(stop))
    try:
        write_token(token_file, TOKENS[1])
        wait_until(lambda: chain.current().access_key != first.access_key, 10, what="new credentials")
        second = chain.current()
        assert web_identity_calls(front)[-1] == TOKENS[1]
        assert caller_arn(moto, second).endswith(f"/web-identity/{SESSION}")
        assert chain.generation == 2
        # Unchanged file: no further STS calls, however often the loop looks.
        calls = len(front.seen)
        wait_until(lambda: not chain.token_changed(), 5)
        loop_thread.run(asyncio.sleep(0.3))
        assert len(front.seen) == calls
        assert chain.current() is second
    finally:
        loop_thread.loop.call_soon_threadsafe(stop.set)
        task.result(10)


def test_the_profile_token_file_is_watched_too(
    aws: tuple[MotoServer, AwsFront], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto, front = aws
    token = tmp_path / "profile-token"
    write_token(token, TOKENS[0])
    config = tmp_path / "config"
    config.write_text(
        f"[profile irsa]\nrole_arn = {front.setup.role_arn}\nweb_identity_token_file = {token}\n"
        f"role_session_name = {SESSION}\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_PROFILE", "irsa")
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", front.url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)
    chain = DefaultChain()
    assert chain.load()
    assert chain.token_file == str(token)
    first = chain.current()
    write_token(token, TOKENS[2])
    assert chain.reload_if_token_changed()
    assert chain.current().access_key != first.access_key
    assert web_identity_calls(front)[-1] == TOKENS[2]


def test_a_failed_refresh_keeps_the_credentials_and_logs_no_secret(
    aws: tuple[MotoServer, AwsFront],
    token_file: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    moto, front = aws
    # Ours at DEBUG; botocore at WARNING, as `lambdagate` runs it (its DEBUG output shows requests whole).
    caplog.set_level(logging.DEBUG, logger="lambdagate")
    caplog.set_level(logging.WARNING, logger="botocore")
    chain = DefaultChain()
    assert chain.load()
    good = chain.current()

    # A token STS refuses (and, carelessly, quotes in its error).
    refused = "eyJ.refused-token-do-not-log.sig"
    write_token(token_file, refused)
    assert chain.token_changed()
    assert not chain.reload_if_token_changed()
    assert chain.current() is good
    assert web_identity_calls(front)[-1] == refused
    assert "InvalidIdentityToken" in caplog.text and "keeping the current credentials" in caplog.text
    # Not retried at once (TOKEN_RETRY_S): no second call to STS with the same refused token.
    calls = len(front.seen)
    assert not chain.reload_if_token_changed()
    assert len(front.seen) == calls

    # A token file that went away: the same.
    monkeypatch.setattr(signing, "TOKEN_RETRY_S", 0.0)
    monkeypatch.setattr(chain, "_retry_at", 0.0)
    token_file.unlink()
    assert not chain.reload_if_token_changed()
    assert chain.current() is good
    assert "No such file" in caplog.text

    for secret in (refused, TOKENS[0], good.secret_key, good.token or "", good.access_key):
        assert secret not in caplog.text, "a secret reached the log"
    assert "***" in caplog.text  # the echoed token, scrubbed

    # A good token again: new credentials, and the keys still work at moto.
    write_token(token_file, TOKENS[1])
    assert chain.reload_if_token_changed()
    assert chain.current().access_key != good.access_key
    assert caller_arn(moto, chain.current()).endswith(f"/web-identity/{SESSION}")


def test_a_role_assumed_with_the_chain_follows_new_web_identity_credentials(
    aws: tuple[MotoServer, AwsFront], token_file: Path
) -> None:
    """role_arn without a Secret: the role is assumed with the chain's keys, and again once they change."""
    moto, front = aws
    chain = DefaultChain()
    assert chain.load()
    roles = RoleCache(chain)
    role = roles.get(None, front.setup.role_arn, REGION)
    role.refresh()
    first = role.current()
    (assume,) = front.calls("AssumeRole")[-1:]
    assert assume.access_key == chain.current().access_key  # signed with the web identity keys
    assert caller_arn(moto, first).endswith("/web-identity/lambdagate")  # roles.SESSION_NAME
    assert not role.source_changed
    role.refresh()
    assert role.current() is first or role.current() == first  # nothing new to assume

    write_token(token_file, TOKENS[1])
    assert chain.reload_if_token_changed()
    assert role.source_changed
    role.refresh()
    assert role.current().access_key != first.access_key
    assert front.calls("AssumeRole")[-1].access_key == chain.current().access_key
    assert not role.source_changed


def test_role_cache_keep_fresh_reassumes_soon_after_the_chain_changes(
    aws: tuple[MotoServer, AwsFront], token_file: Path, loop_thread: LoopThread
) -> None:
    _, front = aws
    chain = DefaultChain(token_check_s=0.05)
    assert chain.load()
    roles = RoleCache(chain)
    role = roles.get(None, front.setup.role_arn, REGION)
    role.refresh()
    first = role.current()
    stop = asyncio.Event()
    tasks = [loop_thread.spawn(chain.keep_fresh(stop)), loop_thread.spawn(roles.keep_fresh(stop))]
    try:
        write_token(token_file, TOKENS[2])
        # RoleCache's full refresh is every 30 s; a changed source is noticed at the chain's token pace.
        wait_until(lambda: role.current().access_key != first.access_key, 10, what="the role assumed again")
        assert front.calls("AssumeRole")[-1].access_key == chain.current().access_key
    finally:
        loop_thread.loop.call_soon_threadsafe(stop.set)
        for t in tasks:
            t.result(10)


class _PodIdentityAgent:
    """EKS Pod Identity's agent, as far as botocore's container provider sees it: fresh keys for the token in
    the Authorization header, 401 for any other."""

    def __init__(self) -> None:
        self.accept = ""
        self.seen: list[str] = []
        agent = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                token = self.headers.get("authorization", "")
                agent.seen.append(token)
                if token != agent.accept:
                    body, status = b'{"Message": "bad token"}', 401
                else:
                    n = len(agent.seen)
                    body, status = (
                        json.dumps(
                            {
                                "AccessKeyId": f"ASIAPODIDENTITY{n:05d}",
                                "SecretAccessKey": f"pod-secret-{n}",
                                "Token": f"pod-session-{n}",
                                "Expiration": (
                                    datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=6)
                                ).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            }
                        ).encode(),
                        200,
                    )
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1/credentials"

    def __enter__(self) -> _PodIdentityAgent:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_pod_identity_token_file_is_watched_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="lambdagate")
    caplog.set_level(logging.WARNING, logger="botocore")
    token = tmp_path / "eks-pod-identity-token"
    write_token(token, TOKENS[0])
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)
    with _PodIdentityAgent() as agent:
        agent.accept = TOKENS[0]
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", agent.url)
        monkeypatch.setenv("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", str(token))
        chain = DefaultChain()
        assert chain.load()
        assert (chain.method, chain.token_file) == ("container-role", str(token))
        first = chain.current()
        # Rotated: the agent now wants the new token, and is asked again at once.
        agent.accept = TOKENS[1]
        write_token(token, TOKENS[1])
        assert chain.reload_if_token_changed()
        assert chain.current().access_key != first.access_key
        assert agent.seen[-1] == TOKENS[1]
        # A token the agent refuses: the keys stay, and the token is not logged.
        write_token(token, TOKENS[2])
        assert not chain.reload_if_token_changed()
        assert chain.current().access_key != first.access_key
        assert TOKENS[2] not in caplog.text and "keeping the current credentials" in caplog.text
