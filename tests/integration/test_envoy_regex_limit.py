"""Every path template and regex our validation accepts, real Envoy accepts too (RE2 syntax and program size)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from google.protobuf import json_format

from controlplane.cli import envoy_binary
from controlplane.model import ConfigError
from controlplane.model.parse import _parse_matcher
from controlplane.translate.envoy import route_match


def envoy_accepts(match_json: dict, tmp_path: Path) -> tuple[bool, str]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": "t",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "v",
                    "domains": ["*"],
                    "routes": [{"match": match_json, "direct_response": {"status": 200}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    cfg = {
        "static_resources": {
            "listeners": [
                {
                    "name": "l",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}},
                    "filter_chains": [{"filters": [{"name": "hcm", "typed_config": hcm}]}],
                }
            ]
        }
    }
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(cfg))
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return out.returncode == 0, out.stdout[-500:] + out.stderr[-500:]


@pytest.mark.parametrize("params", [1, 5, 8, 9, 10, 11, 12, 14])
def test_accepted_templates_are_accepted_by_envoy(params: int, tmp_path: Path) -> None:
    template = "/" + "/".join(f"seg{i}/{{p{i}}}" for i in range(params))
    try:
        matcher = _parse_matcher({"path": template, "methods": ["GET", "POST"]}, "m")
    except ConfigError as err:
        assert "too complex" in str(err)
        return
    ok, log = envoy_accepts(json_format.MessageToDict(route_match(matcher)), tmp_path)
    assert ok, f"we accepted {template!r} but Envoy refused it: {log}"
