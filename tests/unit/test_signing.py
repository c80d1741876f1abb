"""sign_invoke checked against an independent SigV4 implementation written here with hashlib/hmac only,
and the guarantee that secrets never show in reprs or errors."""

from __future__ import annotations

import hashlib
import hmac
import re
from urllib.parse import quote, unquote

import pytest

from controlplane.aws.signing import CredentialsUnavailable, DefaultChain, frozen, sign_invoke
from controlplane.model import AwsCredentials, ConfigError, parse_document, resolve

ACCESS_KEY = "AKIDSIGNINGTEST01"
SECRET_KEY = "sig/secret+Key=0123456789abcdefghijklmnopqrst"
TOKEN = "IQoJb3JpZ2luX2VjEXAMPLETOKEN//////////wEaCXVzLWVhc3QtMSJIMEYCIQ=="
HOST = "lambda.us-east-1.amazonaws.com"
PATH = "/2015-03-31/functions/PetsGet/invocations"


# ---------------------------------------------------------------------------------------------------------------
# An independent SigV4 (https://docs.aws.amazon.com/IAM/latest/UserGuide/create-signed-request.html)


def _uri_encode(s: str) -> str:
    return quote(s, safe="-_.~")


def canonical_uri(path: str) -> str:
    # Every service but S3: each segment of the (already encoded) path is URI-encoded once more.
    return "/".join(_uri_encode(seg) for seg in path.split("/"))


def canonical_query(query: str) -> str:
    if not query:
        return ""
    pairs = []
    for part in query.split("&"):
        k, _, v = part.partition("=")
        pairs.append((_uri_encode(unquote(k)), _uri_encode(unquote(v))))
    return "&".join(f"{k}={v}" for k, v in sorted(pairs))


def signing_key(secret: str, date: str, region: str, service: str) -> bytes:
    k = hmac.new(("AWS4" + secret).encode(), date.encode(), hashlib.sha256).digest()
    k = hmac.new(k, region.encode(), hashlib.sha256).digest()
    k = hmac.new(k, service.encode(), hashlib.sha256).digest()
    return hmac.new(k, b"aws4_request", hashlib.sha256).digest()


def expected_signature(
    *,
    secret: str,
    region: str,
    method: str,
    path_and_query: str,
    headers: dict[str, str],
    signed: list[str],
    body: bytes,
) -> str:
    path, _, query = path_and_query.partition("?")
    amz_date = headers["x-amz-date"]
    canonical_headers = "".join(f"{h}:{' '.join(headers[h].strip().split())}\n" for h in signed)
    canonical_request = "\n".join(
        [
            method,
            canonical_uri(path),
            canonical_query(query),
            canonical_headers,
            ";".join(signed),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/lambda/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = signing_key(secret, amz_date[:8], region, "lambda")
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<ak>[^/]+)/(?P<date>\d{8})/(?P<region>[a-z0-9-]+)/lambda/aws4_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)


def parse_auth(headers: dict[str, str]) -> dict[str, str]:
    m = AUTH_RE.match(headers["authorization"])
    assert m, headers["authorization"]
    return m.groupdict()


def verify(
    signed_headers: dict[str, str], *, secret: str, region: str, authority: str, path: str, body: bytes
) -> bool:
    auth = parse_auth(signed_headers)
    all_headers = {**signed_headers, "host": authority}
    sig = expected_signature(
        secret=secret,
        region=region,
        method="POST",
        path_and_query=path,
        headers=all_headers,
        signed=auth["signed"].split(";"),
        body=body,
    )
    return hmac.compare_digest(sig, auth["sig"])


def test_own_key_derivation_matches_aws_documented_example():
    # From AWS's SigV4 documentation ("Examples of how to derive a signing key").
    key = signing_key("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20120215", "us-east-1", "iam")
    assert key.hex() == "f4780e2d9f65fa895f9c67b32ce1baf0b0d8a43505a000a1a9e090d414db404d"


# ---------------------------------------------------------------------------------------------------------------
# sign_invoke


def creds(token=None):
    return frozen(AwsCredentials(ACCESS_KEY, SECRET_KEY, token))


def test_signature_matches_independent_sigv4():
    body = b'{"httpMethod":"GET","path":"/pets"}'
    out = sign_invoke(creds(), "us-east-1", "https", HOST, PATH, body, {"content-type": "application/json"})
    auth = parse_auth(out)
    assert auth["ak"] == ACCESS_KEY
    assert auth["region"] == "us-east-1"
    assert auth["date"] == out["x-amz-date"][:8]
    assert re.match(r"^\d{8}T\d{6}Z$", out["x-amz-date"])
    signed = auth["signed"].split(";")
    assert signed == sorted(signed)
    assert {"host", "x-amz-date", "content-type"} <= set(signed)
    assert "x-amz-security-token" not in out
    # Host travels as :authority; sign_invoke does not return it.
    assert "host" not in out
    assert out["content-type"] == "application/json"
    assert verify(out, secret=SECRET_KEY, region="us-east-1", authority=HOST, path=PATH, body=body)
    # And the check itself can fail: a wrong secret does not verify.
    assert not verify(out, secret=SECRET_KEY + "x", region="us-east-1", authority=HOST, path=PATH, body=body)


