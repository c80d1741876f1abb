"""Checks the references between objects (route -> upstream -> function, upstream -> secret) and builds a Config.

An object that fails falls back to its last good version when that one still resolves; the others still apply.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from controlplane.model.errors import ConfigError
from controlplane.model.resources import (
    LOCAL_ENDPOINT,
    Config,
    Endpoint,
    ObjectKey,
    Secret,
    Upstream,
    VirtualService,
    arn_region,
)

Resource = Secret | Upstream | VirtualService


@dataclass
class ResolveMemo:
    """What earlier resolve() calls found valid, so that an unchanged VirtualService is not checked route by route
    again. Only successes are kept, keyed on the very objects checked (they are immutable): the same
    VirtualService object naming the same Upstream objects passes again."""

    # VirtualService key -> (the object that passed, the Upstreams its routes name as they were then)
    services: dict[ObjectKey, tuple[VirtualService, tuple[tuple[ObjectKey, Upstream], ...]]] = field(
        default_factory=dict
    )


@dataclass
class Resolved:
    config: Config
    # Objects that were rejected, with why. An object may be rejected yet served from its last good version.
    errors: dict[ObjectKey, ConfigError] = field(default_factory=dict)
    # Rejected objects whose last good version is still being served.
    kept_previous: set[ObjectKey] = field(default_factory=set)


def resolve(
    objects: list[Resource],
    *,
    previous: Config | None = None,
    local_endpoint: Endpoint | None = None,
    memo: ResolveMemo | None = None,
) -> Resolved:
    errors: dict[ObjectKey, ConfigError] = {}
    kept: set[ObjectKey] = set()
    prev_by_key: dict[ObjectKey, Resource] = {}
    if previous is not None:
        earlier: list[Resource] = [*previous.secrets, *previous.upstreams, *previous.virtual_services]
        for p in earlier:
            prev_by_key[p.key] = p

    secrets = {s.key: s for s in objects if isinstance(s, Secret)}

    def fallback(key: ObjectKey, err: ConfigError, check: object) -> Resource | None:
        errors[key] = err
        prev = prev_by_key.get(key)
        if prev is None:
            return None
        try:
            check(prev)  # type: ignore[operator]
        except ConfigError:
            return None
        kept.add(key)
        return prev

    def check_upstream(up: Upstream) -> None:
        if up.secret_ref:
            sec = secrets.get(ObjectKey("Secret", up.namespace, up.secret_ref))
            if sec is None:
                raise ConfigError(
                    f"Secret {up.namespace}/{up.secret_ref} does not exist",
                    obj=str(up.key),
                    field="spec.secret_ref",
                )
            if sec.credentials is None:
                raise ConfigError(
                    f"Secret {up.namespace}/{up.secret_ref} lacks access_key and secret_key "
                    f"(it has: {', '.join(sec.keys) or 'no keys'})",
                    obj=str(up.key),
                    field="spec.secret_ref",
                )
        if up.endpoint == LOCAL_ENDPOINT and local_endpoint is None:
            raise ConfigError(
                "'local' names the endpoint that `lambdagate up` starts, and none is running "
                "(add a functions/ folder beside the config, or give a URL)",
                obj=str(up.key),
                field="spec.endpoint",
            )

    upstreams: dict[ObjectKey, Upstream] = {}
    for up in sorted((o for o in objects if isinstance(o, Upstream)), key=lambda o: o.key):
        try:
            check_upstream(up)
            upstreams[up.key] = up
        except ConfigError as err:
            prev = fallback(up.key, err, check_upstream)
            if isinstance(prev, Upstream):
                upstreams[prev.key] = prev

    claimed_domains: dict[str, ObjectKey] = {}
    passed = memo.services if memo is not None else {}
    passing: dict[ObjectKey, tuple[VirtualService, tuple[tuple[ObjectKey, Upstream], ...]]] = {}

    def check_vs(vs: VirtualService) -> None:
        seen = passed.get(vs.key)
        if seen is not None and seen[0] is vs and all(upstreams.get(k) is up for k, up in seen[1]):
            passing[vs.key] = seen
        else:
            named = check_routes(vs)
            passing[vs.key] = (vs, tuple(named.items()))
        if vs.api_keys is not None:
            # Checked every time (not memoized): the Secret may change while the VirtualService does not.
            sec = secrets.get(ObjectKey("Secret", vs.namespace, vs.api_keys.secret_ref))
            if sec is None or not any(v for _, v in sec.data):
                why = "does not exist" if sec is None else "holds no keys"
                raise ConfigError(
                    f"Secret {vs.namespace}/{vs.api_keys.secret_ref} {why}",
                    obj=str(vs.key),
                    field="spec.api_keys.secret_ref",
                )
        for i, domain in enumerate(vs.domains):
            owner = claimed_domains.get(domain)
            if owner is not None and owner != vs.key:
                raise ConfigError(
                    f"domain {domain!r} is already served by {owner}",
                    obj=str(vs.key),
                    field=f"spec.domains[{i}]",
                )

    def check_routes(vs: VirtualService) -> dict[ObjectKey, Upstream]:
        """Every route's destination exists; returns the Upstreams the routes name."""
        named: dict[ObjectKey, Upstream] = {}
        destinations = [
            (f"spec.routes[{i}].destination", route.destination) for i, route in enumerate(vs.routes)
        ] + [
            (f"spec.authorizers.{a.name}", a.function.destination)
            for a in vs.authorizers
            if a.function is not None
        ]
        for fpath, dest in destinations:
            if dest is None:  # a mock route answers by itself
                continue
            up = upstreams.get(ObjectKey("Upstream", dest.upstream_namespace, dest.upstream))
            if up is None:
                why = "does not exist"
                if ObjectKey("Upstream", dest.upstream_namespace, dest.upstream) in errors:
                    why = "is rejected"
                raise ConfigError(
                    f"Upstream {dest.upstream_namespace}/{dest.upstream} {why}",
                    obj=str(vs.key),
                    field=f"{fpath}.upstream",
                )
            single = not dest.functions
            for j, choice in enumerate(dest.choices()):
                cpath = fpath if single else f"{fpath}.functions[{j}]"
                if choice.function_name is not None:
                    region = arn_region(choice.function_name)
                    if region is not None and region != up.region:
                        raise ConfigError(
                            f"the ARN is in {region}, but Upstream {up.namespace}/{up.name} invokes "
                            f"in {up.region}; use an Upstream of that region",
                            obj=str(vs.key),
                            field=f"{cpath}.function_name",
                        )
                elif up.function(choice.function) is None:
                    names = up.function_names()
                    known = ", ".join(names[:20]) or "none"
                    if len(names) > 20:
                        known += f" and {len(names) - 20} more"
                    raise ConfigError(
                        f"Upstream {up.namespace}/{up.name} has no function {choice.function!r} (it has: {known})",
                        obj=str(vs.key),
                        field=f"{cpath}.function",
                    )
            named[up.key] = up
        return named

    services: list[VirtualService] = []
    for vs in sorted((o for o in objects if isinstance(o, VirtualService)), key=lambda o: o.key):
        chosen: VirtualService | None = vs
        try:
            check_vs(vs)
        except ConfigError as err:
            prev = fallback(vs.key, err, check_vs)
            chosen = prev if isinstance(prev, VirtualService) else None
        if chosen is not None:
            for domain in chosen.domains:
                claimed_domains.setdefault(domain, chosen.key)
            services.append(chosen)

    if memo is not None:
        memo.services = passing
    used_secrets = {
        ObjectKey("Secret", u.namespace, u.secret_ref) for u in upstreams.values() if u.secret_ref
    } | {ObjectKey("Secret", v.namespace, v.api_keys.secret_ref) for v in services if v.api_keys is not None}
    config = Config(
        upstreams=tuple(upstreams[k] for k in sorted(upstreams)),
        virtual_services=tuple(services),
        secrets=tuple(secrets[k] for k in sorted(secrets) if k in used_secrets),
        local_endpoint=local_endpoint,
    )
    return Resolved(config, errors, kept)
