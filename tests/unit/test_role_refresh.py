"""role_arn keys are renewed before they expire, against moto's STS with signature checking on."""

from __future__ import annotations

import datetime
import json

import pytest
from harness import MotoServer

from controlplane.aws.roles import RoleCredentials
from controlplane.model.resources import AwsCredentials


def test_role_keys_are_renewed_before_they_expire(monkeypatch: pytest.MonkeyPatch) -> None:
    with MotoServer() as moto:
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto.url)
        trust = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
        }
        arn = moto.client("iam").create_role(RoleName="invoker", AssumeRolePolicyDocument=json.dumps(trust))[
            "Role"
        ]["Arn"]
        role = RoleCredentials(AwsCredentials(moto.access_key, moto.secret_key), arn, "us-east-1")
        role.refresh()
        first = role.current()
        assert first.access_key.startswith("ASIA") and first.token
        # Far from expiry, a refresh keeps the keys: STS is not called on every check.
        role.refresh()
        assert role.current().access_key == first.access_key
        # Ten minutes before expiry (inside botocore's 15-minute window) the next check assumes the role again
        # at STS. Waiting the hour out is not possible in a test, so botocore's clock is moved 50 minutes on.
        import botocore.credentials

        real_now = botocore.credentials._local_now

        def later() -> datetime.datetime:
            return real_now() + datetime.timedelta(minutes=50)

        monkeypatch.setattr(botocore.credentials, "_local_now", later)
        role._credentials._time_fetcher = later  # bound when botocore built the credentials
        role.refresh()
        renewed = role.current()
        assert renewed.access_key != first.access_key and renewed.access_key.startswith("ASIA")
        # The renewed keys are real: STS accepts them for a signed call.
        import botocore.session

        sts = botocore.session.Session().create_client(
            "sts",
            region_name="us-east-1",
            endpoint_url=moto.url,
            aws_access_key_id=renewed.access_key,
            aws_secret_access_key=renewed.secret_key,
            aws_session_token=renewed.token,
        )
        assert sts.get_caller_identity()["Arn"].endswith(":assumed-role/invoker/lambdagate")
