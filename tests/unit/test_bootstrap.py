"""The bootstrap that `lambdagate bootstrap` prints is the one in envoy/, and real Envoy accepts it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from controlplane.bootstrap import bootstrap_config, bootstrap_yaml
from controlplane.cli import envoy_binary, main

ROOT = Path(__file__).resolve().parents[2]


def test_envoy_folder_matches_generated_bootstrap() -> None:
    assert (ROOT / "envoy" / "bootstrap.yaml").read_text() == bootstrap_yaml()


def test_cli_prints_bootstrap_for_given_address(capsys) -> None:
    assert main(["bootstrap", "--xds-address", "xds.lambdagate.svc:18000", "--node-id", "edge-1"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    cluster = doc["static_resources"]["clusters"][0]
    addr = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"
    ]
    assert addr == {"address": "xds.lambdagate.svc", "port_value": 18000}
    assert cluster["type"] == "STRICT_DNS" and doc["node"]["id"] == "edge-1"


def test_envoy_validates_bootstrap(tmp_path: Path) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(yaml.safe_dump(bootstrap_config(xds_port=18123)))
    out = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
