"""Small address helpers shared by the bootstrap and the translator."""

from __future__ import annotations

import ipaddress


def is_ip(host: str) -> bool:
    """A literal IP gets a STATIC Envoy cluster; anything else needs DNS."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
