"""Typed, validated lambdagate resources: Secret, Upstream and VirtualService.

Parsing turns plain documents (as kubectl would apply them) into frozen dataclasses or a ConfigError naming the field.
"""

from controlplane.model.errors import ConfigError
from controlplane.model.parse import parse_document
from controlplane.model.resolve import Resolved, resolve
from controlplane.model.resources import (
    KIND_SECRET,
    KIND_UPSTREAM,
    KIND_VIRTUAL_SERVICE,
    AwsCredentials,
    Config,
    Destination,
    Function,
    Matcher,
    ObjectKey,
    Route,
    Secret,
    Upstream,
    VirtualService,
)

__all__ = [
    "KIND_SECRET",
    "KIND_UPSTREAM",
    "KIND_VIRTUAL_SERVICE",
    "AwsCredentials",
    "Config",
    "ConfigError",
    "Destination",
    "Function",
    "Matcher",
    "ObjectKey",
    "Resolved",
    "Route",
    "Secret",
    "Upstream",
    "VirtualService",
    "parse_document",
    "resolve",
]