def test_session_token_is_sent_and_signed():
    body = b"{}"
    out = sign_invoke(creds(TOKEN), "eu-west-1", "https", "lambda.eu-west-1.amazonaws.com", PATH, body)
    assert out["x-amz-security-token"] == TOKEN
    auth = parse_auth(out)
    assert "x-amz-security-token" in auth["signed"].split(";")
    assert auth["region"] == "eu-west-1"
    assert verify(
        out,
        secret=SECRET_KEY,
        region="eu-west-1",
        authority="lambda.eu-west-1.amazonaws.com",
        path=PATH,
        body=body,
    )
    # A different token under the same signature fails: the token is covered.
    tampered = {**out, "x-amz-security-token": TOKEN + "x"}
    assert not verify(
        tampered,
        secret=SECRET_KEY,
        region="eu-west-1",
        authority="lambda.eu-west-1.amazonaws.com",
        path=PATH,
        body=body,
    )


def test_body_is_covered_by_the_signature():
    out = sign_invoke(creds(), "us-east-1", "https", HOST, PATH, b'{"a":1}')
    assert verify(out, secret=SECRET_KEY, region="us-east-1", authority=HOST, path=PATH, body=b'{"a":1}')
    assert not verify(out, secret=SECRET_KEY, region="us-east-1", authority=HOST, path=PATH, body=b'{"a":2}')
    other = sign_invoke(creds(), "us-east-1", "https", HOST, PATH, b'{"a":2}')
    if other["x-amz-date"] == out["x-amz-date"]:
        assert parse_auth(other)["sig"] != parse_auth(out)["sig"]


def test_arn_function_name_and_qualifier_are_signed_as_sent():
    # translate.invoke_path percent-encodes the ARN's ':'; SigV4 encodes the path once more.
    from controlplane.translate.envoy import invoke_path

    path = invoke_path("arn:aws:lambda:us-east-1:123456789012:function:PetsGet", "$LATEST")
    assert path == (
        "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3APetsGet/invocations"
        "?Qualifier=%24LATEST"
    )
    body = b"{}"
    out = sign_invoke(creds(), "us-east-1", "https", HOST, path, body)
    assert verify(out, secret=SECRET_KEY, region="us-east-1", authority=HOST, path=path, body=body)
    # Signed for another qualifier, it would not verify.
    assert not verify(
        out,
        secret=SECRET_KEY,
        region="us-east-1",
        authority=HOST,
        path=path.replace("%24LATEST", "live"),
        body=body,
    )


def test_local_endpoint_authority_with_port_is_signed():
    authority = "127.0.0.1:9001"
    out = sign_invoke(creds(), "us-east-1", "http", authority, PATH, b"x")
    assert verify(out, secret=SECRET_KEY, region="us-east-1", authority=authority, path=PATH, body=b"x")
    assert not verify(out, secret=SECRET_KEY, region="us-east-1", authority="127.0.0.1", path=PATH, body=b"x")


# ---------------------------------------------------------------------------------------------------------------
# Secrets stay secret


def test_aws_credentials_repr_hides_secret_and_token():
    c = AwsCredentials("AKIDEXAMPLE12345", SECRET_KEY, TOKEN)
    for text in (repr(c), str(c), f"{c}", repr([c]), repr({"c": c})):
        assert SECRET_KEY not in text
        assert TOKEN not in text
        assert "AKIDEXAMPLE12345" not in text
    assert "AKID" in repr(c)  # enough to tell keys apart
    assert "AKIDEXAMPLE12345" not in repr(AwsCredentials("AKIDEXAMPLE12345", "s"))
    assert repr(AwsCredentials("short", "s")).count("short") == 0


def _secret(**string_data):
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": string_data}


def test_config_errors_never_contain_the_secret_key():
    errors: list[ConfigError] = []
    bad_docs = [
        {**_secret(access_key="AKID", secret_key=SECRET_KEY), "metadata": {"name": "BAD NAME"}},
        {**_secret(), "data": {"access_key": "QUtJRA==", "secret_key": SECRET_KEY}},  # not base64
        {**_secret(access_key="AKID", secret_key=SECRET_KEY), "apiVersion": "v2"},
        {**_secret(access_key="AKID", secret_key=SECRET_KEY), "kind": "Secrets"},
    ]
    for doc in bad_docs:
        with pytest.raises(ConfigError) as info:
            parse_document(doc)
        errors.append(info.value)
    # A Secret with no access_key: the Upstream is rejected, naming the keys the Secret has but not their values.
    up = parse_document(
        {
            "apiVersion": "lambdagate.io/v1",
            "kind": "Upstream",
            "metadata": {"name": "u"},
            "spec": {"region": "us-east-1", "secret_ref": "creds"},
        }
    )
    res = resolve([parse_document(_secret(secret_key=SECRET_KEY, session_token=TOKEN)), up])
    errors.extend(res.errors.values())
    assert len(errors) == 5
    for err in errors:
        for text in (str(err), repr(err), err.message):
            assert SECRET_KEY not in text
            assert TOKEN not in text


# ---------------------------------------------------------------------------------------------------------------
# The default chain


def _isolate_env(monkeypatch, tmp_path):
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_default_chain_reads_environment(monkeypatch, tmp_path):
    _isolate_env(monkeypatch, tmp_path)
    chain = DefaultChain()
    with pytest.raises(CredentialsUnavailable):
        chain.current()
    assert chain.needs_refresh()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    chain.load()
    got = chain.current()
    assert (got.access_key, got.secret_key) == (ACCESS_KEY, SECRET_KEY)
    assert not chain.needs_refresh()
    out = sign_invoke(got, "us-east-1", "https", HOST, PATH, b"{}")
    assert verify(out, secret=SECRET_KEY, region="us-east-1", authority=HOST, path=PATH, body=b"{}")


def test_default_chain_without_credentials_says_so(monkeypatch, tmp_path):
    _isolate_env(monkeypatch, tmp_path)
    chain = DefaultChain()
    chain.load()
    with pytest.raises(CredentialsUnavailable, match="no credentials"):
        chain.current()


# ---------------------------------------------------------------------------------------------------------------
# botocore is the reference: sign_invoke computes SigV4 itself (issue 6), and must give botocore's exact bytes.


def _botocore_sign(
    creds_, region, scheme, authority, path, body, extra, payload_hash, when, monkeypatch
) -> dict[str, str]:
    import datetime

    import botocore.auth
    from botocore.awsrequest import AWSRequest

    monkeypatch.setattr(
        botocore.auth,
        "get_current_datetime",
        lambda: datetime.datetime.fromtimestamp(when, datetime.timezone.utc).replace(tzinfo=None),
    )
    headers = {"host": authority, **extra}
    if payload_hash is not None:
        headers["X-Amz-Content-SHA256"] = payload_hash
    request = AWSRequest(method="POST", url=f"{scheme}://{authority}{path}", data=body, headers=headers)
    botocore.auth.SigV4Auth(creds_, "lambda", region).add_auth(request)
    out = {k.lower(): v for k, v in request.headers.items()}
    out.pop("host", None)
    return out


@pytest.mark.parametrize("token", [None, TOKEN])
@pytest.mark.parametrize(
    "path",
    [
        PATH,
        "/2015-03-31/functions/PetsGet/invocations?Qualifier=%24LATEST",
        "/2015-03-31/functions/arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Ahello/invocations"
        "?Qualifier=live",
        "/2015-03-31/functions/123456789012%3Afunction%3Ahello/invocations?Qualifier=7",
    ],
)
@pytest.mark.parametrize(
    "extra",
    [
        {"content-type": "application/json"},
        {"content-type": "application/json", "x-amz-invocation-type": "Event"},
        {"content-type": "application/json", "x-amz-invocation-type": "DryRun"},
        {"content-type": "application/json", "x-amz-log-type": "Tail", "x-amzn-trace-id": "Root=1-a-b"},
    ],
)
@pytest.mark.parametrize("body", [b"", b'{"httpMethod":"GET","path":"/pets"}', bytes(range(256))])
def test_signature_is_botocores(token, path, extra, body, monkeypatch):
    when = 1_790_000_000.0
    for authority, payload_hash in (
        (HOST, None),
        ("127.0.0.1:9001", None),
        (HOST, hashlib.sha256(body).hexdigest()),
    ):
        ours = sign_invoke(
            creds(token), "eu-west-1", "https", authority, path, body, extra, payload_hash, when
        )
        reference = _botocore_sign(
            creds(token), "eu-west-1", "https", authority, path, body, extra, payload_hash, when, monkeypatch
        )
        assert ours == reference


def test_signing_key_follows_the_day_and_the_secret():
    body = b"{}"
    day1 = sign_invoke(creds(), "us-east-1", "https", HOST, PATH, body, None, None, 1_790_000_000.0)
    day2 = sign_invoke(creds(), "us-east-1", "https", HOST, PATH, body, None, None, 1_790_000_000.0 + 86400)
    assert verify(day1, secret=SECRET_KEY, region="us-east-1", authority=HOST, path=PATH, body=body)
    assert verify(day2, secret=SECRET_KEY, region="us-east-1", authority=HOST, path=PATH, body=body)
    rotated = frozen(AwsCredentials(ACCESS_KEY, SECRET_KEY + "2"))
    other = sign_invoke(rotated, "us-east-1", "https", HOST, PATH, body, None, None, 1_790_000_000.0)
    assert verify(other, secret=SECRET_KEY + "2", region="us-east-1", authority=HOST, path=PATH, body=body)
    assert parse_auth(other)["sig"] != parse_auth(day1)["sig"]
